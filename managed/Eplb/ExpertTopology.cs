using System.Globalization;

namespace Eplb;

/// <summary>
/// The shape of an expert-parallel MoE deployment (docs/design.md §1): <see cref="Layers"/> MoE layers of
/// <see cref="LogicalExperts"/> logical experts, each layer held in <see cref="Slots"/> physical slots
/// spread over <see cref="Ranks"/> ranks (rank g owns slots <c>[g*R/G, (g+1)*R/G)</c>) on
/// <see cref="Nodes"/> nodes, the experts forming <see cref="Groups"/> groups of consecutive ids.
/// Every instance is valid: the constructor checks the rules once, with one wording, and placement
/// requests, placements, the EPLB runtime, the simulator and the Mega MoE shapes check their sizes
/// through it.
/// </summary>
public sealed record ExpertTopology
{
    /// <summary>Creates a topology after checking its rules.</summary>
    /// <param name="layers">L, MoE layers (0 is valid: a pipeline stage without MoE layers).</param>
    /// <param name="logicalExperts">N, logical experts per layer, at least 1.</param>
    /// <param name="slots">R, physical slots per layer: at least N and a multiple of <paramref name="ranks"/>.</param>
    /// <param name="ranks">G, expert-parallel ranks: at least 1 and a multiple of <paramref name="nodes"/>.</param>
    /// <param name="nodes">Nodes the ranks span, at least 1.</param>
    /// <param name="groups">Expert groups of group-limited routing (DeepSeek-V3: 8), at least 1; 1 when the model has none.</param>
    /// <exception cref="ArgumentException">A rule is broken; the message names the values.</exception>
    public ExpertTopology(int layers, int logicalExperts, int slots, int ranks, int nodes = 1, int groups = 1)
    {
        if (layers < 0) throw new ArgumentException($"layers (L = {layers}) must be >= 0", nameof(layers));
        if (logicalExperts < 1) throw new ArgumentException($"logical experts (N = {logicalExperts}) must be >= 1", nameof(logicalExperts));
        if (groups < 1) throw new ArgumentException($"groups ({groups}) must be >= 1", nameof(groups));
        SlotsPerRank = SlotsPerRankOf(slots, ranks);
        RanksPerNode = RanksPerNodeOf(ranks, nodes);
        if (slots < logicalExperts)
            throw new ArgumentException($"slots (R = {slots}) must be >= logical experts (N = {logicalExperts})", nameof(slots));
        Layers = layers;
        LogicalExperts = logicalExperts;
        Slots = slots;
        Ranks = ranks;
        Nodes = nodes;
        Groups = groups;
    }

    /// <summary>L, the MoE layers.</summary>
    public int Layers { get; }

    /// <summary>N, logical experts per layer.</summary>
    public int LogicalExperts { get; }

    /// <summary>R, physical slots per layer.</summary>
    public int Slots { get; }

    /// <summary>G, expert-parallel ranks.</summary>
    public int Ranks { get; }

    /// <summary>Nodes; rank g is on node <c>g / (G/nodes)</c>.</summary>
    public int Nodes { get; }

    /// <summary>Expert groups: <c>N/groups</c> consecutive logical experts form a group.</summary>
    public int Groups { get; }

    /// <summary>R/G, the slots of one rank.</summary>
    public int SlotsPerRank { get; }

    /// <summary>G/nodes, the ranks of one node.</summary>
    public int RanksPerNode { get; }

    /// <summary>R − N, the redundant slots per layer.</summary>
    public int RedundantExperts => Slots - LogicalExperts;

    /// <summary>The rank that owns a slot.</summary>
    public int RankOfSlot(int slot) => slot / SlotsPerRank;

    /// <summary>The node of a rank.</summary>
    public int NodeOfRank(int rank) => rank / RanksPerNode;

    /// <summary>Whether <paramref name="other"/> has the same layers, experts, slots and ranks (the tables' shape).</summary>
    public bool HasSameTables(ExpertTopology other) =>
        other.Layers == Layers && other.LogicalExperts == LogicalExperts && other.Slots == Slots && other.Ranks == Ranks;

    /// <summary>The tables' shape in words, for messages: "58 layers x 288 slots of 256 experts on 32 ranks".</summary>
    public string TablesText => string.Create(CultureInfo.InvariantCulture, $"{Layers} layers x {Slots} slots of {LogicalExperts} experts on {Ranks} ranks");

    /// <inheritdoc/>
    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture, $"L = {Layers}, N = {LogicalExperts}, R = {Slots}, G = {Ranks}, nodes = {Nodes}, groups = {Groups}");

    /// <summary>R/G, after the rules on R and G alone: G at least 1, R a multiple of G.</summary>
    /// <exception cref="ArgumentException">A rule is broken.</exception>
    internal static int SlotsPerRankOf(int slots, int ranks)
    {
        if (ranks < 1) throw new ArgumentException($"ranks (G = {ranks}) must be >= 1", nameof(ranks));
        if (slots % ranks != 0) throw new ArgumentException($"slots (R = {slots}) must be a multiple of ranks (G = {ranks})", nameof(slots));
        return slots / ranks;
    }

    /// <summary>G/nodes, after the rules on G and nodes alone: nodes at least 1, G a multiple of nodes.</summary>
    /// <exception cref="ArgumentException">A rule is broken.</exception>
    internal static int RanksPerNodeOf(int ranks, int nodes)
    {
        if (ranks < 1) throw new ArgumentException($"ranks (G = {ranks}) must be >= 1", nameof(ranks));
        if (nodes < 1) throw new ArgumentException($"nodes ({nodes}) must be >= 1", nameof(nodes));
        if (ranks % nodes != 0) throw new ArgumentException($"ranks (G = {ranks}) must be a multiple of nodes ({nodes})", nameof(ranks));
        return ranks / nodes;
    }

    /// <summary>Checks Kmax (0 = derive) against the topology: at least 0, and Kmax replicas of N experts can fill R slots.</summary>
    /// <exception cref="ArgumentException">A rule is broken.</exception>
    internal void CheckMaxReplicas(int maxReplicas)
    {
        if (maxReplicas < 0) throw new ArgumentException($"maxReplicas ({maxReplicas}) must be >= 0 (0 = derive)", nameof(maxReplicas));
        if (maxReplicas > 0 && (long)maxReplicas * LogicalExperts < Slots)
            throw new ArgumentException($"maxReplicas = {maxReplicas} cannot fill R = {Slots} slots with N = {LogicalExperts} experts", nameof(maxReplicas));
    }
}
