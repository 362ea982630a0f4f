using System.Numerics;
using Eplb.Kernels;
using Eplb.Load;
using Eplb.Migration;
using Eplb.Placement;
using Eplb.Runtime;

namespace Eplb.Balancing;

/// <summary>
/// The EPLB state of one model (a main model or a draft model) on the ranks of this process: the
/// device tables its routers read (<c>log2phy</c> <c>[L][N][Kmax]</c>, <c>logcnt</c> <c>[L][N]</c>), the per-pass
/// counters <c>[L][R]</c> they write, the load window <c>[W][L][R]</c> with 64-bit sums, one layer of
/// staging buffers and a second table set for migration, and the placement in force. Created by
/// <see cref="EplbState.AddModel"/>. <see cref="Placement"/> may be read from any thread; it changes
/// only when a layer has switched on every rank.
/// </summary>
public sealed class EplbModel : IDisposable
{
    private readonly RankState[] _ranks;
    private readonly int[][] _phy2Log;
    private readonly int _windowSize;
    private readonly HashSet<(int Rank, int Layer)> _unsyncedMaps = [];
    private int _windowSlot;
    private ExpertPlacement _placement;

    internal EplbModel(string name, IReadOnlyList<IMixtureOfExperts> localRanks, ExpertTopology topology, int windowSize, int maxReplicas,
        ReplicaSelection selection)
    {
        Name = name;
        Topology = topology;
        MaxReplicas = maxReplicas;
        _windowSize = windowSize;
        _placement = ExpertPlacement.Initial(Layers, LogicalExperts, Slots, Ranks, topology.Nodes, maxReplicas);
        _phy2Log = Enumerable.Range(0, Layers).Select(l => _placement.Phy2Log(l).ToArray()).ToArray();
        _ranks = localRanks.Select(r => new RankState(this, r, selection)).ToArray();
    }

    /// <summary>The model's name (for logs).</summary>
    public string Name { get; }

    /// <summary>L, N, R, G, nodes and groups of the model under EPLB.</summary>
    public ExpertTopology Topology { get; }

    /// <summary>L, MoE layers on this stage (may be 0).</summary>
    public int Layers => Topology.Layers;

    /// <summary>N, logical experts per layer.</summary>
    public int LogicalExperts => Topology.LogicalExperts;

    /// <summary>R, physical slots per layer.</summary>
    public int Slots => Topology.Slots;

    /// <summary>G, expert-parallel ranks.</summary>
    public int Ranks => Topology.Ranks;

    /// <summary>R / G.</summary>
    public int SlotsPerRank => Topology.SlotsPerRank;

    /// <summary>Kmax, the fixed capacity of a log2phy row.</summary>
    public int MaxReplicas { get; }

    /// <summary>The placement in force: every layer's committed slot assignment.</summary>
    public ExpertPlacement Placement => _placement;

    /// <summary>Passes recorded in the window so far (at most the window size).</summary>
    public int WindowFill { get; private set; }

    /// <summary>The EPLB views of local rank <paramref name="rank"/>'s layers (what its routers hold).</summary>
    public IReadOnlyList<EplbLayerState> LayerStates(int rank) => RankOf(rank).LayerStates;

    /// <summary>The load window's 64-bit per-slot sums of the local ranks, added up, <c>[L * R]</c>.</summary>
    public long[] WindowPhysicalLoad() => SumOverLocalRanks(rank => rank.Sums);

    /// <summary>The current pass's counters of the local ranks, added up, <c>[L * R]</c> (a host copy).</summary>
    public long[] PassPhysicalLoad() => SumOverLocalRanks(rank => rank.Counters);

    private long[] SumOverLocalRanks<T>(Func<RankState, DeviceBuffer<T>> perSlot) where T : unmanaged, IBinaryInteger<T>
    {
        var total = new long[(long)Layers * Slots];
        var part = new T[total.Length];
        foreach (var rank in _ranks)
        {
            perSlot(rank).CopyTo(part, 0, rank.Model.Stream);
            for (var i = 0; i < total.Length; i++) total[i] += long.CreateTruncating(part[i]);
        }
        return total;
    }

    /// <summary>Per-layer rank loads <c>[L][G]</c> of per-slot loads <c>[L * R]</c>: each rank's slots added up (docs/design.md §1).</summary>
    public double[][] RankLoads(ReadOnlySpan<long> physical)
    {
        if (physical.Length != Layers * Slots) throw new ArgumentException($"{physical.Length} values for {Layers} x {Slots} slots", nameof(physical));
        var loads = new double[Layers][];
        for (var l = 0; l < Layers; l++)
        {
            var gpu = loads[l] = new double[Ranks];
            for (var s = 0; s < Slots; s++) gpu[s / SlotsPerRank] += physical[l * Slots + s];
        }
        return loads;
    }

    /// <summary>
    /// Folds per-slot loads <c>[L * R]</c> into logical loads through the placement in force: the
    /// slots of one expert add up (docs/design.md §3.2).
    /// </summary>
    public ExpertLoad ToLogical(ReadOnlySpan<long> physical)
    {
        if (physical.Length != Layers * Slots) throw new ArgumentException($"{physical.Length} values for {Layers} x {Slots} slots", nameof(physical));
        var logical = new double[Layers * LogicalExperts];
        for (var l = 0; l < Layers; l++)
        {
            var phy2log = _phy2Log[l];
            for (var s = 0; s < Slots; s++) logical[l * LogicalExperts + phy2log[s]] += physical[l * Slots + s];
        }
        return new ExpertLoad(Layers, LogicalExperts, logical);
    }

    internal IReadOnlyList<RankState> RankStates => _ranks;

    internal RankState RankOf(int rank) =>
        _ranks.FirstOrDefault(r => r.Model.Rank == rank) ?? throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is not local to this process");

    /// <summary>Pushes this pass's counters into the window (or drops them for a dummy pass).</summary>
    internal void EndPass(bool dummy)
    {
        if (Layers == 0) return;
        foreach (var rank in _ranks) rank.EndPass(dummy, _windowSlot);
        if (dummy) return;
        _windowSlot = (_windowSlot + 1) % _windowSize;
        WindowFill = Math.Min(WindowFill + 1, _windowSize);
    }

    internal IReadOnlyList<ExpertTensor> Weights(int rank, int layer) => RankOf(rank).Model.GetExpertWeights(layer);

    /// <summary>
    /// Builds <paramref name="layer"/>'s new placement on every local rank without touching what
    /// the routers read: the model's weight tensors are looked up and the staging sets made ready
    /// first, then the changed slots are staged (<see cref="LayerMigrator.Stage"/>: old weights only
    /// read), then the new tables go into each rank's second table set. Any fault leaves the layer as
    /// it was. Runs on the background worker in async mode.
    /// </summary>
    internal StagedLayer StageLayer(int layer, LayerMigrationPlan plan, ExpertPlacement target, IExpertTransport transport,
        CancellationToken cancellation, CopyProbe? probe)
    {
        var ranks = new StagedRank[_ranks.Length];
        for (var i = 0; i < _ranks.Length; i++)
        {
            var rank = _ranks[i];
            var weights = rank.Model.GetExpertWeights(layer);
            cancellation.ThrowIfCancellationRequested();
            ranks[i] = new StagedRank(rank, weights, rank.StagingFor(weights));
        }
        // The previous commit's swaps and table copies, queued on each rank's stream, read and write this
        // staging set: let them finish before it is reused (this waits on the staging thread, not the forward one).
        foreach (var rank in ranks) rank.Rank.Model.Stream.Synchronize();
        StagedRank Of(int rank) => ranks.First(r => r.Rank.Model.Rank == rank);
        LayerMigrator.StageCore(plan, transport, r => Of(r).Weights, r => Of(r).Staging.Weights, cancellation, streamOf: null, probe);
        var log2phy = target.Log2Phy(layer);
        var logcnt = target.LogCnt(layer);
        foreach (var rank in ranks)
        {
            cancellation.ThrowIfCancellationRequested();
            rank.Staging.Log2Phy.CopyFrom(log2phy);
            rank.Staging.LogCnt.CopyFrom(logcnt);
        }
        var bytesPerExpert = ranks.Length == 0 ? 0 : ranks[0].Weights.Sum(w => w.BytesPerExpert);
        return new StagedLayer(layer, plan, target.Phy2Log(layer).ToArray(), ranks, plan.BytesToMove(bytesPerExpert));
    }

    /// <summary>
    /// Switches a staged layer on every local rank, all or nothing, and agrees on it with every other
    /// process. Order and undo (docs/design.md §5): (1) the weights of the changed slots are swapped
    /// with the staging buffer (<see cref="LayerMigrator.Exchange"/>; undo: copy back), (2) each rank's
    /// tables are copied from its second table set (undo: write the tables of the placement in force),
    /// (3) each rank's model hears <see cref="IMixtureOfExperts.UpdateExpertMap"/> (undo: tell it the
    /// old map). Every copy is queued on the rank's stream, so a pass queued before sees the old layer
    /// and one queued after sees the new one (or, after an undo, the old one again). (4) Every process
    /// votes (<see cref="IExpertTransport.AllReduceMin"/>); only when all succeeded is the host view
    /// (<see cref="Placement"/>) switched, which cannot fail. Otherwise every step taken is undone, last
    /// first, and the fault is thrown: the layer is old everywhere.
    /// </summary>
    /// <exception cref="LayerCommitException">The layer was not switched (the old placement stands); <see cref="LayerCommitException.Unrestored"/> lists what could not be undone.</exception>
    internal void CommitLayer(StagedLayer staged, IExpertTransport transport, CopyProbe? probe)
    {
        var layer = staged.Layer;
        var plan = staged.Plan;
        var oldPhy2Log = _phy2Log[layer];
        var undo = new Stack<(string What, Action Run)>();
        Exception? fault = null;
        StagedRank Of(int rank) => staged.Ranks.First(r => r.Rank.Model.Rank == rank);
        var localRanks = staged.Ranks.Select(r => r.Rank.Model.Rank).ToArray();
        try
        {
            // (1) Weights: all or nothing inside Exchange; once done, Revert is its undo.
            LayerMigrator.ExchangeCore(plan, localRanks, r => Of(r).Weights, r => Of(r).Staging.Weights, r => Of(r).Staging.Scratch,
                r => RankOf(r).Model.Stream, probe);
            undo.Push(("weights", () => LayerMigrator.Revert(plan, localRanks, r => Of(r).Weights, r => Of(r).Staging.Weights, r => RankOf(r).Model.Stream)));
            // (2) Tables, rank by rank; the undo is pushed first because a failed copy may be partial.
            foreach (var rank in staged.Ranks)
            {
                var state = rank.Rank;
                var stream = state.Model.Stream;
                undo.Push(($"tables of rank {state.Model.Rank}", () => WriteTables(state, layer, _placement)));
                probe?.Invoke(CopyPoint.CommitTables, state.Model.Rank);
                state.Log2Phy.CopyFrom(rank.Staging.Log2Phy, 0, (long)layer * LogicalExperts * MaxReplicas, (long)LogicalExperts * MaxReplicas, stream);
                probe?.Invoke(CopyPoint.CommitTables, state.Model.Rank);
                state.LogCnt.CopyFrom(rank.Staging.LogCnt, 0, (long)layer * LogicalExperts, LogicalExperts, stream);
            }
            // (3) The model hooks; a hook that throws may have applied part of the map, so it hears the old one again too.
            foreach (var rank in staged.Ranks)
            {
                var model = rank.Rank.Model;
                undo.Push(($"model map of rank {model.Rank}", () => TellMap(model, layer, oldPhy2Log)));
                model.UpdateExpertMap(layer, staged.Phy2Log);
            }
        }
        catch (Exception e)
        {
            fault = e;
        }

        // (4) Every process switched its ranks, or none keeps the layer.
        var agreed = false;
        try
        {
            agreed = transport.AllReduceMin(fault is null ? 1 : 0) == 1;
        }
        catch (Exception e)
        {
            fault ??= e;
        }
        if (agreed)
        {
            _phy2Log[layer] = staged.Phy2Log;
            _placement = ExpertPlacement.FromPhy2Log(_phy2Log, LogicalExperts, Ranks, _placement.Nodes, MaxReplicas);
            return;
        }

        var unrestored = new List<string>();
        while (undo.Count > 0)
        {
            var (what, run) = undo.Pop();
            try
            {
                run();
            }
            catch (Exception e)
            {
                unrestored.Add($"{what}: {e.Message}");
            }
        }
        fault ??= new InvalidOperationException($"another rank could not switch layer {layer}; it keeps its placement on every rank");
        throw new LayerCommitException(layer, fault, unrestored);
    }

    private void WriteTables(RankState rank, int layer, ExpertPlacement placement)
    {
        rank.Log2Phy.CopyFrom(placement.Log2Phy(layer), (long)layer * LogicalExperts * MaxReplicas, rank.Model.Stream);
        rank.LogCnt.CopyFrom(placement.LogCnt(layer), (long)layer * LogicalExperts, rank.Model.Stream);
    }

    // Tells a model a layer's map; when it throws, the map is told again at every Step until it takes it.
    private void TellMap(IMixtureOfExperts model, int layer, int[] phy2Log)
    {
        try
        {
            model.UpdateExpertMap(layer, phy2Log);
        }
        catch
        {
            lock (_unsyncedMaps) _unsyncedMaps.Add((model.Rank, layer));
            throw;
        }
    }

    /// <summary>(rank, layer) pairs whose model map could not be told the placement in force (a hook that threw while being restored).</summary>
    internal int UnsyncedMaps
    {
        get
        {
            lock (_unsyncedMaps) return _unsyncedMaps.Count;
        }
    }

    /// <summary>Tells every model whose restore failed the map in force again; returns the faults of those that still fail.</summary>
    internal List<(int Rank, int Layer, Exception Fault)> ResyncMaps()
    {
        var failures = new List<(int, int, Exception)>();
        (int Rank, int Layer)[] pending;
        lock (_unsyncedMaps) pending = [.. _unsyncedMaps];
        foreach (var (rank, layer) in pending)
        {
            try
            {
                RankOf(rank).Model.UpdateExpertMap(layer, _phy2Log[layer]);
                lock (_unsyncedMaps) _unsyncedMaps.Remove((rank, layer));
            }
            catch (Exception e)
            {
                failures.Add((rank, layer, e));
            }
        }
        return failures;
    }

    /// <summary>
    /// Sets aside every local rank's staging set (an abandoned transfer may still write into it): the
    /// next stage allocates fresh ones, and the returned buffers are released by whoever ends the transfer.
    /// </summary>
    internal IDisposable DetachStaging()
    {
        var detached = _ranks.Select(r => r.DetachStaging()).OfType<StagingSet>().ToArray();
        return new DisposeAll(detached);
    }

    private sealed class DisposeAll(IReadOnlyList<IDisposable> items) : IDisposable
    {
        public void Dispose()
        {
            foreach (var item in items) item.Dispose();
        }
    }

    /// <summary>Releases the device tables, the window and the staging buffers.</summary>
    public void Dispose()
    {
        foreach (var rank in _ranks) rank.Dispose();
    }

    /// <summary>One local rank's buffers.</summary>
    internal sealed class RankState : IDisposable
    {
        private readonly EplbModel _owner;
        private readonly DeviceBuffer<int> _window;
        private StagingSet? _staging;

        public RankState(EplbModel owner, IMixtureOfExperts model, ReplicaSelection selection)
        {
            _owner = owner;
            Model = model;
            var backend = model.Backend;
            var layers = owner.Layers;
            var placement = owner._placement;
            Log2Phy = new DeviceBuffer<int>(backend, placement.Log2PhyTable);
            LogCnt = new DeviceBuffer<int>(backend, placement.LogCntTable);
            Counters = new DeviceBuffer<int>(backend, (long)layers * owner.Slots);
            Counters.Fill(0, stream: model.Stream);
            RecordFlag = new DeviceBuffer<int>(backend, [1]);
            _window = new DeviceBuffer<int>(backend, (long)owner._windowSize * layers * owner.Slots);
            _window.Fill(0, stream: model.Stream);
            Sums = new DeviceBuffer<long>(backend, (long)layers * owner.Slots);
            Sums.Fill(0, stream: model.Stream);
            LayerStates = Enumerable.Range(0, layers).Select(l => new EplbLayerState(
                Log2Phy.Slice((long)l * owner.LogicalExperts * owner.MaxReplicas, (long)owner.LogicalExperts * owner.MaxReplicas),
                LogCnt.Slice((long)l * owner.LogicalExperts, owner.LogicalExperts),
                Counters.Slice((long)l * owner.Slots, owner.Slots),
                RecordFlag, owner.LogicalExperts, owner.MaxReplicas, owner.Slots, selection, owner.Topology.Nodes, owner.Topology.NodeOfRank(model.Rank))).ToArray();
        }

        public IMixtureOfExperts Model { get; }
        public DeviceBuffer<int> Log2Phy { get; }
        public DeviceBuffer<int> LogCnt { get; }
        public DeviceBuffer<int> Counters { get; }
        public DeviceBuffer<int> RecordFlag { get; }
        public DeviceBuffer<long> Sums { get; }
        public IReadOnlyList<EplbLayerState> LayerStates { get; }

        public void EndPass(bool dummy, int slot)
        {
            if (dummy) LoadWindow.Discard(Model.Stream, Counters);
            else LoadWindow.Push(Model.Stream, Counters, _window, Sums, _owner._windowSize, slot);
        }

        /// <summary>
        /// The staging set for a layer whose tensors are <paramref name="weights"/>: allocated once per
        /// tensor layout and reused layer by layer.
        /// </summary>
        public StagingSet StagingFor(IReadOnlyList<ExpertTensor> weights)
        {
            var staging = _staging;
            if (staging != null && staging.Fits(weights)) return staging;
            _staging = null;
            if (staging != null)
            {
                Model.Stream.Synchronize();  // a commit's queued copies may still read the old set
                staging.Dispose();
            }
            return _staging = new StagingSet(Model.Backend, weights, _owner.LogicalExperts, _owner.MaxReplicas);
        }

        public StagingSet? DetachStaging()
        {
            var staging = _staging;
            _staging = null;
            return staging;
        }

        public void Dispose()
        {
            try
            {
                Model.Stream.Synchronize();  // queued commits may still read the tables and the staging set
            }
            catch (Exception)
            {
                // A failed device: its memory goes anyway.
            }
            Log2Phy.Dispose();
            LogCnt.Dispose();
            Counters.Dispose();
            RecordFlag.Dispose();
            _window.Dispose();
            Sums.Dispose();
            _staging?.Dispose();
        }
    }

    /// <summary>
    /// One rank's buffers for staging a layer: R/G experts of each weight tensor, one scratch expert
    /// of each (the commit swaps through it), and the second table set (<c>log2phy</c> <c>[N][Kmax]</c>,
    /// <c>logcnt</c> <c>[N]</c>) the commit copies the layer's tables from.
    /// </summary>
    internal sealed class StagingSet : IDisposable
    {
        private readonly List<DeviceBuffer<byte>> _buffers = [];

        public StagingSet(Backend backend, IReadOnlyList<ExpertTensor> layout, int logicalExperts, int maxReplicas)
        {
            var weights = new List<ExpertTensor>();
            var scratch = new List<ExpertTensor>();
            try
            {
                foreach (var tensor in layout)
                {
                    var buffer = Allocate(backend, tensor.BytesPerExpert * tensor.SlotsPerRank);
                    weights.Add(ExpertTensor.Create(tensor.Name, buffer.AsSlice(), tensor.SlotsPerRank));
                    scratch.Add(ExpertTensor.Create(tensor.Name, Allocate(backend, tensor.BytesPerExpert).AsSlice(), 1));
                }
                Log2Phy = new DeviceBuffer<int>(backend, (long)logicalExperts * maxReplicas);
                LogCnt = new DeviceBuffer<int>(backend, logicalExperts);
            }
            catch
            {
                Dispose();
                throw;
            }
            Weights = weights;
            Scratch = scratch;
        }

        public IReadOnlyList<ExpertTensor> Weights { get; } = [];
        public IReadOnlyList<ExpertTensor> Scratch { get; } = [];
        public DeviceBuffer<int> Log2Phy { get; } = null!;
        public DeviceBuffer<int> LogCnt { get; } = null!;

        public bool Fits(IReadOnlyList<ExpertTensor> layout) =>
            Weights.Count == layout.Count && Weights.Zip(layout).All(p => p.First.SameLayout(p.Second) && p.First.SlotsPerRank == p.Second.SlotsPerRank);

        private DeviceBuffer<byte> Allocate(Backend backend, long bytes)
        {
            var buffer = new DeviceBuffer<byte>(backend, bytes);
            _buffers.Add(buffer);
            return buffer;
        }

        public void Dispose()
        {
            foreach (var buffer in _buffers) buffer.Dispose();
            _buffers.Clear();
            Log2Phy?.Dispose();
            LogCnt?.Dispose();
        }
    }

    /// <summary>One local rank's part of a staged layer: its weight tensors and the staging set holding the new layer.</summary>
    internal sealed record StagedRank(RankState Rank, IReadOnlyList<ExpertTensor> Weights, StagingSet Staging);

    /// <summary>A layer staged on every local rank, not yet visible to any router.</summary>
    internal sealed record StagedLayer(int Layer, LayerMigrationPlan Plan, int[] Phy2Log, IReadOnlyList<StagedRank> Ranks, long BytesToMove);
}

/// <summary>
/// A layer's commit did not happen: the layer keeps its old placement on every rank (weights, tables,
/// model maps). <see cref="Exception.InnerException"/> is the fault; <see cref="Unrestored"/> lists any
/// step whose undo failed as well (empty when the layer is whole).
/// </summary>
public sealed class LayerCommitException : Exception
{
    internal LayerCommitException(int layer, Exception fault, IReadOnlyList<string> unrestored)
        : base($"layer {layer} was not switched ({fault.Message})" +
               (unrestored.Count == 0 ? "; it keeps its placement" : $"; could not restore: {string.Join("; ", unrestored)}"), fault)
    {
        Layer = layer;
        Unrestored = unrestored;
    }

    /// <summary>The layer (index in the model's MoE layers).</summary>
    public int Layer { get; }

    /// <summary>Undo steps that failed too (a weight copy, a table write, a model hook); empty when the old layer is whole.</summary>
    public IReadOnlyList<string> Unrestored { get; }
}
