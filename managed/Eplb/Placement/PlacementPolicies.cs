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

/// <summary>
/// A set of placement policies by name (case-insensitive): what <c>EplbOptions.Policy</c> is resolved
/// against. <see cref="PlacementPolicies.Default"/> holds the built-in three; a host adds its own by
/// building another catalog (the DI builder's <c>AddPlacementPolicy&lt;T&gt;(name)</c> does), so
/// nothing is registered process-wide and no registration leaks from one host or test to the next.
/// Immutable and thread-safe.
/// </summary>
public sealed class PlacementPolicyCatalog
{
    private readonly KeyValuePair<string, IPlacementPolicy>[] _entries;

    /// <summary>A catalog of <paramref name="policies"/>, each under its <see cref="IPlacementPolicy.Name"/>.</summary>
    /// <exception cref="ArgumentException">A name is empty or given twice (names compare case-insensitively).</exception>
    public PlacementPolicyCatalog(IEnumerable<IPlacementPolicy> policies)
        : this((policies ?? throw new ArgumentNullException(nameof(policies))).Select(p =>
            KeyValuePair.Create((p ?? throw new ArgumentException("a policy is null", nameof(policies))).Name, p)))
    {
    }

    /// <summary>A catalog of policies under the given names (a name may differ from the policy's own <see cref="IPlacementPolicy.Name"/>).</summary>
    /// <exception cref="ArgumentException">A name is empty or given twice (names compare case-insensitively).</exception>
    public PlacementPolicyCatalog(IEnumerable<KeyValuePair<string, IPlacementPolicy>> policies)
    {
        ArgumentNullException.ThrowIfNull(policies);
        var entries = new List<KeyValuePair<string, IPlacementPolicy>>();
        foreach (var (name, policy) in policies)
        {
            if (string.IsNullOrWhiteSpace(name)) throw new ArgumentException("a placement policy name is empty", nameof(policies));
            ArgumentNullException.ThrowIfNull(policy, nameof(policies));
            if (entries.Any(e => string.Equals(e.Key, name, StringComparison.OrdinalIgnoreCase)))
                throw new ArgumentException($"two placement policies are named '{name}'", nameof(policies));
            entries.Add(KeyValuePair.Create(name, policy));
        }
        _entries = entries.ToArray();
    }

    /// <summary>The names <see cref="Get"/> accepts, in the order given.</summary>
    public IReadOnlyList<string> Names => _entries.Select(e => e.Key).ToArray();

    /// <summary>Looks a policy up by name (case-insensitive).</summary>
    public bool TryGet(string name, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out IPlacementPolicy? policy)
    {
        ArgumentNullException.ThrowIfNull(name);
        foreach (var (key, value) in _entries)
        {
            if (!string.Equals(key, name, StringComparison.OrdinalIgnoreCase)) continue;
            policy = value;
            return true;
        }
        policy = null;
        return false;
    }

    /// <summary>The policy named <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">No policy has that name; the message lists the names.</exception>
    public IPlacementPolicy Get(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return TryGet(name, out var policy)
            ? policy
            : throw new ArgumentException($"unknown placement policy '{name}': use {string.Join(", ", Names)}", nameof(name));
    }

    /// <summary>A catalog with these policies and <paramref name="more"/> (under their own names).</summary>
    /// <exception cref="ArgumentException">A name is already taken.</exception>
    public PlacementPolicyCatalog With(params IEnumerable<IPlacementPolicy> more) =>
        new(_entries.Concat(more.Select(p => KeyValuePair.Create(p.Name, p))));
}

/// <summary>
/// The built-in placement policies, by name: the default set (<see cref="Default"/>) that
/// <c>EplbOptions</c>, the CLI and the simulator resolve names against unless a host hands them
/// another <see cref="PlacementPolicyCatalog"/>.
/// </summary>
public static class PlacementPolicies
{
    /// <summary>DeepSeek's policy with exact parity (docs/design.md §2.1), the default.</summary>
    public static IPlacementPolicy DeepSeek { get; } = new DeepSeekPolicy();

    /// <summary>Primaries group-to-node, redundant replicas anywhere (docs/design.md §2.3).</summary>
    public static IPlacementPolicy Locality { get; } = new LocalityPolicy();

    /// <summary>Transfer-aware: as few slot changes as possible from the current placement (docs/design.md §2.3).</summary>
    public static IPlacementPolicy Incremental { get; } = new IncrementalPolicy();

    /// <summary>The built-in policies: <c>deepseek</c>, <c>locality</c>, <c>incremental</c>.</summary>
    public static PlacementPolicyCatalog Default { get; } = new([DeepSeek, Locality, Incremental]);

    /// <summary>The names <see cref="Get"/> accepts.</summary>
    public static IReadOnlyList<string> Names => Default.Names;

    /// <summary>Looks a built-in policy up by name (case-insensitive).</summary>
    public static bool TryGet(string name, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out IPlacementPolicy? policy) =>
        Default.TryGet(name, out policy);

    /// <summary>The built-in policy named <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">No policy has that name; the message lists the names.</exception>
    public static IPlacementPolicy Get(string name) => Default.Get(name);
}
