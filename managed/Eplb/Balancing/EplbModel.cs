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
/// staging buffers for migration, and the placement in force. Created by <see cref="EplbState.AddModel"/>.
/// </summary>
public sealed class EplbModel : IDisposable
{
    private readonly RankState[] _ranks;
    private readonly int[][] _phy2Log;
    private readonly int _windowSize;
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

    /// <summary>Staging-buffer accessor of a local rank for a layer (same layout as its weights).</summary>
    internal IReadOnlyList<ExpertTensor> Staging(int rank, int layer) => RankOf(rank).Staging(layer);

    internal IReadOnlyList<ExpertTensor> Weights(int rank, int layer) => RankOf(rank).Model.GetExpertWeights(layer);

    /// <summary>
    /// Makes <paramref name="newPhy2Log"/> the layer's placement on every local rank: changed slots from
    /// staging into the weights, then the tables in place (addresses unchanged), then the model hook.
    /// The caller has staged the layer (or the plan moves nothing).
    /// </summary>
    internal void CommitLayer(int layer, LayerMigrationPlan plan, ReadOnlySpan<int> newPhy2Log, ReadOnlySpan<int> newLog2Phy,
        ReadOnlySpan<int> newLogCnt)
    {
        var phy2log = newPhy2Log.ToArray();
        LayerMigrator.Commit(plan, _ranks.Select(r => r.Model.Rank).ToArray(), r => Weights(r, layer), r => Staging(r, layer),
            r => RankOf(r).Model.Stream);
        foreach (var rank in _ranks)
        {
            rank.Log2Phy.CopyFrom(newLog2Phy, (long)layer * LogicalExperts * MaxReplicas, rank.Model.Stream);
            rank.LogCnt.CopyFrom(newLogCnt, (long)layer * LogicalExperts, rank.Model.Stream);
            rank.Model.UpdateExpertMap(layer, phy2log);
        }
        _phy2Log[layer] = phy2log;
        _placement = ExpertPlacement.FromPhy2Log(_phy2Log, LogicalExperts, Ranks, _placement.Nodes, MaxReplicas);
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
        private readonly List<DeviceBuffer<byte>> _stagingBuffers = [];
        private IReadOnlyList<ExpertTensor>? _staging;

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

        /// <summary>One layer's worth of staging, allocated once per tensor layout and reused layer by layer.</summary>
        public IReadOnlyList<ExpertTensor> Staging(int layer)
        {
            var weights = Model.GetExpertWeights(layer);
            if (_staging != null && _staging.Count == weights.Count && _staging.Zip(weights).All(p => p.First.SameLayout(p.Second)))
                return _staging;
            foreach (var buffer in _stagingBuffers) buffer.Dispose();
            _stagingBuffers.Clear();
            var tensors = new List<ExpertTensor>();
            foreach (var tensor in weights)
            {
                var buffer = new DeviceBuffer<byte>(Model.Backend, tensor.BytesPerExpert * tensor.SlotsPerRank);
                _stagingBuffers.Add(buffer);
                tensors.Add(ExpertTensor.Create(tensor.Name, buffer.AsSlice(), tensor.SlotsPerRank));
            }
            return _staging = tensors;
        }

        public void Dispose()
        {
            Log2Phy.Dispose();
            LogCnt.Dispose();
            Counters.Dispose();
            RecordFlag.Dispose();
            _window.Dispose();
            Sums.Dispose();
            foreach (var buffer in _stagingBuffers) buffer.Dispose();
        }
    }
}
