using Eplb.Load;

namespace Eplb.Placement;

/// <summary>A placement policy: turns an expert load into a placement (docs/design.md §2).</summary>
public interface IPlacementPolicy
{
    /// <summary>The registered name ("deepseek", "locality", "incremental").</summary>
    string Name { get; }

    /// <summary>Plans a placement for <paramref name="load"/>.</summary>
    /// <param name="load">The logical load <c>[L][N]</c> (non-negative, finite).</param>
    /// <param name="request">Slots, groups, nodes, ranks and options.</param>
    /// <param name="current">The placement in force, if any: used for slot preservation and by transfer-aware policies.</param>
    /// <returns>A valid placement with <c>load.Layers</c> layers.</returns>
    /// <exception cref="ArgumentException">The request violates a precondition (the message names the values).</exception>
    ExpertPlacement Plan(ExpertLoad load, PlacementRequest request, ExpertPlacement? current = null);

    /// <summary>
    /// Whether the policy may run on EPLB's background worker (async rearrangement, docs/design.md §3.1): a
    /// pure function of its inputs, thread-safe. The built-in policies do.
    /// </summary>
    bool SupportsAsync => true;
}

/// <summary>The registered placement policies, by name: the three built-in ones and any added with <see cref="Register"/>.</summary>
public static class PlacementPolicies
{
    /// <summary>DeepSeek's policy with exact parity (docs/design.md §2.1), the default.</summary>
    public static IPlacementPolicy DeepSeek { get; } = new DeepSeekPolicy();

    /// <summary>Primaries group-to-node, redundant replicas anywhere (docs/design.md §2.3).</summary>
    public static IPlacementPolicy Locality { get; } = new LocalityPolicy();

    /// <summary>Transfer-aware: as few slot changes as possible from the current placement (docs/design.md §2.3).</summary>
    public static IPlacementPolicy Incremental { get; } = new IncrementalPolicy();

    private static readonly List<IPlacementPolicy> Registered = [DeepSeek, Locality, Incremental];
    private static readonly object Gate = new();

    /// <summary>The names <see cref="Get"/> accepts.</summary>
    public static IReadOnlyList<string> Names
    {
        get
        {
            lock (Gate) return Registered.Select(p => p.Name).ToArray();
        }
    }

    /// <summary>Registers a custom policy under its name (which must be new).</summary>
    /// <exception cref="ArgumentException">A policy with that name is already registered.</exception>
    public static void Register(IPlacementPolicy policy)
    {
        ArgumentNullException.ThrowIfNull(policy);
        ArgumentException.ThrowIfNullOrWhiteSpace(policy.Name);
        lock (Gate)
        {
            if (Registered.Any(p => string.Equals(p.Name, policy.Name, StringComparison.OrdinalIgnoreCase)))
            {
                if (Registered.Contains(policy)) return;
                throw new ArgumentException($"a placement policy named '{policy.Name}' is already registered", nameof(policy));
            }
            Registered.Add(policy);
        }
    }

    /// <summary>Looks a policy up by name (case-insensitive).</summary>
    public static bool TryGet(string name, out IPlacementPolicy? policy)
    {
        lock (Gate) policy = Registered.FirstOrDefault(p => string.Equals(p.Name, name, StringComparison.OrdinalIgnoreCase));
        return policy != null;
    }

    /// <summary>The policy registered under <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">No policy has that name; the message lists the names.</exception>
    public static IPlacementPolicy Get(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return TryGet(name, out var policy)
            ? policy!
            : throw new ArgumentException($"unknown placement policy '{name}': use {string.Join(", ", Names)}", nameof(name));
    }
}
