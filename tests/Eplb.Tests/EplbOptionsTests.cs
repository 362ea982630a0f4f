using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>EplbOptions: defaults, binding through Microsoft.Extensions.Options, validation (docs/design.md §3.1).</summary>
public class EplbOptionsTests
{
    [Test]
    public void DefaultsFollowTheSpec()
    {
        var options = new EplbOptions();
        Assert.That(options.WindowSize, Is.EqualTo(1000));
        Assert.That(options.StepInterval, Is.EqualTo(3000));
        Assert.That(options.RedundantExperts, Is.Zero);
        Assert.That(options.LogBalancedness, Is.False);
        Assert.That(options.LogBalancednessInterval, Is.EqualTo(1));
        Assert.That(options.UseAsync, Is.True);
        Assert.That(options.Policy, Is.EqualTo("deepseek"));
        Assert.That(options.Communicator, Is.EqualTo(TransportKind.Auto));
        Assert.That(options.ReplicaSelection, Is.EqualTo(ReplicaSelection.TokenHash));
        Assert.That(options.Violations(), Is.Empty);
    }

    [Test]
    public void BindsFromJsonEnvironmentAndCommandLine()
    {
        var json = Path.Combine(Path.GetTempPath(), $"eplb-{Guid.NewGuid():N}.json");
        File.WriteAllText(json, """{"Eplb": {"WindowSize": 64, "StepInterval": 256, "Policy": "locality", "RedundantExperts": 32, "Groups": 8}}""");
        Environment.SetEnvironmentVariable("EPLBTEST_Eplb__LogBalancedness", "true");
        try
        {
            var configuration = new ConfigurationBuilder()
                .AddJsonFile(json)
                .AddEnvironmentVariables("EPLBTEST_")
                .AddCommandLine(["--Eplb:UseAsync=false", "--Eplb:ReplicaSelection=RoundRobin"])
                .Build();
            using var provider = new ServiceCollection().AddEplb(configuration.GetSection(EplbOptions.SectionName)).Services.BuildServiceProvider();
            var options = provider.GetRequiredService<IOptions<EplbOptions>>().Value;
            Assert.That(options.WindowSize, Is.EqualTo(64));
            Assert.That(options.StepInterval, Is.EqualTo(256));
            Assert.That(options.Policy, Is.EqualTo("locality"));
            Assert.That(options.RedundantExperts, Is.EqualTo(32));
            Assert.That(options.Groups, Is.EqualTo(8));
            Assert.That(options.LogBalancedness, Is.True);
            Assert.That(options.UseAsync, Is.False);
            Assert.That(options.ReplicaSelection, Is.EqualTo(ReplicaSelection.RoundRobin));
        }
        finally
        {
            File.Delete(json);
            Environment.SetEnvironmentVariable("EPLBTEST_Eplb__LogBalancedness", null);
        }
    }

    [Test]
    public void OneExceptionListsEveryViolation()
    {
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Eplb:WindowSize"] = "0",
            ["Eplb:StepInterval"] = "-5",
            ["Eplb:RedundantExperts"] = "-1",
            ["Eplb:LogBalancednessInterval"] = "0",
            ["Eplb:Policy"] = "magic",
            ["Eplb:Communicator"] = "Nccl",
        }).Build();
        using var provider = new ServiceCollection().AddEplb(configuration.GetSection("Eplb")).Services.BuildServiceProvider();
        var error = Assert.Throws<OptionsValidationException>(() => _ = provider.GetRequiredService<IOptions<EplbOptions>>().Value)!;
        Assert.That(error.Failures, Has.Count.EqualTo(6));
        Assert.That(error.Message, Does.Contain("WindowSize must be > 0 (got 0)")
            .And.Contain("StepInterval must be > 0 (got -5)")
            .And.Contain("RedundantExperts must be >= 0 (got -1)")
            .And.Contain("LogBalancednessInterval must be > 0 (got 0)")
            .And.Contain("Policy 'magic' is not registered")
            .And.Contain("Communicator = Nccl is refused with UseAsync = true"));
    }

    [Test]
    public void RedundantExpertsRequireEplbAndNcclAsyncNeedsTheOverride()
    {
        var disabled = new EplbOptions { Enabled = false, RedundantExperts = 8 };
        Assert.That(disabled.Violations(), Has.One.Contains("requires EPLB enabled"));
        var nccl = new EplbOptions { Communicator = TransportKind.Nccl, UseAsync = true, AllowNcclWithAsync = true };
        Assert.That(nccl.Violations(), Is.Empty);
        var syncNccl = new EplbOptions { Communicator = TransportKind.Nccl, UseAsync = false };
        Assert.That(syncNccl.Violations(), Is.Empty);
    }

    [Test]
    public void AsyncNeedsAPolicyThatSupportsIt()
    {
        var policies = PlacementPolicies.Default.With(new SyncOnlyPolicy());
        var options = new EplbOptions { Policy = "sync-only", UseAsync = true };
        Assert.That(options.Violations(policies), Has.One.Contains("'sync-only' does not"));
        options.UseAsync = false;
        Assert.That(options.Violations(policies), Is.Empty);
        // Nothing leaked into the default set.
        Assert.That(options.Violations(), Has.One.Contains("Policy 'sync-only' is not registered (known: deepseek, locality, incremental)"));
    }

    [Test]
    public void WindowLongerThanIntervalIsAWarningNotAnError()
    {
        var options = new EplbOptions { WindowSize = 500, StepInterval = 100 };
        Assert.That(options.Violations(), Is.Empty);
        Assert.That(options.Warnings(), Has.One.Contains("WindowSize (500) > StepInterval (100)"));
    }

    private sealed class SyncOnlyPolicy : IPlacementPolicy
    {
        public string Name => "sync-only";
        public bool SupportsAsync => false;
        public ExpertPlacement Plan(ExpertLoad load, PlacementRequest request, ExpertPlacement? current = null) =>
            PlacementPolicies.DeepSeek.Plan(load, request, current);
    }
}
