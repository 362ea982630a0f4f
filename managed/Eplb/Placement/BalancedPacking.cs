using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace Eplb.Placement;

/// <summary>
/// DeepSeek's <c>balanced_packing</c> (deepseek-ai/EPLB <c>eplb.py</c>) with the tie rules of docs/design.md §2.1:
/// n items into m packs of exactly n/m; items by weight descending (stable: equal weights keep
/// ascending index order), each into the lightest pack not yet full (ties: lowest pack id). Pack
/// sums are float32, as the reference accumulates float32 tensors.
/// </summary>
/// <remarks>
/// Speed (issue 14): planning DeepSeek-V3 packs 58 x 4 x 72 or 58 x 288 items, so both inner steps
/// avoid branches that depend on the loads. <see cref="Order"/> is a vectorised counting rank for
/// up to 128 items and a bucket sort above; <see cref="PackInOrder"/> keeps the pack sums in vector
/// lanes and finds the lightest open pack as the first lane equal to their minimum. Both give
/// exactly the order and the choices of a stable sort and a linear scan.
/// </remarks>
internal sealed class BalancedPacking
{
    // Up to this many items the counting rank's n^2 / lanes comparisons cost less than the bucket
    // sort's passes (a node's 64 experts: rank; 256 experts on one node: buckets).
    private const int RankSortMaxItems = 128;

    // Above this many items in one bucket, the insertion sort's moves could cost more than the radix sort.
    private const int BucketMaxItems = 32;

    private int[] _order = [];
    private int[] _rankKeys = [];
    private int[] _heavier = [];
    private int[] _taken = [];
    private ulong[] _radix = [], _radixSwap = [];
    private readonly int[] _histogram = new int[4 * 256];
    private Vector256<int>[] _packKeys = [];  // [jobs][blocks] of Vector128 or Vector256 lanes
    private float[] _packWeight = [];
    private int[] _packCount = [];
    private int[] _members = [];  // [m][n/m]: item ids in insertion order (noDuplicateOnGpu)

    /// <summary>
    /// Whether <see cref="PackInOrder"/> uses 256-bit vectors (8 packs a register) or 128-bit ones
    /// (4 packs a register, what every 64-bit target has). The result is the same; tests set it.
    /// </summary>
    internal bool WideVectors { get; init; } = Vector256.IsHardwareAccelerated;

    /// <summary>
    /// Packs <paramref name="weight"/> into <paramref name="packs"/> packs. <paramref name="packOf"/>
    /// gets each item's pack and <paramref name="rankOf"/> its insertion rank in that pack (heavier first).
    /// With <paramref name="owner"/> given, no pack takes two items of one owner (noDuplicateOnGpu);
    /// the caller guarantees that no owner has more items than there are packs.
    /// </summary>
    public void Pack(ReadOnlySpan<float> weight, int packs, Span<int> packOf, Span<int> rankOf, ReadOnlySpan<int> owner = default)
    {
        var n = weight.Length;
        if (n / packs == 1)
        {
            Identity(n, packOf, rankOf);
            return;
        }
        Grow(ref _order, n);
        var order = _order.AsSpan(0, n);
        Order(weight, order);
        if (owner.IsEmpty) PackInOrder(order, weight, 1, packs, packOf[..n], rankOf[..n]);
        else PackWithoutDuplicates(order, weight, packs, packOf, rankOf, owner);
    }

    /// <summary>
    /// The greedy step of <see cref="Pack"/> for <paramref name="jobs"/> independent packings of the
    /// same size at once (every span is <c>[jobs][n]</c>; item ids are per job): each job's items,
    /// already in stable descending order (<paramref name="order"/>, as <see cref="Order"/> gives
    /// it), each into the lightest pack not yet full, ties to the lowest pack id. One item per pack
    /// is the reference's shortcut (item i is pack i), whatever the order.
    /// </summary>
    /// <remarks>
    /// Each choice depends on the one before, so a single packing runs at the latency of one
    /// choice; the jobs take turns item by item, so the processor works on several choices at once.
    /// A pack's sum is kept as the bits of its float32 value (the bits of non-negative floats order
    /// as the floats), an int the size of a vector lane; a full pack and the padding hold
    /// int.MaxValue, above every float including +inf. The lightest open pack is then the first
    /// lane equal to the minimum of all lanes: no branch depends on the loads.
    /// </remarks>
    /// <exception cref="ArgumentException">The spans are not <c>[jobs][n]</c>, or n is not a multiple of <paramref name="packs"/>.</exception>
    public void PackInOrder(ReadOnlySpan<int> order, ReadOnlySpan<float> weight, int jobs, int packs, Span<int> packOf, Span<int> rankOf)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(jobs, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(packs, 1);
        var n = order.Length / jobs;
        if (order.Length != jobs * n || n % packs != 0 || weight.Length != order.Length || packOf.Length != order.Length || rankOf.Length != order.Length)
            throw new ArgumentException($"packing {jobs} jobs into {packs} packs needs [jobs][n] spans with n a multiple of the packs " +
                $"(order {order.Length}, weight {weight.Length}, packOf {packOf.Length}, rankOf {rankOf.Length})");
        if (n / packs == 1)
        {
            for (var j = 0; j < jobs; j++) Identity(n, packOf.Slice(j * n, n), rankOf.Slice(j * n, n));
            return;
        }
        if (WideVectors) PackInOrder<Vector256<int>, Lanes256>(order, weight, jobs, packs, packOf, rankOf);
        else PackInOrder<Vector128<int>, Lanes128>(order, weight, jobs, packs, packOf, rankOf);
    }

    private void PackInOrder<TVector, TLanes>(ReadOnlySpan<int> order, ReadOnlySpan<float> weight, int jobs, int packs, Span<int> packOf, Span<int> rankOf)
        where TVector : unmanaged
        where TLanes : ILanes<TVector>
    {
        var n = order.Length / jobs;
        var cap = n / packs;
        var lanes = TLanes.Count;
        var blocks = (packs + lanes - 1) / lanes;
        Grow(ref _packCount, jobs * packs);
        var counts = _packCount.AsSpan(0, jobs * packs);
        counts.Clear();
        var first = 0;
        if (blocks == 1)
        {
            // The common shape (up to 8 GPUs per node): four jobs' keys in four registers.
            for (; first + 4 <= jobs; first += 4)
                PackFour<TVector, TLanes>(order.Slice(first * n, 4 * n), weight.Slice(first * n, 4 * n), packs, cap,
                    packOf.Slice(first * n, 4 * n), rankOf.Slice(first * n, 4 * n), counts.Slice(first * packs, 4 * packs));
            if (first == jobs) return;
        }
        else if (blocks <= 4)
        {
            // Up to 32 GPUs per node: four registers per job.
            for (; first + 4 <= jobs; first += 4)
                PackFourWide<TVector, TLanes>(order.Slice(first * n, 4 * n), weight.Slice(first * n, 4 * n), packs, cap,
                    packOf.Slice(first * n, 4 * n), rankOf.Slice(first * n, 4 * n), counts.Slice(first * packs, 4 * packs));
            if (first == jobs) return;
        }
        var rest = jobs - first;
        Grow(ref _packKeys, (rest * blocks * lanes + Vector256<int>.Count - 1) / Vector256<int>.Count);
        var keys = MemoryMarshal.Cast<Vector256<int>, TVector>(_packKeys.AsSpan())[..(rest * blocks)];
        for (var b = 0; b < blocks; b++)
        {
            var initial = TLanes.Initial(b * lanes, packs);
            for (var j = 0; j < rest; j++) keys[j * blocks + b] = initial;
        }
        for (var k = 0; k < n; k++)
        {
            for (var j = 0; j < rest; j++)
            {
                var job = first + j;
                var key = keys.Slice(j * blocks, blocks);
                var best = Lightest<TVector, TLanes>(key);
                var item = order[job * n + k];
                if ((uint)item >= (uint)n) throw new ArgumentOutOfRangeException(nameof(order), $"item {item} of job {job} is outside [0, {n})");
                item += job * n;
                var count = ++counts[job * packs + best];
                packOf[item] = best;
                rankOf[item] = count - 1;
                ref var block = ref key[(int)((uint)best / (uint)lanes)];
                block = TLanes.AddToLane(block, best & (lanes - 1), weight[item], count == cap);
            }
        }
    }

    /// <summary>Four jobs of at most one vector of packs each, item by item in turn, their keys in registers.</summary>
    private static void PackFour<TVector, TLanes>(ReadOnlySpan<int> order, ReadOnlySpan<float> weight, int packs, int cap,
        Span<int> packOf, Span<int> rankOf, Span<int> counts)
        where TVector : unmanaged
        where TLanes : ILanes<TVector>
    {
        var n = order.Length / 4;
        var key0 = TLanes.Initial(0, packs);
        var key1 = key0;
        var key2 = key0;
        var key3 = key0;
        var jobs = new PackJobs(order, weight, packOf, rankOf, counts, n, packs, cap);
        for (var k = 0; k < n; k++)
        {
            key0 = jobs.Place<TVector, TLanes>(key0, 0, k);
            key1 = jobs.Place<TVector, TLanes>(key1, 1, k);
            key2 = jobs.Place<TVector, TLanes>(key2, 2, k);
            key3 = jobs.Place<TVector, TLanes>(key3, 3, k);
        }
    }

    /// <summary>Four jobs of at most four vectors of packs each, item by item in turn.</summary>
    private static void PackFourWide<TVector, TLanes>(ReadOnlySpan<int> order, ReadOnlySpan<float> weight, int packs, int cap,
        Span<int> packOf, Span<int> rankOf, Span<int> counts)
        where TVector : unmanaged
        where TLanes : ILanes<TVector>
    {
        var n = order.Length / 4;
        var initial = new WideKeys<TVector>(TLanes.Initial(0, packs), TLanes.Initial(TLanes.Count, packs),
            TLanes.Initial(2 * TLanes.Count, packs), TLanes.Initial(3 * TLanes.Count, packs));
        var key0 = initial;
        var key1 = initial;
        var key2 = initial;
        var key3 = initial;
        var jobs = new PackJobs(order, weight, packOf, rankOf, counts, n, packs, cap);
        for (var k = 0; k < n; k++)
        {
            jobs.Place<TVector, TLanes>(ref key0, 0, k);
            jobs.Place<TVector, TLanes>(ref key1, 1, k);
            jobs.Place<TVector, TLanes>(ref key2, 2, k);
            jobs.Place<TVector, TLanes>(ref key3, 3, k);
        }
    }

    /// <summary>The pack keys of one job, four vectors wide.</summary>
    private record struct WideKeys<TVector>(TVector A, TVector B, TVector C, TVector D);

    /// <summary>
    /// The arrays of several jobs (<c>[jobs][n]</c>, counts <c>[jobs][packs]</c>) as bare references:
    /// the hot loop indexes them without bounds checks, after checking the one index that comes
    /// from the caller's data (the item id).
    /// </summary>
    private readonly ref struct PackJobs(ReadOnlySpan<int> order, ReadOnlySpan<float> weight, Span<int> packOf, Span<int> rankOf,
        Span<int> counts, int n, int packs, int cap)
    {
        private readonly ref int _order = ref MemoryMarshal.GetReference(order);
        private readonly ref float _weight = ref MemoryMarshal.GetReference(weight);
        private readonly ref int _packOf = ref MemoryMarshal.GetReference(packOf);
        private readonly ref int _rankOf = ref MemoryMarshal.GetReference(rankOf);
        private readonly ref int _counts = ref MemoryMarshal.GetReference(counts);

        /// <summary>Puts item k of <paramref name="job"/> into its lightest open pack; returns the job's new keys.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public TVector Place<TVector, TLanes>(TVector key, int job, int k)
            where TVector : unmanaged
            where TLanes : ILanes<TVector>
        {
            var best = BitOperations.TrailingZeroCount(TLanes.EqualMask(key, TLanes.MinOfLanes(key)));
            var item = Unsafe.Add(ref _order, job * n + k);
            if ((uint)item >= (uint)n) throw new ArgumentOutOfRangeException(nameof(order), $"item {item} of job {job} is outside [0, {n})");
            item += job * n;
            var count = ++Unsafe.Add(ref _counts, job * packs + best);
            Unsafe.Add(ref _packOf, item) = best;
            Unsafe.Add(ref _rankOf, item) = count - 1;
            return TLanes.AddToLane(key, best, Unsafe.Add(ref _weight, item), count == cap);
        }

        /// <summary>As above for four vectors of packs: every vector takes the update, only the chosen lane changes.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Place<TVector, TLanes>(ref WideKeys<TVector> key, int job, int k)
            where TVector : unmanaged
            where TLanes : ILanes<TVector>
        {
            var min = TLanes.MinOfLanes(TLanes.Min(TLanes.Min(key.A, key.B), TLanes.Min(key.C, key.D)));
            var lanes = TLanes.Count;
            var hits = (ulong)TLanes.EqualMask(key.A, min) | (ulong)TLanes.EqualMask(key.B, min) << lanes
                | (ulong)TLanes.EqualMask(key.C, min) << (2 * lanes) | (ulong)TLanes.EqualMask(key.D, min) << (3 * lanes);
            var best = BitOperations.TrailingZeroCount(hits);
            var item = Unsafe.Add(ref _order, job * n + k);
            if ((uint)item >= (uint)n) throw new ArgumentOutOfRangeException(nameof(order), $"item {item} of job {job} is outside [0, {n})");
            item += job * n;
            var count = ++Unsafe.Add(ref _counts, job * packs + best);
            Unsafe.Add(ref _packOf, item) = best;
            Unsafe.Add(ref _rankOf, item) = count - 1;
            var w = Unsafe.Add(ref _weight, item);
            var full = count == cap;
            key = new WideKeys<TVector>(TLanes.AddToLane(key.A, best, w, full), TLanes.AddToLane(key.B, best - lanes, w, full),
                TLanes.AddToLane(key.C, best - 2 * lanes, w, full), TLanes.AddToLane(key.D, best - 3 * lanes, w, full));
        }
    }

    /// <summary>The first lane holding the smallest key (ties: lowest lane).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Lightest<TVector, TLanes>(ReadOnlySpan<TVector> key)
        where TVector : unmanaged
        where TLanes : ILanes<TVector>
    {
        var min = key[0];
        for (var b = 1; b < key.Length; b++) min = TLanes.Min(min, key[b]);
        min = TLanes.MinOfLanes(min);
        if (key.Length == 1) return BitOperations.TrailingZeroCount(TLanes.EqualMask(key[0], min));
        // Up to 64 lanes at a time into one bit mask, without a branch per block.
        var perMask = 64 / TLanes.Count;
        for (var first = 0; ; first += perMask)
        {
            var hits = 0ul;
            var end = Math.Min(first + perMask, key.Length);
            for (var b = first; b < end; b++) hits |= (ulong)TLanes.EqualMask(key[b], min) << (TLanes.Count * (b - first));
            if (hits != 0) return TLanes.Count * first + BitOperations.TrailingZeroCount(hits);
        }
    }

    /// <summary>The vector operations of the packing loop, for one register width.</summary>
    private interface ILanes<TVector>
    {
        static abstract int Count { get; }

        /// <summary>A block of pack keys: 0 (empty) for lanes below <paramref name="packs"/>, int.MaxValue (no pack) above.</summary>
        static abstract TVector Initial(int firstLane, int packs);

        static abstract TVector Min(TVector a, TVector b);

        /// <summary>Every lane gets the smallest lane.</summary>
        static abstract TVector MinOfLanes(TVector v);

        /// <summary>Bit i set where lane i of <paramref name="a"/> equals that of <paramref name="b"/>.</summary>
        static abstract uint EqualMask(TVector a, TVector b);

        /// <summary>Adds <paramref name="weight"/> to the float32 sum in <paramref name="lane"/>, or closes it (int.MaxValue) when <paramref name="full"/>.</summary>
        static abstract TVector AddToLane(TVector block, int lane, float weight, bool full);
    }

    private readonly struct Lanes128 : ILanes<Vector128<int>>
    {
        public static int Count => Vector128<int>.Count;

        public static Vector128<int> Initial(int firstLane, int packs) =>
            Vector128.ConditionalSelect(Vector128.LessThan(Vector128<int>.Indices + Vector128.Create(firstLane), Vector128.Create(packs)),
                Vector128<int>.Zero, Vector128.Create(int.MaxValue));

        public static Vector128<int> Min(Vector128<int> a, Vector128<int> b) => Vector128.Min(a, b);

        public static Vector128<int> MinOfLanes(Vector128<int> v)
        {
            v = Vector128.Min(v, Vector128.Shuffle(v, Vector128.Create(2, 3, 0, 1)));
            return Vector128.Min(v, Vector128.Shuffle(v, Vector128.Create(1, 0, 3, 2)));
        }

        public static uint EqualMask(Vector128<int> a, Vector128<int> b) => Vector128.Equals(a, b).ExtractMostSignificantBits();

        public static Vector128<int> AddToLane(Vector128<int> block, int lane, float weight, bool full)
        {
            // OR-ing int.MaxValue into non-negative float bits closes the pack (no branch to mispredict).
            var sum = (block.AsSingle() + Vector128.Create(weight)).AsInt32() | Vector128.Create(-(full ? 1 : 0) & int.MaxValue);
            return Vector128.ConditionalSelect(Vector128.Equals(Vector128<int>.Indices, Vector128.Create(lane)), sum, block);
        }
    }

    private readonly struct Lanes256 : ILanes<Vector256<int>>
    {
        public static int Count => Vector256<int>.Count;

        public static Vector256<int> Initial(int firstLane, int packs) =>
            Vector256.ConditionalSelect(Vector256.LessThan(Vector256<int>.Indices + Vector256.Create(firstLane), Vector256.Create(packs)),
                Vector256<int>.Zero, Vector256.Create(int.MaxValue));

        public static Vector256<int> Min(Vector256<int> a, Vector256<int> b) => Vector256.Min(a, b);

        public static Vector256<int> MinOfLanes(Vector256<int> v)
        {
            v = Vector256.Min(v, Vector256.Shuffle(v, Vector256.Create(4, 5, 6, 7, 0, 1, 2, 3)));
            v = Vector256.Min(v, Vector256.Shuffle(v, Vector256.Create(2, 3, 0, 1, 6, 7, 4, 5)));
            return Vector256.Min(v, Vector256.Shuffle(v, Vector256.Create(1, 0, 3, 2, 5, 4, 7, 6)));
        }

        public static uint EqualMask(Vector256<int> a, Vector256<int> b) => Vector256.Equals(a, b).ExtractMostSignificantBits();

        public static Vector256<int> AddToLane(Vector256<int> block, int lane, float weight, bool full)
        {
            // OR-ing int.MaxValue into non-negative float bits closes the pack (no branch to mispredict).
            var sum = (block.AsSingle() + Vector256.Create(weight)).AsInt32() | Vector256.Create(-(full ? 1 : 0) & int.MaxValue);
            return Vector256.ConditionalSelect(Vector256.Equals(Vector256<int>.Indices, Vector256.Create(lane)), sum, block);
        }
    }

    /// <summary>
    /// The stable descending order of <paramref name="weight"/>: <paramref name="order"/>[k] is the
    /// index of the k-th heaviest item, equal weights in ascending index order. Weights compare by
    /// their float32 bits as unsigned integers (the order of the floats for non-negative values).
    /// </summary>
    public void Order(ReadOnlySpan<float> weight, Span<int> order)
    {
        if (weight.Length <= RankSortMaxItems) RankOrder(weight, order);
        else if (!BucketOrder(weight, order)) RadixOrder(weight, order);
    }

    /// <summary>
    /// One counting pass into up to 256 buckets of equal width between the smallest and the largest key
    /// (stable: a bucket holds its items in index order), then an insertion sort that only moves
    /// items inside their bucket. Loads spread over several octaves, so buckets hold a few items
    /// each; when one holds more than <see cref="BucketMaxItems"/> it returns false and leaves
    /// the order to the radix sort, which costs the same on any input.
    /// </summary>
    internal bool BucketOrder(ReadOnlySpan<float> weight, Span<int> order)
    {
        var n = weight.Length;
        Grow(ref _radix, n);
        Grow(ref _radixSwap, n);
        var keys = _radixSwap.AsSpan(0, n);
        var min = uint.MaxValue;
        var max = 0u;
        for (var i = 0; i < n; i++)
        {
            var key = ~BitConverter.SingleToUInt32Bits(weight[i]);
            keys[i] = (ulong)key << 32 | (uint)i;
            min = Math.Min(min, key);
            max = Math.Max(max, key);
        }
        // About one bucket per item, at most 256: bucket = (key - min) >> shift < buckets.
        var bits = Math.Min(8, BitOperations.Log2((uint)n - 1) + 1);
        var buckets = 1 << bits;
        var range = max - min;
        var shift = Math.Max(0, 32 - BitOperations.LeadingZeroCount(range) - bits);
        var start = _histogram.AsSpan(0, buckets);
        start.Clear();
        foreach (var v in keys) start[(int)(((uint)(v >> 32) - min) >> shift)]++;
        var sum = 0;
        for (var b = 0; b < buckets; b++)
        {
            var c = start[b];
            if (c > BucketMaxItems) return false;
            start[b] = sum;
            sum += c;
        }
        var sorted = _radix.AsSpan(0, n);
        foreach (var v in keys) sorted[start[(int)(((uint)(v >> 32) - min) >> shift)]++] = v;
        // (key, index) pairs are distinct, and only items of one bucket are out of order.
        for (var i = 1; i < n; i++)
        {
            var v = sorted[i];
            var j = i - 1;
            for (; j >= 0 && sorted[j] > v; j--) sorted[j + 1] = sorted[j];
            sorted[j + 1] = v;
        }
        for (var k = 0; k < n; k++) order[k] = (int)(uint)sorted[k];
        return true;
    }

    /// <summary>
    /// Counting rank: item i lands after the items heavier than it and the equal ones with a lower
    /// index. The heavier ones are counted for 32 items at a time against every item (a broadcast,
    /// then a comparison and an add per vector; no branch depends on the weights). Equal weights
    /// have equal counts and different weights different ones, so going through the items in index
    /// order and taking the next free place after the count resolves ties as the stable sort does.
    /// </summary>
    internal void RankOrder(ReadOnlySpan<float> weight, Span<int> order)
    {
        var n = weight.Length;
        var lanes = Vector<int>.Count;
        var step = 4 * lanes;
        var padded = (n + step - 1) / step * step;
        Grow(ref _rankKeys, padded);
        Grow(ref _heavier, padded);
        Grow(ref _taken, n);
        // Flipping the sign bit makes signed comparisons order the bits as unsigned integers.
        var keys = _rankKeys.AsSpan(0, padded);
        for (var i = 0; i < n; i++) keys[i] = (int)(BitConverter.SingleToUInt32Bits(weight[i]) ^ 0x8000_0000u);
        var heavier = _heavier.AsSpan(0, padded);
        for (var first = 0; first < n; first += step)
        {
            var mine0 = new Vector<int>(keys[first..]);
            var mine1 = new Vector<int>(keys[(first + lanes)..]);
            var mine2 = new Vector<int>(keys[(first + 2 * lanes)..]);
            var mine3 = new Vector<int>(keys[(first + 3 * lanes)..]);
            Vector<int> count0 = default, count1 = default, count2 = default, count3 = default;
            foreach (var key in keys[..n])
            {
                var other = new Vector<int>(key);
                count0 += Vector.GreaterThan(other, mine0);  // -1 per heavier item
                count1 += Vector.GreaterThan(other, mine1);
                count2 += Vector.GreaterThan(other, mine2);
                count3 += Vector.GreaterThan(other, mine3);
            }
            (-count0).CopyTo(heavier[first..]);
            (-count1).CopyTo(heavier[(first + lanes)..]);
            (-count2).CopyTo(heavier[(first + 2 * lanes)..]);
            (-count3).CopyTo(heavier[(first + 3 * lanes)..]);
        }
        var taken = _taken.AsSpan(0, n);
        taken.Clear();
        for (var i = 0; i < n; i++)
        {
            var place = heavier[i];
            order[place + taken[place]++] = i;
        }
    }

    /// <summary>
    /// LSD radix sort, a byte at a time, of (inverted weight bits, index) pairs on the weight bits:
    /// stable, so equal weights keep their ascending index. Bytes all items share are skipped.
    /// </summary>
    internal void RadixOrder(ReadOnlySpan<float> weight, Span<int> order)
    {
        var n = weight.Length;
        Grow(ref _radix, n);
        Grow(ref _radixSwap, n);
        var source = _radix.AsSpan(0, n);
        var target = _radixSwap.AsSpan(0, n);
        var histogram = _histogram.AsSpan();
        histogram.Clear();
        for (var i = 0; i < n; i++)
        {
            var key = ~BitConverter.SingleToUInt32Bits(weight[i]);
            source[i] = (ulong)key << 32 | (uint)i;
            histogram[(int)(key & 0xFF)]++;
            histogram[256 + (int)(key >> 8 & 0xFF)]++;
            histogram[512 + (int)(key >> 16 & 0xFF)]++;
            histogram[768 + (int)(key >> 24)]++;
        }
        for (var pass = 0; pass < 4; pass++)
        {
            var shift = 32 + 8 * pass;
            var counts = histogram.Slice(256 * pass, 256);
            if (counts[(int)(source[0] >> shift & 0xFF)] == n) continue;
            var sum = 0;
            for (var b = 0; b < 256; b++)
            {
                var c = counts[b];
                counts[b] = sum;
                sum += c;
            }
            foreach (var v in source) target[counts[(int)(v >> shift & 0xFF)]++] = v;
            var swap = source;
            source = target;
            target = swap;
        }
        for (var k = 0; k < n; k++) order[k] = (int)(uint)source[k];
    }

    /// <summary>
    /// The noDuplicateOnGpu greedy: items in <paramref name="order"/>, each into the lightest pack
    /// with room that does not hold its owner yet (a linear scan: the owner test is per pack).
    /// </summary>
    private void PackWithoutDuplicates(ReadOnlySpan<int> order, ReadOnlySpan<float> weight, int packs, Span<int> packOf, Span<int> rankOf, ReadOnlySpan<int> owner)
    {
        var n = order.Length;
        var cap = n / packs;
        Grow(ref _packWeight, packs);
        Grow(ref _packCount, packs);
        Grow(ref _members, n);
        var packWeight = _packWeight.AsSpan(0, packs);
        var packCount = _packCount.AsSpan(0, packs);
        packWeight.Clear();
        packCount.Clear();
        foreach (var item in order)
        {
            var best = -1;
            for (var p = 0; p < packs; p++)
            {
                if (packCount[p] == cap || Holds(p, cap, owner, owner[item])) continue;
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

    /// <summary>The reference's shortcut for one item per pack: item i is pack i.</summary>
    private static void Identity(int n, Span<int> packOf, Span<int> rankOf)
    {
        for (var i = 0; i < n; i++) packOf[i] = i;
        rankOf[..n].Clear();
    }

    private static void Grow<T>(ref T[] array, int length)
    {
        if (array.Length < length) array = new T[length];
    }
}
