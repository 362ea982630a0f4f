using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>How a token picks one of an expert's replicas (docs/design.md §4.3).</summary>
public enum ReplicaSelection
{
    /// <summary>
    /// <c>((row * 2654435769) mod 2^32) mod logcnt</c>: a function of the token row only, so every
    /// rank picks the same replica for a token (SGLang #32962). The default.
    /// </summary>
    TokenHash = 0,
    /// <summary><c>(row * topK + k) mod logcnt</c>: spreads the k-slots of a row over replicas.</summary>
    RoundRobin = 1,
    /// <summary>
    /// A replica on the token's own node when the expert has one there (the TokenHash choice among
    /// those), else the TokenHash choice among all: less cross-node traffic, the same slot for a token
    /// on every rank of its node. Needs the node count and the calling rank's node (native
    /// <c>eplb_expert_map_t.num_nodes</c>/<c>source_node</c>).
    /// </summary>
    NodeLocal = 2,
}

/// <summary>
/// The EPLB views of one MoE layer (docs/design.md §3.3): its <c>log2phy</c> table <c>[N][Kmax]</c>, replica
/// counts <c>[N]</c>, load counters <c>[R]</c> and a one-element record flag, all on one backend.
/// A router holds an <c>EplbLayerState?</c>: null means EPLB is off for the layer. The views are
/// slices of the model-wide tables, updated in place on rebalance so their addresses never change.
/// </summary>
public sealed class EplbLayerState
{
    /// <summary>Creates the state; every view is required and sized to the layer.</summary>
    /// <param name="log2Phy"><c>[N][Kmax]</c> slots of each logical expert.</param>
    /// <param name="logCnt"><c>[N]</c> replicas of each logical expert.</param>
    /// <param name="counters"><c>[R]</c> per-slot load counters.</param>
    /// <param name="recordFlag">One element: record when non-zero.</param>
    /// <param name="logicalExperts">N.</param>
    /// <param name="maxReplicas">Kmax.</param>
    /// <param name="slots">R.</param>
    /// <param name="replicaSelection">How a token picks one of an expert's replicas.</param>
    /// <param name="nodes">
    /// <see cref="ReplicaSelection.NodeLocal"/>: nodes the slots split over (consecutive, R / nodes each);
    /// must divide R. Ignored by the other selections.
    /// </param>
    /// <param name="sourceNode"><see cref="ReplicaSelection.NodeLocal"/>: the node of the rank that maps its tokens with this state, in [0, nodes).</param>
    /// <exception cref="ArgumentException">A view is missing ("EPLB requires ..."), mis-sized, or on another backend; or nodes/sourceNode do not fit.</exception>
    public EplbLayerState(DeviceSlice<int> log2Phy, DeviceSlice<int> logCnt, DeviceSlice<int> counters, DeviceSlice<int> recordFlag,
        int logicalExperts, int maxReplicas, int slots, ReplicaSelection replicaSelection = ReplicaSelection.TokenHash, int nodes = 1,
        int sourceNode = 0)
    {
        Require(log2Phy, nameof(log2Phy));
        Require(logCnt, nameof(logCnt));
        Require(counters, nameof(counters));
        Require(recordFlag, nameof(recordFlag));
        ArgumentOutOfRangeException.ThrowIfLessThan(logicalExperts, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxReplicas, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, logicalExperts);
        ExpectLength(log2Phy, (long)logicalExperts * maxReplicas, nameof(log2Phy));
        ExpectLength(logCnt, logicalExperts, nameof(logCnt));
        ExpectLength(counters, slots, nameof(counters));
        ExpectLength(recordFlag, 1, nameof(recordFlag));
        Backend = log2Phy.Backend;
        foreach (var (slice, name) in new[] { (logCnt, nameof(logCnt)), (counters, nameof(counters)), (recordFlag, nameof(recordFlag)) })
            if (slice.Backend != Backend)
                throw new ArgumentException($"EPLB views must share one backend: {name} is on {slice.Backend}, log2Phy on {Backend}", name);
        if (!Enum.IsDefined(replicaSelection))
            throw new ArgumentOutOfRangeException(nameof(replicaSelection), replicaSelection, "unknown replica selection");
        if (nodes < 1 || slots % nodes != 0)
            throw new ArgumentException($"nodes = {nodes} must be >= 1 and divide slots = {slots} (every node holds slots / nodes slots)", nameof(nodes));
        if (sourceNode < 0 || sourceNode >= nodes)
            throw new ArgumentOutOfRangeException(nameof(sourceNode), sourceNode, $"sourceNode must be in [0, nodes = {nodes})");
        Log2Phy = log2Phy;
        LogCnt = logCnt;
        Counters = counters;
        RecordFlag = recordFlag;
        LogicalExperts = logicalExperts;
        MaxReplicas = maxReplicas;
        Slots = slots;
        ReplicaSelection = replicaSelection;
        Nodes = nodes;
        SourceNode = sourceNode;
    }

    /// <summary><c>[N][Kmax]</c> slots of each logical expert, ascending, -1 padded.</summary>
    public DeviceSlice<int> Log2Phy { get; }

    /// <summary><c>[N]</c> replicas of each logical expert.</summary>
    public DeviceSlice<int> LogCnt { get; }

    /// <summary><c>[R]</c> per-slot load counters the routing kernels increment.</summary>
    public DeviceSlice<int> Counters { get; }

    /// <summary>One element: record when non-zero.</summary>
    public DeviceSlice<int> RecordFlag { get; }

    /// <summary>N, logical experts.</summary>
    public int LogicalExperts { get; }

    /// <summary>Kmax, the fixed capacity of a log2phy row.</summary>
    public int MaxReplicas { get; }

    /// <summary>R, physical slots.</summary>
    public int Slots { get; }

    /// <summary>The replica choice the kernels use.</summary>
    public ReplicaSelection ReplicaSelection { get; }

    /// <summary>Nodes the slots split over (read by <see cref="ReplicaSelection.NodeLocal"/>).</summary>
    public int Nodes { get; }

    /// <summary>The node of the rank whose tokens this state maps (read by <see cref="ReplicaSelection.NodeLocal"/>).</summary>
    public int SourceNode { get; }

    /// <summary>The backend all views live on.</summary>
    public Backend Backend { get; }

    /// <summary>The native struct over the views, leased in <paramref name="leases"/> for the call.</summary>
    internal unsafe eplb_expert_map_t ToNative(LeaseScope leases) => new()
    {
        log2phy = leases.Pointer(Log2Phy),
        logcnt = leases.Pointer(LogCnt),
        counters = leases.Pointer(Counters),
        record_flag = leases.Pointer(RecordFlag),
        num_logical = LogicalExperts,
        max_replicas = MaxReplicas,
        num_physical = Slots,
        replica_selection = (int)ReplicaSelection,
        num_nodes = ReplicaSelection == ReplicaSelection.NodeLocal ? Nodes : 0,
        source_node = ReplicaSelection == ReplicaSelection.NodeLocal ? SourceNode : 0,
    };

    private static void Require(DeviceSlice<int> view, string name)
    {
        if (view.IsNull) throw new ArgumentException($"EPLB requires {name} != null", name);
    }

    private static void ExpectLength(DeviceSlice<int> view, long expected, string name)
    {
        if (view.Length != expected)
            throw new ArgumentException($"{name} has {view.Length} elements; the layer needs {expected}", name);
    }
}
