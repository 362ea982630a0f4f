using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Where a test makes a rearrangement fail.</summary>
public enum Fault
{
    /// <summary>The model's GetExpertWeights (staging; the background worker in async mode).</summary>
    GetExpertWeights,
    /// <summary>The model's UpdateExpertMap, before it applies the map.</summary>
    UpdateExpertMap,
    /// <summary>The model's UpdateExpertMap, after it applied the map.</summary>
    UpdateExpertMapAfterApplying,
    /// <summary>A transfer batch of the transport.</summary>
    Transfer,
    /// <summary>AllReduceSum (planning, the balancedness log).</summary>
    AllReduceSum,
    /// <summary>AllReduceMin (the votes).</summary>
    AllReduceMin,
    /// <summary>A local copy while staging.</summary>
    StageCopy,
    /// <summary>A fan-out copy while staging.</summary>
    FanOutCopy,
    /// <summary>One of the copies of a weight slot's swap at commit.</summary>
    WeightCopy,
    /// <summary>A table copy at commit.</summary>
    TableCopy,
}

/// <summary>The exception an armed fault throws.</summary>
public sealed class InjectedFault(Fault point, int call) : Exception($"injected fault at {point}, call {call}")
{
    /// <summary>Where it was thrown.</summary>
    public Fault Point { get; } = point;
}

/// <summary>Counts calls at each fault point and throws at the armed ones (thread-safe: the worker stages).</summary>
internal sealed class FaultInjector
{
    private readonly Dictionary<Fault, int> _calls = [];
    private readonly List<(Fault Point, int Call)> _armed = [];

    /// <summary>Faults thrown so far.</summary>
    public List<InjectedFault> Fired { get; } = [];

    /// <summary>Throws at call <paramref name="call"/> (1-based) of <paramref name="point"/>.</summary>
    public void Arm(Fault point, int call)
    {
        lock (_calls) _armed.Add((point, call));
    }

    public int Calls(Fault point)
    {
        lock (_calls) return _calls.GetValueOrDefault(point);
    }

    public void Hit(Fault point)
    {
        InjectedFault? fault = null;
        lock (_calls)
        {
            var call = _calls[point] = _calls.GetValueOrDefault(point) + 1;
            if (_armed.Remove((point, call)))
            {
                fault = new InjectedFault(point, call);
                Fired.Add(fault);
            }
        }
        if (fault != null) throw fault;
    }

    // UpdateExpertMap has two modes: the call index counts both.
    public void HitMap(Action apply)
    {
        InjectedFault? fault = null;
        var after = false;
        lock (_calls)
        {
            var call = _calls[Fault.UpdateExpertMap] = _calls.GetValueOrDefault(Fault.UpdateExpertMap) + 1;
            if (_armed.Remove((Fault.UpdateExpertMap, call))) fault = new InjectedFault(Fault.UpdateExpertMap, call);
            else if (_armed.Remove((Fault.UpdateExpertMapAfterApplying, call)))
            {
                fault = new InjectedFault(Fault.UpdateExpertMapAfterApplying, call);
                after = true;
            }
            if (fault != null) Fired.Add(fault);
        }
        if (fault != null && !after) throw fault;
        apply();
        if (fault != null) throw fault;
    }

    public CopyProbe Probe => (point, _) => Hit(point switch
    {
        CopyPoint.StageLocal => Fault.StageCopy,
        CopyPoint.StageFanOut => Fault.FanOutCopy,
        CopyPoint.CommitWeights => Fault.WeightCopy,
        _ => Fault.TableCopy,
    });
}

/// <summary>A simulated rank whose GetExpertWeights and UpdateExpertMap fail where the injector says.</summary>
internal sealed class FaultyRank(SimulatedRank inner, FaultInjector faults) : IMixtureOfExperts
{
    public SimulatedRank Inner => inner;
    public int Rank => inner.Rank;
    public int Layers => inner.Layers;
    public int LogicalExperts => inner.LogicalExperts;
    public int Slots => inner.Slots;
    public int SlotsPerRank => inner.SlotsPerRank;
    public Backend Backend => inner.Backend;
    public ComputeStream Stream => inner.Stream;

    public IReadOnlyList<ExpertTensor> GetExpertWeights(int layer)
    {
        faults.Hit(Fault.GetExpertWeights);
        return inner.GetExpertWeights(layer);
    }

    public void SetEplbState(IReadOnlyList<EplbLayerState> layers) => inner.SetEplbState(layers);

    public void UpdateExpertMap(int layer, ReadOnlySpan<int> phy2Log)
    {
        var map = phy2Log.ToArray();
        faults.HitMap(() => inner.UpdateExpertMap(layer, map));
    }
}

/// <summary>
/// An in-process transport whose calls fail where the injector says; optionally slow (random delays,
/// for timing independence) or deaf to cancellation (blocks a transfer until released).
/// </summary>
internal sealed class InjectingTransport(int ranks, FaultInjector faults) : IExpertTransport
{
    private readonly InProcessTransport _inner = new(ranks);
    private readonly Random _random = new(Random.Shared.Next());

    /// <summary>Up to this many ms of sleep before each transfer (0: none).</summary>
    public int MaxDelayMs { get; set; }

    /// <summary>When set, a transfer blocks (ignoring its token) until this is set again by the test.</summary>
    public ManualResetEventSlim? Deaf { get; set; }

    /// <summary>Transfers that were blocked by <see cref="Deaf"/>.</summary>
    public int Blocked;

    public int Ranks => _inner.Ranks;
    public IReadOnlyList<int> LocalRanks => _inner.LocalRanks;
    public TransportKind Kind => TransportKind.InProcess;

    public void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation)
    {
        faults.Hit(Fault.Transfer);
        if (MaxDelayMs > 0)
        {
            int delay;
            lock (_random) delay = _random.Next(MaxDelayMs + 1);
            Thread.Sleep(delay);
        }
        if (Deaf is { IsSet: false } deaf)
        {
            Interlocked.Increment(ref Blocked);
            deaf.Wait();  // ignores the token, as a transfer stuck in a driver would
            foreach (var transfer in batch)
            {
                // It still writes when it wakes up: into whatever staging it was given.
                var source = weightsOf(transfer.SourceRank);
                var destination = stagingOf(transfer.DestinationRank);
                for (var t = 0; t < destination.Count; t++) destination[t].CopySlotFrom(source[t], transfer.SourceSlot, transfer.DestinationSlot);
            }
            return;
        }
        _inner.Transfer(batch, weightsOf, stagingOf, cancellation);
    }

    public void AllReduceSum(Span<long> values)
    {
        faults.Hit(Fault.AllReduceSum);
        _inner.AllReduceSum(values);
    }

    public int AllReduceMin(int value)
    {
        faults.Hit(Fault.AllReduceMin);
        return _inner.AllReduceMin(value);
    }

    public void Dispose() => _inner.Dispose();
}

/// <summary>
/// Ranks of one model in this process behind fault-injecting wrappers, driven by EplbState, with the
/// checks of issue 13 §1: the four views of a layer (weights, device tables, model map,
/// Model.Placement) agree slot by slot, and routed tokens land on the weights of their expert.
/// </summary>
internal sealed class FaultCluster : IDisposable
{
    private readonly int _topK;
    private readonly Random _random;

    public FaultCluster(EplbOptions options, int gpus = 4, int layers = 3, int experts = 16, int[]? tensorSizes = null, int topK = 4, int seed = 1,
        Backend backend = Backend.Cpu)
    {
        _topK = topK;
        _random = new Random(seed);
        Slots = experts + options.RedundantExperts;
        Faults = new FaultInjector();
        Ranks = Enumerable.Range(0, gpus).Select(r => new SimulatedRank(r, gpus, layers, experts, Slots, tensorSizes ?? [3, 2], backend)).ToArray();
        Models = Ranks.Select(r => new FaultyRank(r, Faults)).ToArray();
        Transport = new InjectingTransport(gpus, Faults);
        Logger = new ListLogger<EplbState>();
        State = new EplbState(options, Transport, Logger) { CopyProbe = Faults.Probe };
        State.RearrangementEnded += (_, e) =>
        {
            lock (Events) Events.Add(e);
        };
        Model = State.AddModel("main", Models);
    }

    public int Slots { get; }
    public FaultInjector Faults { get; }
    public SimulatedRank[] Ranks { get; }
    public FaultyRank[] Models { get; }
    public InjectingTransport Transport { get; }
    public ListLogger<EplbState> Logger { get; }
    public EplbState State { get; }
    public EplbModel Model { get; }
    public List<RearrangementEventArgs> Events { get; } = [];

    /// <summary>Expert 15 hot in every layer, starting only on the last rank.</summary>
    public static double[] SkewedLoad(int layer) =>
        Enumerable.Range(0, 16).Select(e => e == 15 ? 60.0 : 1.0 + (e + layer) % 3).ToArray();

    /// <summary>
    /// Two hot experts per layer that move every 8 passes: every rearrangement then needs local
    /// copies, transfers and fan-outs (a rank taking two replicas of an expert it lacked).
    /// </summary>
    public static Func<int, double[]> Drifting(int step) => layer =>
    {
        var phase = step / 8;
        return Enumerable.Range(0, 16).Select(e => e == (phase + layer * 5) % 16 || e == (phase * 3 + 7) % 16 ? 60.0 : 1.0 + (e + layer) % 3).ToArray();
    };

    /// <summary>Each rank routes <paramref name="tokensPerRank"/> tokens per layer drawn from <paramref name="load"/>.</summary>
    public void Forward(Func<int, double[]> load, int tokensPerRank = 64) => TestSupport.Forward(Ranks, _random, load, tokensPerRank, _topK);

    /// <summary>Runs one pass (forward, then Step; Step must not throw) and checks every view.</summary>
    public void Pass(string when, Func<int, double[]>? load = null, bool checkRouting = true)
    {
        Forward(load ?? SkewedLoad);
        State.Step();
        AssertViewsAgree(when);
        if (checkRouting) AssertTokensHitTheirExpertsWeights(when);
    }

    /// <summary>
    /// Weights, device tables and model map of every rank and layer describe Model.Placement, slot by
    /// slot. The one exception EPLB documents: a model hook that refused to be told the old map back
    /// (two faults in one commit) disagrees until the next step tells it again.
    /// </summary>
    public void AssertViewsAgree(string when)
    {
        var checkMaps = Model.UnsyncedMaps == 0;
        foreach (var rank in Ranks) rank.Stream.Synchronize();  // CUDA: the commit's copies are queued on the rank's stream
        var placement = Model.Placement;
        var perRank = Slots / Ranks.Length;
        foreach (var rank in Ranks)
        {
            for (var layer = 0; layer < rank.Layers; layer++)
            {
                var expected = placement.Phy2Log(layer).ToArray();
                Assert.That(rank.ExpertsInWeights(layer), Is.EqualTo(expected[(rank.Rank * perRank)..((rank.Rank + 1) * perRank)]),
                    $"{when}: weights of rank {rank.Rank}, layer {layer}");
                if (checkMaps)
                    Assert.That(rank.KnownPhy2Log(layer).ToArray(), Is.EqualTo(expected), $"{when}: model map of rank {rank.Rank}, layer {layer}");
                var state = rank.LayerStates![layer];
                Assert.That(state.Log2Phy.ToArray(), Is.EqualTo(placement.Log2Phy(layer).ToArray()), $"{when}: log2phy of rank {rank.Rank}, layer {layer}");
                Assert.That(state.LogCnt.ToArray(), Is.EqualTo(placement.LogCnt(layer).ToArray()), $"{when}: logcnt of rank {rank.Rank}, layer {layer}");
            }
        }
    }

    /// <summary>
    /// Real tokens through every rank's EplbLayerState (the routing epilogue's mapping kernel): each
    /// physical slot a token lands on holds, in every tensor, exactly its logical expert's values.
    /// </summary>
    public void AssertTokensHitTheirExpertsWeights(string when, int tokens = 48)
    {
        var perRank = Slots / Ranks.Length;
        var random = new Random(tokens);
        for (var layer = 0; layer < Model.Layers; layer++)
        {
            var held = Ranks.Select(r => r.ExpertsInWeights(layer)).ToArray();
            var layerLoad = SkewedLoad(layer);
            foreach (var rank in Ranks)
            {
                var ids = TestSupport.SampleTopK(random, layerLoad, tokens, _topK);
                using var idBuffer = new DeviceBuffer<int>(rank.Backend, ids);
                using var physicalBuffer = new DeviceBuffer<int>(rank.Backend, ids.Length);
                ExpertMapping.MapToPhysical(rank.Stream, idBuffer, _topK, rank.LayerStates![layer], physicalBuffer);
                var physical = physicalBuffer.ToArray(rank.Stream);
                for (var i = 0; i < ids.Length; i++)
                {
                    var slot = physical[i];
                    Assert.That(slot, Is.InRange(0, Slots - 1), $"{when}: layer {layer}, rank {rank.Rank}: token {i / _topK} was dropped");
                    Assert.That(held[slot / perRank][slot % perRank], Is.EqualTo(ids[i]),
                        $"{when}: layer {layer}: rank {rank.Rank} sends expert {ids[i]} to slot {slot}, whose weights are expert {held[slot / perRank][slot % perRank]}'s");
                }
            }
        }
    }

    public (float[][][][] Weights, int[][] Phy2Log) Snapshot() =>
        (Ranks.Select(r => r.Snapshot()).ToArray(), Enumerable.Range(0, Model.Layers).Select(l => Model.Placement.Phy2Log(l).ToArray()).ToArray());

    public void Dispose()
    {
        Transport.Deaf?.Set();
        State.Dispose();
        Transport.Dispose();
        foreach (var rank in Ranks) rank.Dispose();
    }
}
