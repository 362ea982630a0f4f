using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// What a placement policy is asked for (SPEC 2): R slots per layer on G ranks in <see cref="Nodes"/>
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
    /// (SPEC 2.2). On by default; it never changes balancedness.
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

    /// <summary>
    /// Checks the request against a load of N experts (SPEC 2.1 preconditions) and an optional current placement.
    /// </summary>
    /// <exception cref="ArgumentException">The first violated rule, naming the values.</exception>
    public void Validate(ExpertLoad load, ExpertPlacement? current = null)
    {
        ArgumentNullException.ThrowIfNull(load);
        var n = load.LogicalExperts;
        if (Ranks < 1) throw new ArgumentException($"ranks (G = {Ranks}) must be >= 1");
        if (Nodes < 1) throw new ArgumentException($"nodes ({Nodes}) must be >= 1");
        if (Groups < 1) throw new ArgumentException($"groups ({Groups}) must be >= 1");
        if (Slots < n) throw new ArgumentException($"slots (R = {Slots}) must be >= logical experts (N = {n})");
        if (Slots % Ranks != 0) throw new ArgumentException($"slots (R = {Slots}) must be a multiple of ranks (G = {Ranks})");
        if (Ranks % Nodes != 0) throw new ArgumentException($"ranks (G = {Ranks}) must be a multiple of nodes ({Nodes})");
        if (MaxReplicas < 0) throw new ArgumentException($"maxReplicas ({MaxReplicas}) must be >= 0 (0 = derive)");
        if (MaxChangedSlotsPerLayer < 0) throw new ArgumentException($"maxChangedSlotsPerLayer ({MaxChangedSlotsPerLayer}) must be >= 0 (0 = no limit)");
        if (!(BalancednessTolerance >= 0 && BalancednessTolerance < 1))
            throw new ArgumentException($"balancednessTolerance ({BalancednessTolerance}) must be in [0, 1)");
        if (MaxReplicas > 0 && (long)MaxReplicas * n < Slots)
            throw new ArgumentException($"maxReplicas = {MaxReplicas} cannot fill R = {Slots} slots with N = {n} experts");
        if (NoDuplicateOnRank && (long)Ranks * n < Slots)
            throw new ArgumentException($"noDuplicateOnRank: R/G = {Slots / Ranks} slots per rank exceed the N = {n} distinct experts");
        if (current != null)
        {
            if (current.Layers != load.Layers || current.LogicalExperts != n || current.Slots != Slots || current.Ranks != Ranks)
                throw new ArgumentException(
                    $"the current placement is {current.Layers} layers x {current.Slots} slots of {current.LogicalExperts} experts on {current.Ranks} GPUs; " +
                    $"the request is {load.Layers} x {Slots} of {n} on {Ranks}");
        }
    }
}
