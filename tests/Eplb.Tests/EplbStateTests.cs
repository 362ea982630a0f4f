using Microsoft.Extensions.Logging;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Ranks of one model in this process, routing through the real mapping kernel, driven by EplbState.</summary>
internal sealed class Cluster : IDisposable
{
    private readonly int _topK;
    private readonly Random _random;

    public Cluster(EplbOptions options, int gpus, int layers, int experts, int[] tensorSizes, Backend backend = Backend.Cpu,
        IExpertTransport? transport = null, int topK = 4, int seed = 1, string modelName = "main")
    {
        _topK = topK;
        _random = new Random(seed);
        Slots = experts + options.RedundantExperts;
        Ranks = Enumerable.Range(0, gpus).Select(r => new SimulatedRank(r, gpus, layers, experts, Slots, tensorSizes, backend)).ToArray();
        Transport = transport ?? new InProcessTransport(gpus);
        Logger = new ListLogger<EplbState>();
        State = new EplbState(options, Transport, Logger);
        Model = State.AddModel(modelName, Ranks);
    }

    public int Slots { get; }
    public SimulatedRank[] Ranks { get; }
    public IExpertTransport Transport { get; }
    public ListLogger<EplbState> Logger { get; }
    public EplbState State { get; }
    public EplbModel Model { get; }

    /// <summary>Each rank routes <paramref name="tokensPerRank"/> tokens per layer drawn from <paramref name="load"/>.</summary>
    public void Forward(Func<int, double[]> load, int tokensPerRank) => TestSupport.Forward(Ranks, _random, load, tokensPerRank, _topK);

    /// <summary>Tables, model maps and weights agree with the placement in force, on every rank and layer.</summary>
    public void AssertConsistent(string when)
    {
        var placement = Model.Placement;
        var perRank = Slots / Ranks.Length;
        foreach (var rank in Ranks)
        {
            for (var layer = 0; layer < rank.Layers; layer++)
            {
                var expected = placement.Phy2Log(layer).Slice(rank.Rank * perRank, perRank).ToArray();
                Assert.That(rank.ExpertsInWeights(layer), Is.EqualTo(expected), $"{when}: weights of rank {rank.Rank}, layer {layer}");
                Assert.That(rank.KnownPhy2Log(layer).ToArray(), Is.EqualTo(placement.Phy2Log(layer).ToArray()), $"{when}: model map, layer {layer}");
                var state = rank.LayerStates![layer];
                Assert.That(state.Log2Phy.ToArray(), Is.EqualTo(placement.Log2Phy(layer).ToArray()), $"{when}: log2phy of rank {rank.Rank}, layer {layer}");
                Assert.That(state.LogCnt.ToArray(), Is.EqualTo(placement.LogCnt(layer).ToArray()), $"{when}: logcnt of rank {rank.Rank}, layer {layer}");
            }
        }
    }

    public (float[][][][] Weights, int[][] Phy2Log) Snapshot() =>
        (Ranks.Select(r => r.Snapshot()).ToArray(), Enumerable.Range(0, Model.Layers).Select(l => Model.Placement.Phy2Log(l).ToArray()).ToArray());

    public void Dispose()
    {
        State.Dispose();
        Transport.Dispose();
        foreach (var rank in Ranks) rank.Dispose();
    }
}

/// <summary>A transport that fails the first <see cref="Failures"/> transfers, then works.</summary>
internal sealed class FaultyTransport(int ranks) : IExpertTransport
{
    private readonly InProcessTransport _inner = new(ranks);
    public int Failures { get; set; } = int.MaxValue;
    public int Ranks => _inner.Ranks;
    public IReadOnlyList<int> LocalRanks => _inner.LocalRanks;
    public TransportKind Kind => TransportKind.InProcess;

    public void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation)
    {
        if (Failures > 0)
        {
            Failures--;
            throw new IOException("link down (injected)");
        }
        _inner.Transfer(batch, weightsOf, stagingOf, cancellation);
    }

    public void AllReduceSum(Span<long> values) => _inner.AllReduceSum(values);
    public int AllReduceMin(int value) => _inner.AllReduceMin(value);
    public void Dispose() => _inner.Dispose();
}

/// <summary>The EPLB loop: step semantics, window, logging, sync/async rearrangement, faults (docs/design.md §3.2, 5).</summary>
public class EplbStateTests
{
    // Expert 15 is hot in every layer and starts only on the last rank, so rebalancing must send it elsewhere.
    private static double[] SkewedLoad(int layer) =>
        Enumerable.Range(0, 16).Select(e => e == 15 ? 60.0 : 1.0 + (e + layer) % 3).ToArray();

    private static EplbOptions Options(bool async, int window = 8, int interval = 8, int redundant = 4) => new()
    {
        UseAsync = async, WindowSize = window, StepInterval = interval, RedundantExperts = redundant, Groups = 4, Nodes = 1,
    };

    [Test]
    public void FirstRearrangementComesAfterAQuarterOfTheInterval()
    {
        using var cluster = new Cluster(Options(async: false, window: 3, interval: 8), gpus: 4, layers: 2, experts: 16, [4]);
        cluster.Forward(SkewedLoad, 64);
        cluster.State.Step();
        Assert.That(cluster.State.CompletedRearrangements, Is.Zero, "step 1");
        cluster.Forward(SkewedLoad, 64);
        cluster.State.Step();
        Assert.That(cluster.State.CompletedRearrangements, Is.EqualTo(1), "step 2 = interval / 4");
        for (var step = 3; step <= 9; step++)
        {
            cluster.Forward(SkewedLoad, 64);
            cluster.State.Step();
            Assert.That(cluster.State.CompletedRearrangements, Is.EqualTo(1), $"step {step}");
        }
        cluster.Forward(SkewedLoad, 64);
        cluster.State.Step();
        Assert.That(cluster.State.CompletedRearrangements, Is.EqualTo(2), "step 10 = 2 + interval");
        cluster.AssertConsistent("after two rearrangements");
    }

    [Test]
    public void WindowKeepsTheLastPassesAndDummyPassesRecordNothing()
    {
        using var cluster = new Cluster(Options(async: false, window: 3, interval: 1000, redundant: 0), gpus: 2, layers: 2, experts: 4, [2]);
        var slots = cluster.Slots;
        var passes = new List<long[]>();
        for (var pass = 1; pass <= 5; pass++)
        {
            var values = new long[2 * slots];
            foreach (var rank in cluster.Ranks)
                for (var layer = 0; layer < 2; layer++)
                {
                    var counts = Enumerable.Range(0, slots).Select(s => pass * 100 + rank.Rank * 10 + layer + s).ToArray();
                    rank.LayerStates![layer].Counters.CopyFrom(counts);
                    for (var s = 0; s < slots; s++) values[layer * slots + s] += counts[s];
                }
            passes.Add(values);
            cluster.State.Step();
            // A dummy pass in between: its counters (garbage) are dropped, the step counter still moves.
            foreach (var rank in cluster.Ranks) rank.LayerStates![0].Counters.Fill(999_999);
            cluster.State.Step(isDummy: true);
            Assert.That(cluster.Ranks[0].LayerStates![0].Counters.ToArray(), Is.All.Zero, "a dummy pass clears the pass counters");
        }
        Assert.That(cluster.State.StepCount, Is.EqualTo(10));
        Assert.That(cluster.Model.WindowFill, Is.EqualTo(3));
        // Wrap-around: the window holds passes 3, 4 and 5.
        var expected = Enumerable.Range(0, 2 * slots).Select(i => passes[2][i] + passes[3][i] + passes[4][i]).ToArray();
        Assert.That(cluster.Model.WindowPhysicalLoad(), Is.EqualTo(expected));
    }

    [Test]
    public void BalancednessReducesOverRanksThenSumsOverLayers()
    {
        Assert.That(Balancedness.Of([[100, 0, 0, 0], [100, 0, 0, 0]]), Is.EqualTo(0.25));
        Assert.That(Balancedness.Of([[5, 5], [1, 3]]), Is.EqualTo((5.0 + 2.0) / (5.0 + 3.0)));
        Assert.That(Balancedness.Of([[0, 0]]), Is.Zero);
    }

    [Test]
    public void LoggedBalancednessFollowsTheSpecFormat()
    {
        var options = Options(async: false, interval: 1000, redundant: 0);
        options.LogBalancedness = true;
        options.LogBalancednessInterval = 2;
        using var cluster = new Cluster(options, gpus: 4, layers: 2, experts: 16, [2]);
        // Every layer's load all on rank 0: per layer GPU loads [100, 0, 0, 0] -> 0.25.
        foreach (var layer in cluster.Ranks[0].LayerStates!)
        {
            var counts = new int[16];
            counts[0] = 100;
            layer.Counters.CopyFrom(counts);
        }
        cluster.State.Step();
        Assert.That(double.IsNaN(cluster.State.LastLoggedBalancedness), Is.True, "interval 2: nothing logged at step 1");
        foreach (var layer in cluster.Ranks[0].LayerStates!)
        {
            var counts = new int[16];
            counts[1] = 100;
            layer.Counters.CopyFrom(counts);
        }
        cluster.State.Step();
        Assert.That(cluster.State.LastLoggedBalancedness, Is.EqualTo(0.25));
        var line = cluster.Logger.Inner.Lines.Single(l => l.Contains("balancedness="));
        Assert.That(line, Does.Contain("step 2").And.Contain("avg_tokens=50.00").And.Contain("max_tokens=200.00")
            .And.Contain("balancedness=0.2500").And.Contain("steps until next rearrangement"));
    }

    [Test]
    public void StageWithoutMoeLayersStepsAndRearranges()
    {
        using var cluster = new Cluster(Options(async: true, window: 4, interval: 4), gpus: 2, layers: 0, experts: 8, [4]);
        for (var i = 0; i < 20; i++) cluster.State.Step(isDummy: i % 3 == 0);
        cluster.State.Rearrange();
        Assert.That(cluster.State.IsRearranging, Is.False);
        Assert.That(cluster.Logger.Inner.Levels, Has.None.EqualTo(LogLevel.Error).And.None.EqualTo(LogLevel.Warning));
        Assert.That(cluster.Model.Layers, Is.Zero);
    }

    [TestCase(false)]
    [TestCase(true)]
    public void RearrangementImprovesBalanceAndKeepsWeightsAndTablesConsistent(bool async)
    {
        using var cluster = new Cluster(Options(async, interval: 8), gpus: 4, layers: 3, experts: 16, [8, 3]);
        var load = new ExpertLoad(3, 16, Enumerable.Range(0, 3).SelectMany(SkewedLoad).ToArray());
        var before = cluster.Model.Placement.Balancedness(load);
        for (var step = 0; step < 12; step++)
        {
            cluster.Forward(SkewedLoad, 128);
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(TimeSpan.FromSeconds(10));
            var committedBefore = cluster.State.LayersCommitted;
            cluster.State.Step();
            Assert.That(cluster.State.LayersCommitted - committedBefore, Is.LessThanOrEqualTo(async ? 1 : 3), "async commits one layer per step");
            cluster.AssertConsistent($"after step {step + 1}");
        }
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThanOrEqualTo(1));
        Assert.That(cluster.State.FailedRearrangements, Is.Zero);
        var after = cluster.Model.Placement.Balancedness(load);
        Assert.That(after, Is.GreaterThan(before + 0.1), $"balancedness {before:F3} -> {after:F3}");
        Assert.That(cluster.State.SlotsMoved, Is.GreaterThan(0));
        Assert.That(cluster.State.BytesMoved, Is.GreaterThan(0));
        // The hot expert now has replicas beyond the last rank.
        Assert.That(cluster.Model.Placement.LogCnt(0)[15], Is.GreaterThan(1));
    }

    [TestCase(false)]
    [TestCase(true)]
    public void TransportFaultLeavesTheOldPlacementBitForBitThenRetries(bool async)
    {
        var transport = new FaultyTransport(4);
        using var cluster = new Cluster(Options(async, interval: 8), gpus: 4, layers: 2, experts: 16, [5, 2], transport: transport);
        var before = cluster.Snapshot();
        for (var step = 0; step < 2; step++)
        {
            cluster.Forward(SkewedLoad, 128);
            cluster.State.Step();
        }
        if (async)
        {
            cluster.State.WaitForStagedLayer(TimeSpan.FromSeconds(10));
            cluster.State.Step();
        }
        Assert.That(cluster.State.IsRearranging, Is.False);
        Assert.That(cluster.State.FailedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.LayersCommitted, Is.Zero);
        var after = cluster.Snapshot();
        Assert.That(after.Phy2Log, Is.EqualTo(before.Phy2Log));
        Assert.That(after.Weights, Is.EqualTo(before.Weights), "every rank's weights bit for bit");
        cluster.AssertConsistent("after the fault");
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("link down (injected)"));

        // The next interval tries again and succeeds.
        transport.Failures = 0;
        for (var step = 0; step < 8 + 4; step++)
        {
            cluster.Forward(SkewedLoad, 128);
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(TimeSpan.FromSeconds(10));
            cluster.State.Step();
        }
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThanOrEqualTo(1));
        cluster.AssertConsistent("after the retry");
    }

    [Test]
    public void CancelledAsyncRunLeavesTheOldPlacementBitForBit()
    {
        using var cluster = new Cluster(Options(async: true, interval: 8), gpus: 4, layers: 3, experts: 16, [6]);
        var before = cluster.Snapshot();
        for (var step = 0; step < 2; step++)
        {
            cluster.Forward(SkewedLoad, 128);
            cluster.State.Step();
        }
        Assert.That(cluster.State.IsRearranging, Is.True);
        cluster.State.WaitForStagedLayer(TimeSpan.FromSeconds(10));  // a layer sits staged, not committed
        cluster.State.CancelRearrangement();
        Assert.That(cluster.State.IsRearranging, Is.False);
        Assert.That(cluster.State.FailedRearrangements, Is.EqualTo(1));
        var after = cluster.Snapshot();
        Assert.That(after.Phy2Log, Is.EqualTo(before.Phy2Log));
        Assert.That(after.Weights, Is.EqualTo(before.Weights));
        cluster.AssertConsistent("after cancel");
    }

    [Test]
    public void IntervalDuringARearrangementIsSkippedOnceWithoutRunaway()
    {
        // 6 layers take 6 steps to commit; the interval of 3 falls twice meanwhile.
        using var cluster = new Cluster(Options(async: true, window: 4, interval: 3), gpus: 4, layers: 6, experts: 16, [2]);
        var maxUntil = 0;
        for (var step = 0; step < 40; step++)
        {
            cluster.Forward(SkewedLoad, 64);
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(TimeSpan.FromSeconds(10));
            cluster.State.Step();
            maxUntil = Math.Max(maxUntil, cluster.State.StepsUntilRearrangement);
            Assert.That(cluster.State.StepsUntilRearrangement, Is.InRange(1, 3), "the counter never runs away");
        }
        Assert.That(cluster.State.SkippedIntervals, Is.GreaterThan(0));
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThanOrEqualTo(2));
        Assert.That(cluster.State.FailedRearrangements, Is.Zero);
        cluster.AssertConsistent("end");
    }

    [Test]
    public void ModelsMustShareExpertCounts()
    {
        using var cluster = new Cluster(Options(async: false), gpus: 2, layers: 1, experts: 16, [2]);
        using var draft = new SimulatedRank(0, 2, 1, 16, 20, [2]);
        using var draft1 = new SimulatedRank(1, 2, 1, 16, 20, [2]);
        var draftModel = cluster.State.AddModel("draft", [draft, draft1]);
        Assert.That(draftModel.LogicalExperts, Is.EqualTo(16));
        using var other0 = new SimulatedRank(0, 2, 1, 18, 22, [2]);
        using var other1 = new SimulatedRank(1, 2, 1, 18, 22, [2]);
        var error = Assert.Throws<ArgumentException>(() => cluster.State.AddModel("other", [other0, other1]))!;
        Assert.That(error.Message, Does.Contain("identical expert counts"));
        Assert.Throws<ArgumentException>(() => cluster.State.AddModel("partial", [other0]));
    }

    [Test]
    public void InvalidOptionsFailAtConstruction()
    {
        using var transport = new InProcessTransport(2);
        var error = Assert.Throws<Microsoft.Extensions.Options.OptionsValidationException>(() =>
            new EplbState(new EplbOptions { WindowSize = -1, StepInterval = 0 }, transport))!;
        Assert.That(error.Failures, Has.Count.EqualTo(2));
        Assert.Throws<ArgumentException>(() => new EplbState(new EplbOptions { Communicator = TransportKind.Nccl, UseAsync = false }, transport));
    }

    [Test, Category("GPU")]
    public void RearrangementOnCudaBuffers()
    {
        TestSupport.RequireCuda();
        using var cluster = new Cluster(Options(async: true, interval: 8), gpus: 4, layers: 2, experts: 16, [16, 4], Backend.Cuda);
        for (var step = 0; step < 10; step++)
        {
            cluster.Forward(SkewedLoad, 256);
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(TimeSpan.FromSeconds(30));
            cluster.State.Step();
            cluster.AssertConsistent($"step {step + 1}");
        }
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThanOrEqualTo(1));
    }
}
