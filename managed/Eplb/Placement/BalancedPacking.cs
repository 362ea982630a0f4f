namespace Eplb.Placement;

/// <summary>
/// DeepSeek's <c>balanced_packing</c> (deepseek-ai/EPLB <c>eplb.py</c>) with the tie rules of SPEC 2.1:
/// n items into m packs of exactly n/m; items by weight descending (stable: equal weights keep
/// ascending index order), each into the lightest pack not yet full (ties: lowest pack id). Pack
/// sums are float32, as the reference accumulates float32 tensors.
/// </summary>
internal sealed class BalancedPacking
{
    private ulong[] _keys = [];
    private float[] _packWeight = [];
    private int[] _packCount = [];
    private int[] _members = [];  // [m][n/m]: item ids in insertion order (noDuplicateOnGpu)
    private int[] _heap = [];

    /// <summary>
    /// Packs <paramref name="weight"/> into <paramref name="packs"/> packs. <paramref name="packOf"/>
    /// gets each item's pack and <paramref name="rankOf"/> its insertion rank in that pack (heavier first).
    /// With <paramref name="owner"/> given, no pack takes two items of one owner (noDuplicateOnGpu);
    /// the caller guarantees that no owner has more items than there are packs.
    /// </summary>
    public void Pack(ReadOnlySpan<float> weight, int packs, Span<int> packOf, Span<int> rankOf, ReadOnlySpan<int> owner = default)
    {
        var n = weight.Length;
        var cap = n / packs;
        if (cap == 1)
        {
            // The reference's shortcut: item i is pack i (no owner can repeat in a pack of one).
            for (var i = 0; i < n; i++)
            {
                packOf[i] = i;
                rankOf[i] = 0;
            }
            return;
        }
        Grow(ref _keys, n);
        Grow(ref _packWeight, packs);
        Grow(ref _packCount, packs);
        Grow(ref _members, n);
        // One ascending sort of (descending weight, ascending index) keys is the stable descending
        // sort: the bits of a non-negative float order like the float, so ~bits orders descending.
        var keys = _keys.AsSpan(0, n);
        for (var i = 0; i < n; i++)
            keys[i] = (ulong)~BitConverter.SingleToUInt32Bits(weight[i]) << 32 | (uint)i;
        keys.Sort();
        var packWeight = _packWeight.AsSpan(0, packs);
        var packCount = _packCount.AsSpan(0, packs);
        packWeight.Clear();
        packCount.Clear();
        if (owner.IsEmpty)
        {
            // Min-heap of the packs with room, by weight then id: its top is the linear scan's pick.
            Grow(ref _heap, packs);
            var heap = _heap.AsSpan(0, packs);
            for (var p = 0; p < packs; p++) heap[p] = p;
            foreach (var key in keys)
            {
                var item = (int)(uint)key;
                var best = heap[0];
                packOf[item] = best;
                rankOf[item] = packCount[best]++;
                packWeight[best] += weight[item];
                if (packCount[best] == cap)
                {
                    heap[0] = heap[^1];
                    heap = heap[..^1];
                }
                if (heap.Length > 0) PriorityHeap.SiftDownMin(heap, packWeight, 0);
            }
            return;
        }
        foreach (var key in keys)
        {
            var item = (int)(uint)key;
            var best = -1;
            for (var p = 0; p < packs; p++)
            {
                if (packCount[p] == cap || (!owner.IsEmpty && Holds(p, cap, owner, owner[item]))) continue;
                if (best < 0 || packWeight[p] < packWeight[best]) best = p;
            }
            if (best < 0)
            {
                best = SwapOut(item, packs, cap, weight, packOf, rankOf, owner);
            }
            packOf[item] = best;
            rankOf[item] = packCount[best];
            _members[best * cap + packCount[best]++] = item;
            packWeight[best] += weight[item];
        }
    }

    private bool Holds(int pack, int cap, ReadOnlySpan<int> owner, int who)
    {
        var members = _members.AsSpan(pack * cap, _packCount[pack]);
        foreach (var m in members)
            if (owner[m] == who) return true;
        return false;
    }

    /// <summary>
    /// noDuplicateOnGpu dead end: every pack with room already holds the item's owner. Some full pack
    /// q lacks the owner (the owner has fewer items than packs), and q has an item x whose owner the
    /// open pack p lacks (q has more distinct owners than p has items). Moving x to p frees x's place
    /// in q for the item; the first such (q, x) in pack and rank order is taken. Returns q.
    /// </summary>
    private int SwapOut(int item, int packs, int cap, ReadOnlySpan<float> weight, Span<int> packOf, Span<int> rankOf, ReadOnlySpan<int> owner)
    {
        var open = -1;
        for (var p = 0; p < packs; p++)
            if (_packCount[p] < cap && (open < 0 || _packWeight[p] < _packWeight[open])) open = p;
        for (var q = 0; q < packs; q++)
        {
            if (q == open || Holds(q, cap, owner, owner[item])) continue;
            for (var r = 0; r < _packCount[q]; r++)
            {
                var x = _members[q * cap + r];
                if (Holds(open, cap, owner, owner[x])) continue;
                // x: q -> open (appended); the item will take x's rank in q.
                packOf[x] = open;
                rankOf[x] = _packCount[open];
                _members[open * cap + _packCount[open]++] = x;
                _packWeight[open] += weight[x];
                _packWeight[q] -= weight[x];
                // Re-append the item into q at x's rank: shift nothing, reuse the position.
                _members[q * cap + r] = _members[q * cap + --_packCount[q]];
                for (var k = 0; k < _packCount[q]; k++) rankOf[_members[q * cap + k]] = k;
                return q;
            }
        }
        throw new InvalidOperationException("noDuplicateOnGpu packing found no exchange (an owner has more items than packs)");
    }

    private static void Grow<T>(ref T[] array, int length)
    {
        if (array.Length < length) array = new T[length];
    }
}
