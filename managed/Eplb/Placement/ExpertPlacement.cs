using System.Globalization;
using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// An expert placement for a whole model (docs/design.md §1): for each of <see cref="Layers"/> MoE layers, which
/// logical expert each of the <see cref="Slots"/> physical slots holds, spread over <see cref="Ranks"/>
/// ranks (rank <c>g</c> owns slots <c>[g*R/G, (g+1)*R/G)</c>) on <see cref="Nodes"/> nodes. Immutable;
/// every instance satisfies the invariants (each expert at least once, rows of R slots, R/G slots per
/// rank, <c>phy2log</c>, <c>logcnt</c> and <c>log2phy</c> consistent, <c>logcnt &lt;= MaxReplicas</c>).
/// </summary>
public sealed class ExpertPlacement
{
    private readonly int[] _phy2log;  // [L][R]
    private readonly int[] _logcnt;   // [L][N]
    private int[]? _log2phy;          // [L][N][Kmax], ascending, -1 padded; built on first use

    private ExpertPlacement(ExpertTopology topology, int maxReplicas, int[] phy2log, int[] logcnt)
    {
        Topology = topology;
        MaxReplicas = maxReplicas;
        _phy2log = phy2log;
        _logcnt = logcnt;
    }

    // Policies and metrics never read log2phy: building it (the largest table) only when asked
    // keeps it out of a plan's time. Threads racing here build equal tables; one is published.
    private int[] Log2PhyArray =>
        Volatile.Read(ref _log2phy) ?? Interlocked.CompareExchange(ref _log2phy, BuildLog2Phy(), null) ?? _log2phy!;

    private int[] BuildLog2Phy()
    {
        var kmax = MaxReplicas;
        var table = new int[(long)Layers * LogicalExperts * kmax];
        table.AsSpan().Fill(-1);
        var filled = new int[LogicalExperts];
        for (var l = 0; l < Layers; l++)
        {
            filled.AsSpan().Clear();
            var row = table.AsSpan(l * LogicalExperts * kmax, LogicalExperts * kmax);
            var p2l = _phy2log.AsSpan(l * Slots, Slots);
            for (var s = 0; s < Slots; s++)
            {
                var e = p2l[s];
                row[e * kmax + filled[e]++] = s;
            }
        }
        return table;
    }

    /// <summary>L, the number of MoE layers.</summary>
    public int Layers => Topology.Layers;

    /// <summary>N, logical experts per layer.</summary>
    public int LogicalExperts => Topology.LogicalExperts;

    /// <summary>R, physical slots per layer.</summary>
    public int Slots => Topology.Slots;

    /// <summary>G, expert-parallel ranks; rank <c>g</c> owns slots <c>[g*R/G, (g+1)*R/G)</c>.</summary>
    public int Ranks => Topology.Ranks;

    /// <summary>Nodes; rank <c>g</c> is on node <c>g / (G/nodes)</c>.</summary>
    public int Nodes => Topology.Nodes;

    /// <summary>Kmax, the capacity of a <see cref="Log2Phy"/> row: fixed per placement, at least the largest replica count.</summary>
    public int MaxReplicas { get; }

    /// <summary>R/G, the slots of one rank.</summary>
    public int SlotsPerRank => Topology.SlotsPerRank;

    /// <summary>G/nodes, the ranks of one node.</summary>
    public int RanksPerNode => Topology.RanksPerNode;

    /// <summary>L, N, R, G and nodes (groups are the request's, not the placement's: 1 here).</summary>
    internal ExpertTopology Topology { get; }

    /// <summary>The logical expert held by each slot of a layer, <c>[R]</c>.</summary>
    public ReadOnlySpan<int> Phy2Log(int layer)
    {
        CheckLayer(layer);
        return _phy2log.AsSpan(layer * Slots, Slots);
    }

    /// <summary>The replica count of each logical expert of a layer, <c>[N]</c>, each &gt;= 1, summing to R.</summary>
    public ReadOnlySpan<int> LogCnt(int layer)
    {
        CheckLayer(layer);
        return _logcnt.AsSpan(layer * LogicalExperts, LogicalExperts);
    }

    /// <summary>The slots of each logical expert of a layer, <c>[N * Kmax]</c>: ascending, padded with -1.</summary>
    public ReadOnlySpan<int> Log2Phy(int layer)
    {
        CheckLayer(layer);
        return Log2PhyArray.AsSpan(layer * LogicalExperts * MaxReplicas, LogicalExperts * MaxReplicas);
    }

    /// <summary>All layers' <c>phy2log</c>, row-major <c>[L][R]</c>.</summary>
    public ReadOnlySpan<int> Phy2LogTable => _phy2log;

    /// <summary>All layers' <c>logcnt</c>, row-major <c>[L][N]</c>.</summary>
    public ReadOnlySpan<int> LogCntTable => _logcnt;

    /// <summary>All layers' <c>log2phy</c>, row-major <c>[L][N][Kmax]</c>.</summary>
    public ReadOnlySpan<int> Log2PhyTable => Log2PhyArray;

    /// <summary>The rank that owns a slot.</summary>
    public int RankOfSlot(int slot) => Topology.RankOfSlot(slot);

    /// <summary>The node of a rank.</summary>
    public int NodeOfRank(int rank) => Topology.NodeOfRank(rank);

    /// <summary>The initial placement (docs/design.md §1): slot <c>s</c> holds logical expert <c>s % N</c> in every layer.</summary>
    /// <param name="layers">L (0 is valid: a pipeline stage without MoE layers).</param>
    /// <param name="logicalExperts">N.</param>
    /// <param name="slots">R, at least N and a multiple of <paramref name="ranks"/>.</param>
    /// <param name="ranks">G, a multiple of <paramref name="nodes"/>.</param>
    /// <param name="nodes">Nodes.</param>
    /// <param name="maxReplicas">Kmax; 0 derives <c>ceil(R/N)</c>.</param>
    /// <exception cref="ArgumentException">A size is out of range or inconsistent.</exception>
    public static ExpertPlacement Initial(int layers, int logicalExperts, int slots, int ranks, int nodes = 1, int maxReplicas = 0)
    {
        var topology = CheckedTopology(layers, logicalExperts, slots, ranks, nodes, maxReplicas);
        var phy2log = new int[(long)layers * slots];
        for (var l = 0; l < layers; l++)
            for (var s = 0; s < slots; s++)
                phy2log[l * slots + s] = s % logicalExperts;
        return Create(topology, maxReplicas, phy2log, "initial placement");
    }

    /// <summary>A placement from its <c>phy2log</c> rows (copied); <c>logcnt</c> and <c>log2phy</c> are derived.</summary>
    /// <param name="phy2log">One row of R logical ids per layer.</param>
    /// <param name="logicalExperts">N.</param>
    /// <param name="ranks">G; R must be a multiple of it.</param>
    /// <param name="nodes">Nodes; G must be a multiple of it.</param>
    /// <param name="maxReplicas">Kmax; 0 derives the largest replica count. A row needing more replicas is an error.</param>
    /// <exception cref="ArgumentException">No or ragged rows, an id outside <c>[0, N)</c>, an expert without a slot, or bad sizes.</exception>
    public static ExpertPlacement FromPhy2Log(IReadOnlyList<int[]> phy2log, int logicalExperts, int ranks, int nodes = 1, int maxReplicas = 0)
    {
        ArgumentNullException.ThrowIfNull(phy2log);
        var layers = phy2log.Count;
        if (layers == 0)
            throw new ArgumentException("phy2log has no layers, so R is unknown: use Initial(0, logicalExperts, slots, ranks) for a stage without MoE layers", nameof(phy2log));
        var slots = phy2log[0]?.Length ?? 0;
        var topology = CheckedTopology(layers, logicalExperts, slots, ranks, nodes, maxReplicas);
        var flat = new int[(long)layers * slots];
        for (var l = 0; l < layers; l++)
        {
            var row = phy2log[l] ?? throw new ArgumentException($"phy2log[{l}] is null", nameof(phy2log));
            if (row.Length != slots)
                throw new ArgumentException($"ragged phy2log: layer {l} has {row.Length} slots, layer 0 has {slots}", nameof(phy2log));
            row.CopyTo(flat, l * slots);
        }
        return Create(topology, maxReplicas, flat, nameof(phy2log));
    }

    /// <summary>
    /// Builds and validates a placement that takes ownership of <paramref name="phy2log"/> (<c>[L][R]</c>, row-major).
    /// </summary>
    internal static ExpertPlacement Create(int layers, int logicalExperts, int slots, int ranks, int nodes, int maxReplicas, int[] phy2log, string what) =>
        Create(new ExpertTopology(layers, logicalExperts, slots, ranks, nodes), maxReplicas, phy2log, what);

    private static ExpertPlacement Create(ExpertTopology topology, int maxReplicas, int[] phy2log, string what)
    {
        var (layers, experts, slots) = (topology.Layers, topology.LogicalExperts, topology.Slots);
        var logcnt = new int[(long)layers * experts];
        var largest = 0;
        for (var l = 0; l < layers; l++)
        {
            var counts = logcnt.AsSpan(l * experts, experts);
            var row = phy2log.AsSpan(l * slots, slots);
            for (var s = 0; s < slots; s++)
            {
                var e = row[s];
                if ((uint)e >= (uint)experts)
                    throw new ArgumentException($"{what}: layer {l} slot {s} holds expert {e}, outside [0, {experts})", what);
                counts[e]++;
            }
            for (var e = 0; e < experts; e++)
            {
                if (counts[e] == 0) throw new ArgumentException($"{what}: layer {l} has no slot for expert {e} (every expert needs a replica)", what);
                largest = Math.Max(largest, counts[e]);
            }
        }
        if (maxReplicas > 0 && largest > maxReplicas)
            throw new ArgumentException($"{what}: an expert has {largest} replicas, more than maxReplicas = {maxReplicas}", nameof(maxReplicas));
        var kmax = maxReplicas > 0 ? maxReplicas : Math.Max(largest, 1);
        return new ExpertPlacement(topology, kmax, phy2log, logcnt);
    }

    // The topology of a placement, with the Kmax rules.
    private static ExpertTopology CheckedTopology(int layers, int logicalExperts, int slots, int ranks, int nodes, int maxReplicas)
    {
        var topology = new ExpertTopology(layers, logicalExperts, slots, ranks, nodes);
        topology.CheckMaxReplicas(maxReplicas);
        return topology;
    }

    /// <summary>The same tables with another <see cref="MaxReplicas"/> capacity.</summary>
    /// <exception cref="ArgumentException">An expert has more replicas than <paramref name="maxReplicas"/>.</exception>
    public ExpertPlacement WithMaxReplicas(int maxReplicas)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxReplicas, 1);
        return maxReplicas == MaxReplicas ? this : Create(Topology, maxReplicas, _phy2log, "placement");
    }

    /// <summary>
    /// Slot preservation (docs/design.md §2.2, vLLM <c>preserve_intragpu_slots</c>): the same experts on every
    /// rank, but an expert that <paramref name="old"/> already had on a rank goes back to its old slot
    /// (each old slot, in order, takes the first unclaimed new copy of its expert); the remaining new
    /// experts fill the remaining slots in ascending order. Balancedness is unchanged; copies are saved.
    /// </summary>
    /// <exception cref="ArgumentException"><paramref name="old"/> has another shape.</exception>
    public ExpertPlacement WithSlotsPreservedFrom(ExpertPlacement old)
    {
        ArgumentNullException.ThrowIfNull(old);
        CheckSameShape(old, nameof(old));
        var result = (int[])_phy2log.Clone();
        var perGpu = SlotsPerRank;
        Span<bool> used = perGpu <= 256 ? stackalloc bool[perGpu] : new bool[perGpu];
        Span<bool> kept = perGpu <= 256 ? stackalloc bool[perGpu] : new bool[perGpu];
        for (var l = 0; l < Layers; l++)
        {
            for (var g = 0; g < Ranks; g++)
            {
                var offset = l * Slots + g * perGpu;
                SlotPreservation.Preserve(_phy2log.AsSpan(offset, perGpu), old._phy2log.AsSpan(offset, perGpu),
                    result.AsSpan(offset, perGpu), used, kept);
            }
        }
        return new ExpertPlacement(Topology, MaxReplicas, result, (int[])_logcnt.Clone());
    }

    // ---------------------------------------------------------------------------------------------
    // Metrics (docs/design.md §1)

    /// <summary>
    /// The load of each rank in one layer: the sum over its slots of <c>weight[e] / logcnt[e]</c>
    /// (each replica serves an equal share of its expert's tokens).
    /// </summary>
    /// <exception cref="ArgumentException">The load has another shape, or <paramref name="rankLoads"/> is not G long.</exception>
    public void RankLoads(ExpertLoad load, int layer, Span<double> rankLoads)
    {
        CheckLoad(load);
        CheckLayer(layer);
        if (rankLoads.Length != Ranks) throw new ArgumentException($"rankLoads has {rankLoads.Length} entries for G = {Ranks}", nameof(rankLoads));
        var weight = load.Layer(layer);
        var counts = LogCnt(layer);
        var row = Phy2Log(layer);
        var perGpu = SlotsPerRank;
        for (var g = 0; g < Ranks; g++)
        {
            var sum = 0.0;
            for (var s = g * perGpu; s < (g + 1) * perGpu; s++) sum += weight[row[s]] / counts[row[s]];
            rankLoads[g] = sum;
        }
    }

    /// <summary>Per-layer balancedness: mean over ranks / max over ranks (0 when the max is 0).</summary>
    public double[] BalancednessPerLayer(ExpertLoad load)
    {
        CheckLoad(load);
        var result = new double[Layers];
        var loads = new double[Ranks];
        for (var l = 0; l < Layers; l++)
        {
            RankLoads(load, l, loads);
            result[l] = Load.Balancedness.OfLayer(loads);
        }
        return result;
    }

    /// <summary>
    /// Aggregate balancedness (<see cref="Load.Balancedness"/>): <c>sum over layers of mean / sum over
    /// layers of max</c> of the rank loads; 0 when every layer is empty.
    /// </summary>
    public double Balancedness(ExpertLoad load)
    {
        CheckLoad(load);
        var loads = new double[Ranks];
        var balancedness = new Balancedness();
        for (var l = 0; l < Layers; l++)
        {
            RankLoads(load, l, loads);
            balancedness.Add(loads);
        }
        return balancedness.Value;
    }

    /// <summary>
    /// The node-local fraction of routed load: the share of all tokens (over every layer) served on
    /// their group's home node. With <paramref name="groups"/> groups of <c>N/groups</c> consecutive
    /// experts, a group's home node in a layer is the node that serves most of that group's load
    /// (lowest node on ties), so the figure is defined for any placement: 1 for DeepSeek's
    /// hierarchical policy, which pins every group to one node. 1 when the load is empty.
    /// </summary>
    /// <exception cref="ArgumentException">The load has another shape, or <paramref name="groups"/> does not divide N.</exception>
    public double NodeLocalFraction(ExpertLoad load, int groups)
    {
        CheckLoad(load);
        if (groups < 1 || LogicalExperts % groups != 0)
            throw new ArgumentException($"groups ({groups}) must divide the logical experts (N = {LogicalExperts})", nameof(groups));
        var groupSize = LogicalExperts / groups;
        var perNode = new double[groups * Nodes];
        double local = 0, total = 0;
        for (var l = 0; l < Layers; l++)
        {
            Array.Clear(perNode);
            var weight = load.Layer(l);
            var counts = LogCnt(l);
            var row = Phy2Log(l);
            for (var s = 0; s < Slots; s++)
            {
                var e = row[s];
                perNode[e / groupSize * Nodes + NodeOfRank(RankOfSlot(s))] += weight[e] / counts[e];
            }
            for (var g = 0; g < groups; g++)
            {
                var best = 0.0;
                for (var n = 0; n < Nodes; n++)
                {
                    best = Math.Max(best, perNode[g * Nodes + n]);
                    total += perNode[g * Nodes + n];
                }
                local += best;
            }
        }
        return total > 0 ? local / total : 1;
    }

    /// <summary>The (layer, slot) pairs whose expert differs from <paramref name="other"/>.</summary>
    /// <exception cref="ArgumentException"><paramref name="other"/> has another shape.</exception>
    public int SlotsChanged(ExpertPlacement other)
    {
        ArgumentNullException.ThrowIfNull(other);
        CheckSameShape(other, nameof(other));
        var changed = 0;
        for (var i = 0; i < _phy2log.Length; i++)
            if (_phy2log[i] != other._phy2log[i]) changed++;
        return changed;
    }

    /// <summary>The slots of one layer whose expert differs from <paramref name="other"/>.</summary>
    public int SlotsChanged(ExpertPlacement other, int layer)
    {
        ArgumentNullException.ThrowIfNull(other);
        CheckSameShape(other, nameof(other));
        var a = Phy2Log(layer);
        var b = other.Phy2Log(layer);
        var changed = 0;
        for (var s = 0; s < a.Length; s++)
            if (a[s] != b[s]) changed++;
        return changed;
    }

    private void CheckLayer(int layer)
    {
        if ((uint)layer >= (uint)Layers)
            throw new ArgumentOutOfRangeException(nameof(layer), layer, $"layer must be in [0, {Layers})");
    }

    private void CheckLoad(ExpertLoad load)
    {
        ArgumentNullException.ThrowIfNull(load);
        if (load.Layers != Layers || load.LogicalExperts != LogicalExperts)
            throw new ArgumentException($"the load is {load.Layers} x {load.LogicalExperts}, the placement {Layers} layers x {LogicalExperts} experts", nameof(load));
    }

    internal void CheckSameShape(ExpertPlacement other, string name)
    {
        if (!other.Topology.HasSameTables(Topology))
            throw new ArgumentException($"{name} is {other.Topology.TablesText}; expected {Topology.TablesText}", name);
    }

    /// <summary>A short description: sizes and the largest replica count.</summary>
    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture, $"Placement({Layers} layers, N = {LogicalExperts}, R = {Slots}, G = {Ranks}, nodes = {Nodes}, Kmax = {MaxReplicas})");
}
