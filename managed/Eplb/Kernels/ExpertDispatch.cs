using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// The data movement between routing and the experts (SPEC 6): align/sort the routed (token, k)
/// pairs into an expert-contiguous layout, permute activation rows into it, combine the expert
/// outputs back into token order, and bucket pairs by destination rank for expert parallelism.
/// A pair is named by its flat index <c>token * topK + k</c>; <c>physicalIds</c> are the slots of
/// <see cref="ExpertMapping.MapToPhysical(ComputeStream, DeviceSlice{int}, int, EplbLayerState, DeviceSlice{int}, DeviceSlice{int})"/>,
/// -1 where a pair is not routed. Elements are <see cref="float"/> or <see cref="BFloat16"/>.
/// Every result is deterministic, and the CUDA kernels give the CPU reference's bits.
/// </summary>
/// <remarks>
/// One rank: <see cref="Align(ComputeStream, DeviceSlice{int}, ExpertLayout)"/>, <see cref="Permute{T}(ComputeStream, DeviceSlice{T}, int, ExpertLayout, DeviceSlice{T})"/>,
/// the experts on blocks of <see cref="ExpertLayout.BlockSize"/> rows, then
/// <see cref="Combine{TIn, TOut}(ComputeStream, DeviceSlice{TIn}, int, ExpertLayout, DeviceSlice{float}, DeviceSlice{TOut})"/>.
/// Expert parallelism: <see cref="BucketByRank(ComputeStream, DeviceSlice{int}, RankBuckets)"/> and a permute
/// with the buckets build the send buffer; each receiver runs the one-rank path on its received rows
/// (top-k 1); the returned rows are combined with the buckets and the routing weights.
/// </remarks>
public static unsafe class ExpertDispatch
{
    /// <summary>Marks a padding row, a block past the total, and the position of a pair that takes no row.</summary>
    public const int Padding = NativeConstants.EPLB_DISPATCH_PADDING;

    /// <summary>The most local experts (or ranks) align and bucketing accept.</summary>
    public const int MaxBuckets = NativeConstants.EPLB_DISPATCH_MAX_BUCKETS;

    /// <summary>
    /// Worst-case rows of an aligned layout: <c>pairs + min(slotsPerRank, pairs) * (blockSize - 1)</c>.
    /// </summary>
    /// <exception cref="ArgumentException">A value is out of range or the capacity exceeds int32.</exception>
    public static long AlignCapacity(long pairs, int slotsPerRank, int blockSize)
    {
        long capacity;
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_align_capacity(pairs, slotsPerRank, blockSize, &capacity));
        return capacity;
    }

    // ---------------------------------------------------------------------------------------------
    // Device forms: queued on the stream, every view on the stream's backend.

    /// <summary>
    /// Fills <paramref name="layout"/> from <paramref name="physicalIds"/> <c>[T][K]</c>: the pairs whose
    /// slot is local to the layout's rank, grouped by expert in ascending pair order and padded to
    /// the block size (vLLM's <c>moe_align_block_size</c>, stable).
    /// </summary>
    /// <exception cref="ArgumentException">Sizes disagree with the layout or a view is on another backend.</exception>
    public static void Align(ComputeStream stream, DeviceSlice<int> physicalIds, ExpertLayout layout)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(layout);
        ExpectLength(physicalIds, (long)layout.Tokens * layout.TopK, nameof(physicalIds));
        SameBackend(stream.Backend, layout.Backend, nameof(layout));
        SameBackend(stream.Backend, physicalIds, nameof(physicalIds));

        using var streamLease = stream.Lease(out var s);
        using var idsLease = LeaseOrNull(physicalIds, out var ids);
        using var countsLease = layout.ExpertCounts.Lease(out var counts);
        using var offsetsLease = layout.ExpertOffsets.Lease(out var offsets);
        using var sortedLease = LeaseOrNull(layout.SortedPairIds, out var sorted);
        using var blocksLease = LeaseOrNull(layout.BlockExperts, out var blocks);
        using var positionsLease = LeaseOrNull(layout.PairPositions, out var positions);
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_align(s, ids, layout.Tokens, layout.TopK, layout.FirstSlot,
            layout.SlotsPerRank, layout.BlockSize, layout.Capacity, counts, offsets, sorted, blocks, positions));
    }

    /// <summary>
    /// Fills <paramref name="buckets"/> from <paramref name="physicalIds"/> <c>[T][K]</c> (slots in
    /// <c>[0, R)</c> or -1): per destination rank the count and offset of the routed pairs, the send
    /// order and each pair's send row.
    /// </summary>
    /// <exception cref="ArgumentException">Sizes disagree, a view is on another backend, or (CPU) a slot is out of range.</exception>
    public static void BucketByRank(ComputeStream stream, DeviceSlice<int> physicalIds, RankBuckets buckets)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(buckets);
        ExpectLength(physicalIds, (long)buckets.Tokens * buckets.TopK, nameof(physicalIds));
        SameBackend(stream.Backend, buckets.Backend, nameof(buckets));
        SameBackend(stream.Backend, physicalIds, nameof(physicalIds));

        using var streamLease = stream.Lease(out var s);
        using var idsLease = LeaseOrNull(physicalIds, out var ids);
        using var countsLease = buckets.RankCounts.Lease(out var counts);
        using var offsetsLease = buckets.RankOffsets.Lease(out var offsets);
        using var sendLease = LeaseOrNull(buckets.SendPairIds, out var send);
        using var positionsLease = LeaseOrNull(buckets.PairPositions, out var positions);
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_bucket_by_rank(s, ids, buckets.Tokens, buckets.TopK,
            buckets.Slots, buckets.Ranks, counts, offsets, send, positions));
    }

    /// <summary>
    /// Gathers token rows of <paramref name="x"/> <c>[T][hidden]</c> into <paramref name="output"/>
    /// <c>[capacity][hidden]</c>: row i is <c>x[rowPairIds[i] / topK]</c> for <c>i &lt; numRows[0]</c>;
    /// padding rows and rows from <c>numRows[0]</c> on are not written.
    /// </summary>
    /// <param name="stream">The stream to queue on.</param>
    /// <param name="x">Token rows, T x hidden elements.</param>
    /// <param name="hidden">Elements per row.</param>
    /// <param name="topK">K, to turn a pair into its token.</param>
    /// <param name="rowPairIds">The pair of each output row (capacity elements) or <see cref="Padding"/>.</param>
    /// <param name="numRows">One element: the rows to write (a device scalar, so graph replays stay valid).</param>
    /// <param name="output">Capacity x hidden elements; must not overlap <paramref name="x"/>.</param>
    /// <exception cref="ArgumentException">Sizes disagree, a view is on another backend, or (CPU) an id or the row count is out of range.</exception>
    /// <exception cref="NotSupportedException"><typeparamref name="T"/> is neither float nor BFloat16.</exception>
    public static void Permute<T>(ComputeStream stream, DeviceSlice<T> x, int hidden, int topK, DeviceSlice<int> rowPairIds,
        DeviceSlice<int> numRows, DeviceSlice<T> output) where T : unmanaged
    {
        var dtype = DtypeOf<T>();
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        RequireView(x, nameof(x));
        RequireView(rowPairIds, nameof(rowPairIds));
        RequireView(output, nameof(output));
        ExpectLength(numRows, 1, nameof(numRows));
        var tokens = WholeRows(x.Length, hidden, nameof(x));
        ExpectLength(output, rowPairIds.Length * hidden, nameof(output));
        SameBackend(stream.Backend, x, nameof(x));
        SameBackend(stream.Backend, rowPairIds, nameof(rowPairIds));
        SameBackend(stream.Backend, numRows, nameof(numRows));
        SameBackend(stream.Backend, output, nameof(output));

        using var streamLease = stream.Lease(out var s);
        using var xLease = x.Lease(out var input);
        using var idsLease = rowPairIds.Lease(out var ids);
        using var rowsLease = numRows.Lease(out var rows);
        using var outputLease = output.Lease(out var result);
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_permute(s, dtype, input, tokens, hidden, topK, ids, rows,
            rowPairIds.Length, result));
    }

    /// <summary>Permutes <paramref name="x"/> (the layout's T tokens) into the layout's expert-contiguous rows.</summary>
    public static void Permute<T>(ComputeStream stream, DeviceSlice<T> x, int hidden, ExpertLayout layout, DeviceSlice<T> output)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ExpectLength(x, (long)layout.Tokens * hidden, nameof(x));
        Permute(stream, x, hidden, layout.TopK, layout.SortedPairIds, layout.NumRows, output);
    }

    /// <summary>Gathers the send buffer of an all-to-all: one row of <paramref name="x"/> per routed pair, rank-contiguous.</summary>
    public static void Permute<T>(ComputeStream stream, DeviceSlice<T> x, int hidden, RankBuckets buckets, DeviceSlice<T> output)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(buckets);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ExpectLength(x, (long)buckets.Tokens * hidden, nameof(x));
        Permute(stream, x, hidden, buckets.TopK, buckets.SendPairIds, buckets.NumRows, output);
    }

    /// <summary>
    /// Writes <c>output[t] = Σ_k weights[t][k] · y[pairPositions[t][k]]</c> over the pairs with a
    /// position, ascending k, accumulated in fp32 (product and sum rounded separately) and converted
    /// once to <typeparamref name="TOut"/> (bf16: round to nearest even). Tokens without a position
    /// get zeros. Bitwise deterministic.
    /// </summary>
    /// <param name="stream">The stream to queue on.</param>
    /// <param name="y">Expert outputs, yRows x hidden elements, in the permuted row order.</param>
    /// <param name="hidden">Elements per row.</param>
    /// <param name="pairPositions">T x topK rows of <paramref name="y"/>, or <see cref="Padding"/>.</param>
    /// <param name="topK">K.</param>
    /// <param name="weights">T x topK routing weights, or a default slice for weight 1 (a plain sum).</param>
    /// <param name="output">T x hidden elements, every one written; must not overlap <paramref name="y"/>.</param>
    /// <exception cref="ArgumentException">Sizes disagree, a view is on another backend, or (CPU) a position is out of range.</exception>
    /// <exception cref="NotSupportedException">An element type is neither float nor BFloat16.</exception>
    public static void Combine<TIn, TOut>(ComputeStream stream, DeviceSlice<TIn> y, int hidden, DeviceSlice<int> pairPositions,
        int topK, DeviceSlice<float> weights, DeviceSlice<TOut> output) where TIn : unmanaged where TOut : unmanaged
    {
        var inType = DtypeOf<TIn>();
        var outType = DtypeOf<TOut>();
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        RequireView(y, nameof(y));
        RequireView(pairPositions, nameof(pairPositions));
        RequireView(output, nameof(output));
        var yRows = WholeRows(y.Length, hidden, nameof(y));
        var tokens = WholeRows(output.Length, hidden, nameof(output));
        ExpectLength(pairPositions, tokens * topK, nameof(pairPositions));
        if (!weights.IsNull) ExpectLength(weights, tokens * topK, nameof(weights));
        SameBackend(stream.Backend, y, nameof(y));
        SameBackend(stream.Backend, pairPositions, nameof(pairPositions));
        SameBackend(stream.Backend, weights, nameof(weights));
        SameBackend(stream.Backend, output, nameof(output));

        using var streamLease = stream.Lease(out var s);
        using var yLease = y.Lease(out var input);
        using var positionsLease = pairPositions.Lease(out var positions);
        using var weightsLease = LeaseOrNull(weights, out var w);
        using var outputLease = output.Lease(out var result);
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_combine(s, inType, input, yRows, hidden, positions, w, tokens, topK,
            outType, result));
    }

    /// <summary>Combines expert outputs in the layout's row order back into its T tokens (see the general overload).</summary>
    public static void Combine<TIn, TOut>(ComputeStream stream, DeviceSlice<TIn> y, int hidden, ExpertLayout layout,
        DeviceSlice<float> weights, DeviceSlice<TOut> output) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ExpectLength(output, (long)layout.Tokens * hidden, nameof(output));
        Combine(stream, y, hidden, layout.PairPositions, layout.TopK, weights, output);
    }

    /// <summary>Combines the rows returned by the all-to-all (in send order) back into the buckets' T tokens.</summary>
    public static void Combine<TIn, TOut>(ComputeStream stream, DeviceSlice<TIn> returned, int hidden, RankBuckets buckets,
        DeviceSlice<float> weights, DeviceSlice<TOut> output) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(buckets);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ExpectLength(output, (long)buckets.Tokens * hidden, nameof(output));
        Combine(stream, returned, hidden, buckets.PairPositions, buckets.TopK, weights, output);
    }

    // ---------------------------------------------------------------------------------------------
    // Host forms: spans in and out. On Backend.Cpu they run on the spans; on Backend.Cuda they copy
    // to the device, run the CUDA kernel, check the device error word and copy back.

    /// <summary>
    /// Host-memory form of <see cref="Align(ComputeStream, DeviceSlice{int}, ExpertLayout)"/>: every element of
    /// every output is written. <paramref name="sortedPairIds"/> needs at least
    /// <see cref="AlignCapacity"/> elements, <paramref name="blockExperts"/> exactly its length / blockSize.
    /// </summary>
    /// <exception cref="ArgumentException">A length or value is out of range; nothing is written.</exception>
    public static void Align(ReadOnlySpan<int> physicalIds, int topK, int firstSlot, int slotsPerRank, int blockSize,
        Span<int> expertCounts, Span<int> expertOffsets, Span<int> sortedPairIds, Span<int> blockExperts, Span<int> pairPositions,
        Backend backend = Backend.Cpu)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slotsPerRank, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(blockSize, 1);
        var tokens = WholeRows(physicalIds.Length, topK, nameof(physicalIds));
        ExpectLength(expertCounts.Length, slotsPerRank, nameof(expertCounts));
        ExpectLength(expertOffsets.Length, slotsPerRank + 1L, nameof(expertOffsets));
        ExpectLength(blockExperts.Length, sortedPairIds.Length / blockSize, nameof(blockExperts));
        ExpectLength(pairPositions.Length, physicalIds.Length, nameof(pairPositions));

        if (backend == Backend.Cuda)
        {
            using var stream = new ComputeStream(Backend.Cuda);
            using var ids = new DeviceBuffer<int>(Backend.Cuda, physicalIds);
            using var layout = ExpertLayoutOnDevice(tokens, topK, firstSlot, slotsPerRank, blockSize, sortedPairIds.Length);
            Align(stream, ids, layout);
            stream.CheckDeviceErrors();
            layout.ExpertCounts.Buffer!.CopyTo(expertCounts, 0, stream);
            layout.ExpertOffsets.Buffer!.CopyTo(expertOffsets, 0, stream);
            layout.SortedPairIds.Buffer!.CopyTo(sortedPairIds, 0, stream);
            layout.BlockExperts.Buffer!.CopyTo(blockExperts, 0, stream);
            layout.PairPositions.Buffer!.CopyTo(pairPositions, 0, stream);
            return;
        }
        using var streamLease = ComputeStream.Cpu.Lease(out var s);
        fixed (int* ids = physicalIds, counts = expertCounts, offsets = expertOffsets, sorted = sortedPairIds, blocks = blockExperts,
               positions = pairPositions)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_align(s, ids, tokens, topK, firstSlot, slotsPerRank, blockSize,
                sortedPairIds.Length, counts, offsets, sorted, blocks, positions));
        }
    }

    /// <summary>
    /// Host-memory form of <see cref="BucketByRank(ComputeStream, DeviceSlice{int}, RankBuckets)"/>:
    /// <paramref name="rankCounts"/> <c>[G]</c>, <paramref name="rankOffsets"/> <c>[G + 1]</c>,
    /// <paramref name="sendPairIds"/> and <paramref name="pairPositions"/> <c>[T * K]</c>, all written.
    /// </summary>
    /// <exception cref="ArgumentException">A length or slot is out of range; nothing is written.</exception>
    public static void BucketByRank(ReadOnlySpan<int> physicalIds, int topK, int slots, int ranks, Span<int> rankCounts,
        Span<int> rankOffsets, Span<int> sendPairIds, Span<int> pairPositions, Backend backend = Backend.Cpu)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        var tokens = WholeRows(physicalIds.Length, topK, nameof(physicalIds));
        ExpectLength(rankCounts.Length, ranks, nameof(rankCounts));
        ExpectLength(rankOffsets.Length, ranks + 1L, nameof(rankOffsets));
        ExpectLength(sendPairIds.Length, physicalIds.Length, nameof(sendPairIds));
        ExpectLength(pairPositions.Length, physicalIds.Length, nameof(pairPositions));

        if (backend == Backend.Cuda)
        {
            using var stream = new ComputeStream(Backend.Cuda);
            using var ids = new DeviceBuffer<int>(Backend.Cuda, physicalIds);
            using var buckets = RankBuckets.Allocate(Backend.Cuda, checked((int)tokens), topK, slots, ranks);
            BucketByRank(stream, ids, buckets);
            stream.CheckDeviceErrors();
            buckets.RankCounts.Buffer!.CopyTo(rankCounts, 0, stream);
            buckets.RankOffsets.Buffer!.CopyTo(rankOffsets, 0, stream);
            buckets.SendPairIds.Buffer!.CopyTo(sendPairIds, 0, stream);
            buckets.PairPositions.Buffer!.CopyTo(pairPositions, 0, stream);
            return;
        }
        using var streamLease = ComputeStream.Cpu.Lease(out var s);
        fixed (int* ids = physicalIds, counts = rankCounts, offsets = rankOffsets, send = sendPairIds, positions = pairPositions)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_bucket_by_rank(s, ids, tokens, topK, slots, ranks, counts,
                offsets, send, positions));
        }
    }

    /// <summary>
    /// Host-memory form of <see cref="Permute{T}(ComputeStream, DeviceSlice{T}, int, int, DeviceSlice{int}, DeviceSlice{int}, DeviceSlice{T})"/>:
    /// rows <c>[0, numRows)</c> of <paramref name="output"/> whose id is a pair are written, every other
    /// element keeps its value (also on CUDA).
    /// </summary>
    /// <exception cref="ArgumentException">A length, id or the row count is out of range; nothing is written.</exception>
    public static void Permute<T>(ReadOnlySpan<T> x, int hidden, int topK, ReadOnlySpan<int> rowPairIds, int numRows, Span<T> output,
        Backend backend = Backend.Cpu) where T : unmanaged
    {
        var dtype = DtypeOf<T>();
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        var tokens = WholeRows(x.Length, hidden, nameof(x));
        ExpectLength(output.Length, (long)rowPairIds.Length * hidden, nameof(output));

        if (backend == Backend.Cuda)
        {
            using var stream = new ComputeStream(Backend.Cuda);
            using var input = new DeviceBuffer<T>(Backend.Cuda, x);
            using var ids = new DeviceBuffer<int>(Backend.Cuda, rowPairIds);
            using var rows = new DeviceBuffer<int>(Backend.Cuda, [numRows]);
            using var result = new DeviceBuffer<T>(Backend.Cuda, output);  // rows not written keep their values
            Permute<T>(stream, input, hidden, topK, ids, rows, result);
            stream.CheckDeviceErrors();
            result.CopyTo(output, 0, stream);
            return;
        }
        using var streamLease = ComputeStream.Cpu.Lease(out var s);
        fixed (T* input = x, result = output)
        fixed (int* ids = rowPairIds)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_permute(s, dtype, input, tokens, hidden, topK, ids, &numRows,
                rowPairIds.Length, result));
        }
    }

    /// <summary>
    /// Host-memory form of <see cref="Combine{TIn, TOut}(ComputeStream, DeviceSlice{TIn}, int, DeviceSlice{int}, int, DeviceSlice{float}, DeviceSlice{TOut})"/>;
    /// <paramref name="weights"/> empty for a plain sum. Every element of <paramref name="output"/> is written.
    /// </summary>
    /// <exception cref="ArgumentException">A length or position is out of range; nothing is written.</exception>
    public static void Combine<TIn, TOut>(ReadOnlySpan<TIn> y, int hidden, ReadOnlySpan<int> pairPositions, int topK,
        ReadOnlySpan<float> weights, Span<TOut> output, Backend backend = Backend.Cpu) where TIn : unmanaged where TOut : unmanaged
    {
        var inType = DtypeOf<TIn>();
        var outType = DtypeOf<TOut>();
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        var yRows = WholeRows(y.Length, hidden, nameof(y));
        var tokens = WholeRows(output.Length, hidden, nameof(output));
        ExpectLength(pairPositions.Length, tokens * topK, nameof(pairPositions));
        if (!weights.IsEmpty) ExpectLength(weights.Length, tokens * topK, nameof(weights));

        if (backend == Backend.Cuda)
        {
            using var stream = new ComputeStream(Backend.Cuda);
            using var input = new DeviceBuffer<TIn>(Backend.Cuda, y);
            using var positions = new DeviceBuffer<int>(Backend.Cuda, pairPositions);
            using var w = weights.IsEmpty ? null : new DeviceBuffer<float>(Backend.Cuda, weights);
            using var result = new DeviceBuffer<TOut>(Backend.Cuda, output.Length);
            Combine<TIn, TOut>(stream, input, hidden, positions, topK, w is null ? default : w.AsSlice(), result);
            stream.CheckDeviceErrors();
            result.CopyTo(output, 0, stream);
            return;
        }
        using var streamLease = ComputeStream.Cpu.Lease(out var s);
        fixed (TIn* input = y)
        fixed (TOut* result = output)
        fixed (int* positions = pairPositions)
        fixed (float* w = weights)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_combine(s, inType, input, yRows, hidden, positions,
                weights.IsEmpty ? null : w, tokens, topK, outType, result));
        }
    }

    // ---------------------------------------------------------------------------------------------

    internal static eplb_dtype_t DtypeOf<T>() where T : unmanaged =>
        typeof(T) == typeof(float) ? eplb_dtype_t.EPLB_DTYPE_F32
        : typeof(T) == typeof(BFloat16) ? eplb_dtype_t.EPLB_DTYPE_BF16
        : throw new NotSupportedException($"dispatch ops take float or BFloat16 elements, not {typeof(T).Name}");

    internal static void ExpectLength<T>(DeviceSlice<T> view, long expected, string name) where T : unmanaged
    {
        if (view.IsNull)
        {
            if (expected == 0) return;
            throw new ArgumentException($"{name} is required ({expected} elements)", name);
        }
        if (view.Length != expected) throw new ArgumentException($"{name} has {view.Length} elements; {expected} are needed", name);
    }

    internal static void SameBackend<T>(Backend backend, DeviceSlice<T> view, string name) where T : unmanaged
    {
        if (!view.IsNull) SameBackend(backend, view.Backend, name);
    }

    private static void SameBackend(Backend expected, Backend actual, string name)
    {
        if (actual != expected) throw new ArgumentException($"{name} lives on {actual} but the stream runs on {expected}", name);
    }

    private static void ExpectLength(int length, long expected, string name)
    {
        if (length != expected) throw new ArgumentException($"{name} has {length} elements; {expected} are needed", name);
    }

    private static void RequireView<T>(DeviceSlice<T> view, string name) where T : unmanaged
    {
        if (view.IsNull) throw new ArgumentNullException(name);
    }

    private static long WholeRows(long length, int width, string name) =>
        length % width == 0
            ? length / width
            : throw new ArgumentException($"{name} has {length} elements, not a multiple of {width}", name);

    private static HandleLease LeaseOrNull<T>(DeviceSlice<T> view, out T* pointer) where T : unmanaged
    {
        if (view.IsNull || view.Length == 0)
        {
            pointer = null;
            return default;
        }
        return view.Lease(out pointer);
    }

    private static ExpertLayout ExpertLayoutOnDevice(long tokens, int topK, int firstSlot, int slotsPerRank, int blockSize, int capacity)
    {
        // The host spans fix the capacity (it may exceed the worst case), so size the views to them.
        var buffers = new DeviceBuffer<int>[5];
        try
        {
            buffers[0] = new DeviceBuffer<int>(Backend.Cuda, slotsPerRank);
            buffers[1] = new DeviceBuffer<int>(Backend.Cuda, slotsPerRank + 1L);
            buffers[2] = new DeviceBuffer<int>(Backend.Cuda, capacity);
            buffers[3] = new DeviceBuffer<int>(Backend.Cuda, capacity / blockSize);
            buffers[4] = new DeviceBuffer<int>(Backend.Cuda, tokens * topK);
            return ExpertLayout.Owning(checked((int)tokens), topK, firstSlot, slotsPerRank, blockSize, buffers);
        }
        catch
        {
            foreach (var buffer in buffers) buffer?.Dispose();
            throw;
        }
    }
}
