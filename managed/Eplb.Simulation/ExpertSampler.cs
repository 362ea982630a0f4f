using System.Numerics;
using System.Runtime.CompilerServices;

namespace Eplb.Simulation;

/// <summary>
/// Draws the K experts of one token for one MoE layer from that layer's recorded load p: K distinct
/// experts, each pick in proportion to p among the experts still allowed, with DeepSeek-V3's group
/// limit when it applies (all K experts inside at most <c>topKGroups</c> of the layer's groups of
/// N / groups consecutive experts: once that many groups are used, further picks come from them).
/// A token may first reuse experts of its request (<see cref="Draw"/>'s favourites). Walker alias
/// tables make each pick O(1).
/// </summary>
/// <remarks>
/// Distinct picks in proportion to p flatten the hottest experts a little compared with p itself
/// (an expert is picked at most once per token), and the group limit lifts the experts of popular
/// groups; <c>SimulationTests</c> bounds both against the real loads.
/// </remarks>
internal sealed class ExpertSampler
{
    // Experts below this share of the mean weight are lifted to it: every expert stays reachable, so
    // a group-limited token can always complete its K picks inside its groups.
    private const double WeightFloor = 1e-3;
    private const int RejectionsBeforeScan = 64;

    private readonly int _experts;
    private readonly int _groupSize;
    private readonly int _maxGroups;
    private readonly bool _limited;
    private readonly double[] _weights;
    private readonly double[] _probability;
    private readonly int[] _alias;
    private readonly double[] _groupProbability;
    private readonly int[] _groupAlias;
    private readonly double[] _groupMass;
    private readonly byte[] _groupOf;

    /// <summary>Builds the tables of one layer.</summary>
    /// <param name="load">The layer's load row p (N values, any scale, not all zero).</param>
    /// <param name="groups">Groups of consecutive experts (1: none).</param>
    /// <param name="topKGroups">Groups a token may use; <paramref name="groups"/> (or more) turns the limit off.</param>
    public ExpertSampler(ReadOnlySpan<double> load, int groups, int topKGroups)
    {
        _experts = load.Length;
        _groupSize = _experts / groups;
        _limited = groups > 1 && topKGroups < groups;
        _maxGroups = _limited ? topKGroups : groups;
        var total = 0.0;
        foreach (var v in load) total += v;
        var floor = WeightFloor * total / _experts;
        _weights = new double[_experts];
        for (var e = 0; e < _experts; e++) _weights[e] = Math.Max(load[e], floor);
        _probability = new double[_experts];
        _alias = new int[_experts];
        BuildAlias(_weights, _probability, _alias);
        _groupProbability = new double[_experts];
        _groupAlias = new int[_experts];
        _groupMass = new double[groups];
        _groupOf = new byte[_experts];
        if (_limited)
            for (var e = 0; e < _experts; e++) _groupOf[e] = (byte)(e / _groupSize);
        for (var g = 0; g < groups; g++)
        {
            var range = new Range(g * _groupSize, (g + 1) * _groupSize);
            BuildAlias(_weights.AsSpan(range), _groupProbability.AsSpan(range), _groupAlias.AsSpan(range));
            foreach (var w in _weights.AsSpan(range)) _groupMass[g] += w;
        }
    }

    /// <summary>N, the layer's experts.</summary>
    public int Experts => _experts;

    /// <summary>
    /// Writes one token's K = <paramref name="ids"/>.Length distinct experts. Each of the
    /// <paramref name="favourites"/> (its request's own experts, empty for none) is kept with
    /// probability <paramref name="affinity"/>; the remaining picks are fresh draws.
    /// </summary>
    [SkipLocalsInit]
    public void Draw(ref FastRandom random, Span<int> ids, ReadOnlySpan<ushort> favourites, double affinity)
    {
        var k = ids.Length;
        var count = 0;
        // Groups used so far (a bit each; group-limited routing has at most 64 groups).
        var used = 0UL;
        var groupsUsed = 0;
        if (!favourites.IsEmpty && affinity > 0)
        {
            // Each of the request's experts is kept with probability `affinity` (the kept set, not its
            // order, matters); four 16-bit uniforms per 64 random bits.
            var threshold = (uint)Math.Round(affinity * 65536);
            var bits = 0UL;
            for (var i = 0; i < favourites.Length && count < k; i++)
            {
                if ((i & 3) == 0) bits = random.NextULong();
                var keep = (uint)(bits & 0xFFFF) < threshold;
                bits >>= 16;
                if (!keep) continue;
                var expert = favourites[i];
                ids[count++] = expert;
                if (_limited) Use(_groupOf[expert], ref used, ref groupsUsed);
            }
        }
        var rejections = 0;
        // Once the group limit is reached the allowed groups are fixed: their masses are summed once.
        Span<double> limitMass = stackalloc double[_limited ? _maxGroups : 0];
        Span<int> limitGroups = stackalloc int[_limited ? _maxGroups : 0];
        var limitTotal = -1.0;
        while (count < k)
        {
            int expert;
            if (_limited && groupsUsed == _maxGroups)
            {
                if (limitTotal < 0) limitTotal = AllowedGroups(used, limitGroups, limitMass);
                expert = PickInGroups(ref random, limitGroups, limitMass, limitTotal);
            }
            else
            {
                expert = Pick(ref random, _probability, _alias);
            }
            if (ids[..count].Contains(expert))
            {
                // Nearly every allowed expert is taken (tiny groups or one dominant expert): take the
                // heaviest free one of the allowed experts instead of rejecting forever.
                if (++rejections < RejectionsBeforeScan) continue;
                expert = HeaviestFree(ids[..count], groupsUsed == _maxGroups ? used : ulong.MaxValue);
            }
            rejections = 0;
            ids[count++] = expert;
            if (_limited) Use(_groupOf[expert], ref used, ref groupsUsed);
        }
    }

    private static void Use(int group, ref ulong used, ref int groupsUsed)
    {
        var bit = 1UL << group;
        if ((used & bit) != 0) return;
        used |= bit;
        groupsUsed++;
    }

    // The used groups and their cumulative masses; returns the total.
    private double AllowedGroups(ulong used, Span<int> groups, Span<double> cumulative)
    {
        var total = 0.0;
        var i = 0;
        for (var bits = used; bits != 0; bits &= bits - 1)
        {
            var g = BitOperations.TrailingZeroCount(bits);
            total += _groupMass[g];
            groups[i] = g;
            cumulative[i++] = total;
        }
        return total;
    }

    // The group limit is reached: one of the used groups by its load, then an expert in it by its load.
    private int PickInGroups(ref FastRandom random, ReadOnlySpan<int> groups, ReadOnlySpan<double> cumulative, double total)
    {
        var u = random.NextDouble() * total;
        var i = 0;
        while (i < groups.Length - 1 && u >= cumulative[i]) i++;
        var first = groups[i] * _groupSize;
        return first + Pick(ref random, _groupProbability.AsSpan(first, _groupSize), _groupAlias.AsSpan(first, _groupSize));
    }

    private int HeaviestFree(ReadOnlySpan<int> taken, ulong allowedGroups)
    {
        var best = -1;
        for (var e = 0; e < _experts; e++)
        {
            if (taken.Contains(e)) continue;
            if (_limited && (allowedGroups & (1UL << (e / _groupSize))) == 0) continue;
            if (best < 0 || _weights[e] > _weights[best]) best = e;
        }
        return best;
    }

    private static int Pick(ref FastRandom random, ReadOnlySpan<double> probability, ReadOnlySpan<int> alias)
    {
        var u = random.NextDouble() * probability.Length;
        var column = Math.Min((int)u, probability.Length - 1);
        return u - column < probability[column] ? column : alias[column];
    }

    // Walker's alias method (Vose's stable construction): O(n) to build, O(1) per draw.
    private static void BuildAlias(ReadOnlySpan<double> weights, Span<double> probability, Span<int> alias)
    {
        var n = weights.Length;
        var sum = 0.0;
        foreach (var w in weights) sum += w;
        var small = new int[n];
        var large = new int[n];
        int smallCount = 0, largeCount = 0;
        for (var e = 0; e < n; e++)
        {
            probability[e] = weights[e] / sum * n;
            alias[e] = e;
            if (probability[e] < 1) small[smallCount++] = e;
            else large[largeCount++] = e;
        }
        while (smallCount > 0 && largeCount > 0)
        {
            var lo = small[--smallCount];
            var hi = large[largeCount - 1];
            alias[lo] = hi;
            probability[hi] -= 1 - probability[lo];
            if (probability[hi] < 1)
            {
                largeCount--;
                small[smallCount++] = hi;
            }
        }
        while (largeCount > 0) probability[large[--largeCount]] = 1;
        while (smallCount > 0) probability[small[--smallCount]] = 1;  // rounding leftovers
    }
}
