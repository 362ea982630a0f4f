using Microsoft.Extensions.Logging;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The NCCL_MAX_CTAS rule (docs/design.md §3.4) and the run-time loaded NCCL transport.</summary>
public class NcclTests
{
    private static NcclEnvironmentContext Firing(MoeBackend moe = MoeBackend.MegaMoe) =>
        new(DataParallelSize: 2, EplbEnabled: true, TransportKind.Nccl, UseAsync: false, AllToAllBackend.Other, moe);

    [Test]
    public void MegaMoeSetsEightEvenWithSyncEplb()
    {
        var environment = new Dictionary<string, string?>();
        Assert.That(NcclEnvironment.Apply(Firing(), environment: environment), Is.EqualTo(NcclEnvironmentDecision.SetMaxCtas));
        Assert.That(environment["NCCL_MAX_CTAS"], Is.EqualTo("8"));
    }

    [Test]
    public void DeepEpLowLatencyNeedsAsync()
    {
        var sync = Firing(MoeBackend.Unfused) with { AllToAll = AllToAllBackend.DeepEpLowLatency };
        Assert.That(NcclEnvironment.Apply(sync, environment: new Dictionary<string, string?>()), Is.EqualTo(NcclEnvironmentDecision.NotNeeded));
        var environment = new Dictionary<string, string?>();
        Assert.That(NcclEnvironment.Apply(sync with { UseAsync = true }, environment: environment), Is.EqualTo(NcclEnvironmentDecision.SetMaxCtas));
        Assert.That(environment["NCCL_MAX_CTAS"], Is.EqualTo("8"));
    }

    [TestCase(1, true, TransportKind.Nccl, TestName = "single data-parallel rank")]
    [TestCase(2, false, TransportKind.Nccl, TestName = "EPLB disabled")]
    [TestCase(2, true, TransportKind.InProcess, TestName = "communicator not NCCL-based")]
    public void AnyMissingConditionLeavesTheEnvironmentAlone(int dataParallel, bool enabled, TransportKind communicator)
    {
        var context = Firing() with { DataParallelSize = dataParallel, EplbEnabled = enabled, Communicator = communicator };
        var environment = new Dictionary<string, string?>();
        Assert.That(NcclEnvironment.Apply(context, environment: environment), Is.EqualTo(NcclEnvironmentDecision.NotNeeded));
        Assert.That(environment, Is.Empty);
    }

    [Test]
    public void NoCooperativeBackendNoOverride()
    {
        var context = Firing(MoeBackend.Unfused) with { UseAsync = true };
        Assert.That(NcclEnvironment.ConditionsHold(context), Is.False);
    }

    [TestCase("4", NcclEnvironmentDecision.KeptUserValue, "4")]
    [TestCase("32", NcclEnvironmentDecision.KeptUserValue, "32")]
    [TestCase("lots", NcclEnvironmentDecision.SetMaxCtas, "8")]
    [TestCase("", NcclEnvironmentDecision.SetMaxCtas, "8")]
    public void ANumberTheUserSetIsRespected(string value, NcclEnvironmentDecision decision, string after)
    {
        var environment = new Dictionary<string, string?> { ["NCCL_MAX_CTAS"] = value };
        Assert.That(NcclEnvironment.Apply(Firing(), environment: environment), Is.EqualTo(decision));
        Assert.That(environment["NCCL_MAX_CTAS"], Is.EqualTo(after));
    }

    [Test]
    public void FiringIsLoggedOnce()
    {
        var logger = new ListLogger();
        for (var i = 0; i < 3; i++) NcclEnvironment.Apply(Firing(), logger, new Dictionary<string, string?>());
        Assert.That(logger.Lines.Count(l => l.Contains("NCCL_MAX_CTAS=8")), Is.EqualTo(1));
        Assert.That(NcclEnvironment.HasRun, Is.True);
    }

    [Test]
    public void MissingLibraryIsNamed()
    {
        if (NativeLibraryExists("libnccl.so.2")) Assert.Ignore("libnccl.so.2 is installed here");
        var error = Assert.Throws<NcclNotFoundException>(() => _ = NcclTransport.Version)!;
        Assert.That(error, Is.InstanceOf<DllNotFoundException>());
        Assert.That(error.Message, Does.Contain("libnccl.so.2").And.Contain("in-process communicator"));
        Assert.That(error.Message, Does.Contain("EPLB_NCCL_PATH").And.Contain("nvidia-nccl-cu12").And.Contain("libnccl2"));
    }

    [Test]
    public void TheTransportAppliesTheEnvironmentRuleBeforeItLoadsNccl()
    {
        if (NativeLibraryExists("libnccl.so.2")) Assert.Ignore("libnccl.so.2 is installed here: the communicator would be created");
        var environment = new Dictionary<string, string?>();
        Assert.Throws<NcclNotFoundException>(() => new NcclTransport(new NcclUniqueId(new byte[128]), 0, 1, Firing(), null, environment));
        Assert.That(environment["NCCL_MAX_CTAS"], Is.EqualTo("8"), "set before libnccl.so.2 was loaded");
        Assert.That(NcclEnvironment.HasRun, Is.True);
    }

    [Test]
    public void NcclFailuresCarryTheResult()
    {
        var error = new NcclException("ncclSend", NcclResult.RemoteError, "remote process exited or there was a network error");
        Assert.That((error.Call, error.Result, error.ResultText),
            Is.EqualTo(("ncclSend", NcclResult.RemoteError, "remote process exited or there was a network error")));
        Assert.That(error.Message, Does.StartWith("ncclSend failed: NCCL error 6 (RemoteError)"));
    }

    [Test, Category("GPU")]
    public void OneRankSmokeTest()
    {
        TestSupport.RequireCuda();
        if (!NativeLibraryExists("libnccl.so.2")) Assert.Ignore("libnccl.so.2 is not installed");
        using var transport = new NcclTransport(NcclTransport.CreateUniqueId(), 0, 1, Firing(), null, new Dictionary<string, string?>());
        var values = new long[] { 3, 5, long.MaxValue / 4 };
        transport.AllReduceSum(values);
        Assert.That(values, Is.EqualTo(new long[] { 3, 5, long.MaxValue / 4 }));
        Assert.That(transport.AllReduceMin(7), Is.EqualTo(7));
        Assert.That(NcclTransport.Version, Is.GreaterThan(20000));
    }

    private static bool NativeLibraryExists(string name)
    {
        if (!System.Runtime.InteropServices.NativeLibrary.TryLoad(name, out var handle)) return false;
        System.Runtime.InteropServices.NativeLibrary.Free(handle);
        return true;
    }
}

/// <summary>An ILogger that keeps its lines (for assertions on log output).</summary>
internal sealed class ListLogger : ILogger
{
    public List<string> Lines { get; } = [];
    public List<LogLevel> Levels { get; } = [];

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        lock (Lines)
        {
            Lines.Add(formatter(state, exception));
            Levels.Add(logLevel);
        }
    }
}

/// <summary>A typed ListLogger for components that take ILogger&lt;T&gt;.</summary>
internal sealed class ListLogger<T> : ILogger<T>
{
    public ListLogger Inner { get; } = new();
    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
    public bool IsEnabled(LogLevel logLevel) => true;
    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        Inner.Log(logLevel, eventId, state, exception, formatter);
}
