using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// What a placement policy is asked for (docs/design.md §2): R slots per layer on G ranks in <see cref="Nodes"/>
/// nodes, for a model whose N experts form <see cref="Groups"/> groups of consecutive ids.
/// </summary>
/// <param name="Slots">R, physical slots per layer (N + redundant); a multiple of <paramref name="Ranks"/>.</param>
/// <param name="Groups">Expert groups of DeepSeek's group-limited routing (8 for DeepSeek-V3); 1 when the model has none.</param>
/// <param name="Nodes">Nodes (GPUs with a fast interconnect); G must be a multiple of it.</param>
/// <param name="Ranks">G, expert-parallel ranks.</param>
public sealed record PlacementRequest(int Slots, int Groups, int Nodes, int Ranks)
{
    /// <summary>No rank holds two replicas of one expert (deepseek-ai/EPLB#22); off by default, as in DeepSeek's policy.</summary>
    public bool NoDuplicateOnRank { get; init; }

    /// <summary>
    /// When a current placement is given, keep experts that stay on a rank in their old slots
    /// (docs/design.md §2.2). On by default; it never changes balancedness.
    /// </summary>
    public bool PreserveSlots { get; init; } = true;

    /// <summary>
    /// Kmax, the fixed capacity of a <c>log2phy</c> row; 0 derives it from the plan. When set, no
    /// expert gets more replicas than this: the policies cap replication there (choosing the next
    /// expert instead), so a runtime with fixed-size device tables never needs them to grow.
    /// </summary>
    public int MaxReplicas { get; init; }

    /// <summary>Threads used across layers; 0 (the default) lets the runtime choose. Results do not depend on it.</summary>
    public int MaxDegreeOfParallelism { get; init; }

    /// <summary>
    /// <c>incremental</c>: how far below the fresh plan's aggregate balancedness the result may stay
    /// (default 0.01).
    /// </summary>
    public double BalancednessTolerance { get; init; } = 0.01;

    /// <summary><c>incremental</c>: the most slots it may change in one layer; 0 (the default) means no limit.</summary>
    public int MaxChangedSlotsPerLayer { get; init; }

    /// <summary>
    /// Whether DeepSeek's hierarchical policy applies: <c>Groups % Nodes == 0</c> and N a multiple of
    /// <c>Groups</c>; otherwise the global policy (one group, one node) runs.
    /// </summary>
    public bool IsHierarchical(int logicalExperts) => Groups % Nodes == 0 && logicalExperts % Groups == 0;

    /// <summary>The topology the request asks for over <paramref name="load"/> (L and N from the load).</summary>
    /// <exception cref="ArgumentException">The sizes break a rule of <see cref="ExpertTopology"/>.</exception>
    public ExpertTopology TopologyFor(ExpertLoad load)
    {
        ArgumentNullException.ThrowIfNull(load);
        return new ExpertTopology(load.Layers, load.LogicalExperts, Slots, Ranks, Nodes, Groups);
    }

    /// <summary>
    /// Checks the request against a load of N experts (docs/design.md §2.1 preconditions, through
    /// <see cref="TopologyFor"/>) and an optional current placement.
    /// </summary>
    /// <exception cref="ArgumentException">The first violated rule, naming the values.</exception>
    public void Validate(ExpertLoad load, ExpertPlacement? current = null)
    {
        var topology = TopologyFor(load);
        topology.CheckMaxReplicas(MaxReplicas);
        if (MaxChangedSlotsPerLayer < 0) throw new ArgumentException($"maxChangedSlotsPerLayer ({MaxChangedSlotsPerLayer}) must be >= 0 (0 = no limit)");
        if (!(BalancednessTolerance >= 0 && BalancednessTolerance < 1))
            throw new ArgumentException($"balancednessTolerance ({BalancednessTolerance}) must be in [0, 1)");
        if (NoDuplicateOnRank && (long)Ranks * topology.LogicalExperts < Slots)
            throw new ArgumentException($"noDuplicateOnRank: R/G = {topology.SlotsPerRank} slots per rank exceed the N = {topology.LogicalExperts} distinct experts");
        if (current != null && !current.Topology.HasSameTables(topology))
            throw new ArgumentException($"the current placement is {current.Topology.TablesText}; the request is {topology.TablesText}");
    }
}
