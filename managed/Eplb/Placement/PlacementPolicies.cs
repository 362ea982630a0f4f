namespace Eplb;

/// <summary>A placement policy: turns an expert load into a placement (SPEC 2).</summary>
public interface IPlacementPolicy
{
    /// <summary>The registered name ("deepseek", "locality", "incremental").</summary>
    string Name { get; }

    /// <summary>Plans a placement for <paramref name="load"/>.</summary>
    /// <param name="load">The logical load <c>[L][N]</c> (non-negative, finite).</param>
    /// <param name="request">Slots, groups, nodes, GPUs and options.</param>
    /// <param name="current">The placement in force, if any: used for slot preservation and by transfer-aware policies.</param>
    /// <returns>A valid placement with <c>load.Layers</c> layers.</returns>
    /// <exception cref="ArgumentException">The request violates a precondition (the message names the values).</exception>
    Placement Plan(ExpertLoad load, PlacementRequest request, Placement? current = null);
}

/// <summary>The registered placement policies, by name.</summary>
public static class PlacementPolicies
{
    /// <summary>DeepSeek's policy with exact parity (SPEC 2.1), the default.</summary>
    public static IPlacementPolicy DeepSeek { get; } = new DeepSeekPolicy();

    /// <summary>Primaries group-to-node, redundant replicas anywhere (SPEC 2.3).</summary>
    public static IPlacementPolicy Locality { get; } = new LocalityPolicy();

    /// <summary>Transfer-aware: as few slot changes as possible from the current placement (SPEC 2.3).</summary>
    public static IPlacementPolicy Incremental { get; } = new IncrementalPolicy();

    /// <summary>The names <see cref="Get"/> accepts.</summary>
    public static IReadOnlyList<string> Names { get; } = [DeepSeek.Name, Locality.Name, Incremental.Name];

    /// <summary>The policy registered under <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">No policy has that name; the message lists the names.</exception>
    public static IPlacementPolicy Get(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        foreach (var policy in (IPlacementPolicy[])[DeepSeek, Locality, Incremental])
            if (string.Equals(policy.Name, name, StringComparison.OrdinalIgnoreCase)) return policy;
        throw new ArgumentException($"unknown placement policy '{name}': use {string.Join(", ", Names)}", nameof(name));
    }
}
