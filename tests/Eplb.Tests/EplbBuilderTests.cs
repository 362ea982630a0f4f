using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The container wires the EPLB runtime (issue 16 §2): <c>services.AddEplb(section)</c> with a
/// transport and the host's own policies gives an <see cref="EplbState"/> that rearranges with the
/// policy the options name, validated at start, disposed with the container; policies come from the
/// container and nothing leaks into the built-in set.
/// </summary>
public class EplbBuilderTests
{
    private static IConfiguration Section(string policy, bool async = false) => new ConfigurationBuilder().AddInMemoryCollection(
        new Dictionary<string, string?>
        {
            ["Eplb:WindowSize"] = "4",
            ["Eplb:StepInterval"] = "8",
            ["Eplb:RedundantExperts"] = "4",
            ["Eplb:Groups"] = "4",
            ["Eplb:Policy"] = policy,
            ["Eplb:UseAsync"] = async ? "true" : "false",
        }).Build().GetSection(EplbOptions.SectionName);

    /// <summary>What the container-made policy saw: a service it was given, and each plan it made.</summary>
    public sealed class PlanLog
    {
        public List<int> Layers { get; } = [];
    }

    /// <summary>DeepSeek's plan, recorded in a <see cref="PlanLog"/> the container hands it.</summary>
    public sealed class LoggedPolicy(PlanLog log) : IPlacementPolicy
    {
        public string Name => "logged";

        public ExpertPlacement Plan(ExpertLoad load, PlacementRequest request, ExpertPlacement? current = null)
        {
            lock (log) log.Layers.Add(load.Layers);
            return PlacementPolicies.DeepSeek.Plan(load, request, current);
        }
    }

    private sealed class DisposalTrackingTransport(int ranks) : IExpertTransport
    {
        private readonly InProcessTransport _inner = new(ranks);
        public bool Disposed { get; private set; }
        public int Ranks => _inner.Ranks;
        public IReadOnlyList<int> LocalRanks => _inner.LocalRanks;
        public TransportKind Kind => TransportKind.InProcess;

        public void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
            Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation) => _inner.Transfer(batch, weightsOf, stagingOf, cancellation);

        public void AllReduceSum(Span<long> values) => _inner.AllReduceSum(values);
        public int AllReduceMin(int value) => _inner.AllReduceMin(value);
        public void Dispose() => Disposed = true;
    }

    [TestCase(false)]
    [TestCase(true)]
    public void TheContainerBuildsAStateThatRearrangesWithTheHostsPolicy(bool async)
    {
        var services = new ServiceCollection().AddLogging().AddSingleton<PlanLog>();
        services.AddEplb(Section("LOGGED", async)).AddInProcessTransport(ranks: 4).AddPlacementPolicy<LoggedPolicy>("logged");
        var ranks = Enumerable.Range(0, 4).Select(r => new SimulatedRank(r, 4, 3, 16, 20, [5, 2])).ToArray();
        EplbState state;
        using (var provider = services.BuildServiceProvider(new ServiceProviderOptions { ValidateOnBuild = true, ValidateScopes = true }))
        {
            provider.GetRequiredService<IStartupValidator>().Validate();
            state = provider.GetRequiredService<EplbState>();
            Assert.That(provider.GetRequiredService<EplbState>(), Is.SameAs(state), "one EplbState per container");
            Assert.That(provider.GetRequiredService<PlacementPolicyCatalog>().Names,
                Is.EqualTo(new[] { "deepseek", "locality", "incremental", "logged" }));
            var model = state.AddModel("main", ranks);

            // Expert 15 is hot; it starts on the last rank only, so the policy must move it.
            var random = TestSupport.NewRandom();
            var load = Enumerable.Range(0, 16).Select(e => e == 15 ? 60.0 : 1.0).ToArray();
            var initial = model.Placement;
            for (var step = 0; step < 16 && state.CompletedRearrangements == 0; step++)
            {
                foreach (var rank in ranks)
                {
                    using var logical = new DeviceBuffer<int>(Backend.Cpu, 32 * 4);
                    using var physical = new DeviceBuffer<int>(Backend.Cpu, 32 * 4);
                    for (var layer = 0; layer < 3; layer++)
                    {
                        logical.CopyFrom(TestSupport.SampleTopK(random, load, 32, 4));
                        ExpertMapping.MapToPhysical(rank.Stream, logical, 4, rank.LayerStates![layer], physical);
                    }
                }
                state.Step();
                if (async && state.IsRearranging) state.WaitForStagedLayer(TimeSpan.FromSeconds(10));
            }
            for (var i = 0; i < 20 && state.IsRearranging; i++)
            {
                state.WaitForStagedLayer(TimeSpan.FromSeconds(10));
                state.Step();
            }
            Assert.That(state.CompletedRearrangements, Is.EqualTo(1));
            Assert.That(provider.GetRequiredService<PlanLog>().Layers, Is.EqualTo(new[] { 3 }), "the container's policy planned");
            Assert.That(model.Placement.Phy2Log(0).ToArray(), Is.Not.EqualTo(initial.Phy2Log(0).ToArray()));
            for (var layer = 0; layer < 3; layer++)
                foreach (var rank in ranks)
                    Assert.That(rank.ExpertsInWeights(layer),
                        Is.EqualTo(model.Placement.Phy2Log(layer).Slice(rank.Rank * 5, 5).ToArray()), $"weights of rank {rank.Rank}, layer {layer}");
        }
        // The container disposed the state with itself.
        Assert.Throws<ObjectDisposedException>(() => state.Step());
        foreach (var rank in ranks) rank.Dispose();
    }

    [Test]
    public void TheContainerDisposesTheStateThenTheTransport()
    {
        DisposalTrackingTransport? transport = null;
        var services = new ServiceCollection();
        services.AddEplb(Section("deepseek")).AddTransport(_ => transport = new DisposalTrackingTransport(2));
        EplbState state;
        using (var provider = services.BuildServiceProvider())
        {
            state = provider.GetRequiredService<EplbState>();
            Assert.That(transport!.Disposed, Is.False);
        }
        Assert.That(transport.Disposed, Is.True);
        Assert.Throws<ObjectDisposedException>(() => state.Rearrange());
    }

    [Test]
    public void HostPoliciesDoNotLeakIntoTheDefaultSetOrAnotherContainer()
    {
        var withPolicy = new ServiceCollection().AddSingleton<PlanLog>();
        withPolicy.AddEplb(Section("logged")).AddInProcessTransport(2).AddPlacementPolicy<LoggedPolicy>("logged");
        using (var provider = withPolicy.BuildServiceProvider())
        {
            provider.GetRequiredService<IStartupValidator>().Validate();
            Assert.That(provider.GetRequiredService<IOptions<EplbOptions>>().Value.Policy, Is.EqualTo("logged"));
        }

        Assert.That(PlacementPolicies.Names, Is.EqualTo(new[] { "deepseek", "locality", "incremental" }));
        var without = new ServiceCollection();
        without.AddEplb(Section("logged")).AddInProcessTransport(2);
        using var other = without.BuildServiceProvider();
        var error = Assert.Throws<OptionsValidationException>(() => other.GetRequiredService<IStartupValidator>().Validate())!;
        Assert.That(error.Message, Does.Contain("Policy 'logged' is not registered (known: deepseek, locality, incremental)"));
        Assert.Throws<OptionsValidationException>(() => other.GetRequiredService<EplbState>());
    }

    [Test]
    public void OptionsAreValidatedAtStartWithEveryViolation()
    {
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Eplb:WindowSize"] = "0",
            ["Eplb:Policy"] = "nope",
        }).Build();
        var services = new ServiceCollection();
        services.AddEplb(configuration.GetSection("Eplb")).AddInProcessTransport(2);
        using var provider = services.BuildServiceProvider();
        var error = Assert.Throws<OptionsValidationException>(() => provider.GetRequiredService<IStartupValidator>().Validate())!;
        Assert.That(error.Failures, Has.Count.EqualTo(2));
        Assert.That(error.Message, Does.Contain("WindowSize must be > 0 (got 0)").And.Contain("Policy 'nope' is not registered"));
    }

    [Test]
    public void MisconfiguredBuildersFailWithWhatToDo()
    {
        var noTransport = new ServiceCollection();
        noTransport.AddEplb(Section("deepseek"));
        using (var provider = noTransport.BuildServiceProvider())
        {
            var error = Assert.Throws<InvalidOperationException>(() => provider.GetRequiredService<EplbState>())!;
            Assert.That(error.Message, Does.Contain("AddInProcessTransport"));
        }

        var taken = new ServiceCollection().AddSingleton<PlanLog>();
        taken.AddEplb(Section("deepseek")).AddInProcessTransport(2).AddPlacementPolicy<LoggedPolicy>("DeepSeek");
        using (var provider = taken.BuildServiceProvider())
        {
            var error = Assert.Throws<ArgumentException>(() => provider.GetRequiredService<PlacementPolicyCatalog>())!;
            Assert.That(error.Message, Does.Contain("two placement policies are named 'DeepSeek'"));
        }

        var builder = new ServiceCollection().AddEplb(Section("deepseek"));
        Assert.Throws<ArgumentOutOfRangeException>(() => builder.AddInProcessTransport(0));
        Assert.Throws<ArgumentException>(() => builder.AddPlacementPolicy<LoggedPolicy>(" "));

        // The options' communicator and the transport must agree.
        var nccl = new ServiceCollection();
        nccl.AddEplb(o => { o.Communicator = TransportKind.Nccl; o.UseAsync = false; }).AddInProcessTransport(2);
        using (var provider = nccl.BuildServiceProvider())
            Assert.Throws<ArgumentException>(() => provider.GetRequiredService<EplbState>());
    }

    [Test]
    public void TheLastTransportAddedWins()
    {
        var services = new ServiceCollection();
        services.AddEplb(Section("deepseek")).AddInProcessTransport(2).AddInProcessTransport(8);
        using var provider = services.BuildServiceProvider();
        Assert.That(provider.GetServices<IExpertTransport>().Single().Ranks, Is.EqualTo(8));
    }

    [Test]
    public void NcclSettingsAndOptionsMakeTheEnvironmentRulesFacts()
    {
        var settings = new NcclTransportSettings
        {
            UniqueId = new NcclUniqueId(new byte[128]), Rank = 1, Ranks = 8, DataParallelSize = 8, AllToAll = AllToAllBackend.DeepEpLowLatency,
            Moe = MoeBackend.MegaMoe,
        };
        var context = settings.Environment(new EplbOptions { UseAsync = true, Communicator = TransportKind.Nccl, AllowNcclWithAsync = true });
        Assert.That(context, Is.EqualTo(new NcclEnvironmentContext(8, true, TransportKind.Nccl, true, AllToAllBackend.DeepEpLowLatency, MoeBackend.MegaMoe)));
        Assert.That(NcclEnvironment.ConditionsHold(context), Is.True);
        var quiet = settings with { DataParallelSize = 1 };
        Assert.That(NcclEnvironment.ConditionsHold(quiet.Environment(new EplbOptions { UseAsync = false })), Is.False);
    }
}
