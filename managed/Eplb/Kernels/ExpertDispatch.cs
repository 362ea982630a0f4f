using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// The data movement between routing and the experts (docs/design.md §6): align/sort the routed (token, k)
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
        KernelArguments.ExpectLength(physicalIds, (long)layout.Tokens * layout.TopK, nameof(physicalIds));
        KernelArguments.SameBackend(stream, layout.Backend, nameof(layout));
        KernelArguments.SameBackend(stream, physicalIds, nameof(physicalIds));

        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_align(leases.Stream(stream), leases.PointerOrNull(physicalIds), layout.Tokens,
            layout.TopK, layout.FirstSlot, layout.SlotsPerRank, layout.BlockSize, layout.Capacity, leases.Pointer(layout.ExpertCounts),
            leases.Pointer(layout.ExpertOffsets), leases.PointerOrNull(layout.SortedPairIds), leases.PointerOrNull(layout.BlockExperts),
            leases.PointerOrNull(layout.PairPositions)));
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
        KernelArguments.ExpectLength(physicalIds, (long)buckets.Tokens * buckets.TopK, nameof(physicalIds));
        KernelArguments.SameBackend(stream, buckets.Backend, nameof(buckets));
        KernelArguments.SameBackend(stream, physicalIds, nameof(physicalIds));

        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_bucket_by_rank(leases.Stream(stream), leases.PointerOrNull(physicalIds),
            buckets.Tokens, buckets.TopK, buckets.Slots, buckets.Ranks, leases.Pointer(buckets.RankCounts), leases.Pointer(buckets.RankOffsets),
            leases.PointerOrNull(buckets.SendPairIds), leases.PointerOrNull(buckets.PairPositions)));
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
        KernelArguments.Require(x, nameof(x));
        KernelArguments.Require(rowPairIds, nameof(rowPairIds));
        KernelArguments.Require(output, nameof(output));
        KernelArguments.ExpectLength(numRows, 1, nameof(numRows));
        var tokens = KernelArguments.WholeRows(x.Length, hidden, nameof(x));
        KernelArguments.ExpectLength(output, rowPairIds.Length * hidden, nameof(output));
        KernelArguments.SameBackend(stream, x, nameof(x));
        KernelArguments.SameBackend(stream, rowPairIds, nameof(rowPairIds));
        KernelArguments.SameBackend(stream, numRows, nameof(numRows));
        KernelArguments.SameBackend(stream, output, nameof(output));

        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_permute(leases.Stream(stream), dtype, leases.Pointer(x), tokens, hidden, topK,
            leases.Pointer(rowPairIds), leases.Pointer(numRows), rowPairIds.Length, leases.Pointer(output)));
    }

    /// <summary>Permutes <paramref name="x"/> (the layout's T tokens) into the layout's expert-contiguous rows.</summary>
    public static void Permute<T>(ComputeStream stream, DeviceSlice<T> x, int hidden, ExpertLayout layout, DeviceSlice<T> output)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        KernelArguments.ExpectLength(x, (long)layout.Tokens * hidden, nameof(x));
        Permute(stream, x, hidden, layout.TopK, layout.SortedPairIds, layout.NumRows, output);
    }

    /// <summary>Gathers the send buffer of an all-to-all: one row of <paramref name="x"/> per routed pair, rank-contiguous.</summary>
    public static void Permute<T>(ComputeStream stream, DeviceSlice<T> x, int hidden, RankBuckets buckets, DeviceSlice<T> output)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(buckets);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        KernelArguments.ExpectLength(x, (long)buckets.Tokens * hidden, nameof(x));
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
        KernelArguments.Require(y, nameof(y));
        KernelArguments.Require(pairPositions, nameof(pairPositions));
        KernelArguments.Require(output, nameof(output));
        var yRows = KernelArguments.WholeRows(y.Length, hidden, nameof(y));
        var tokens = KernelArguments.WholeRows(output.Length, hidden, nameof(output));
        KernelArguments.ExpectLength(pairPositions, tokens * topK, nameof(pairPositions));
        if (!weights.IsNull) KernelArguments.ExpectLength(weights, tokens * topK, nameof(weights));
        KernelArguments.SameBackend(stream, y, nameof(y));
        KernelArguments.SameBackend(stream, pairPositions, nameof(pairPositions));
        KernelArguments.SameBackend(stream, weights, nameof(weights));
        KernelArguments.SameBackend(stream, output, nameof(output));

        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_combine(leases.Stream(stream), inType, leases.Pointer(y), yRows, hidden,
            leases.Pointer(pairPositions), leases.PointerOrNull(weights), tokens, topK, outType, leases.Pointer(output)));
    }

    /// <summary>Combines expert outputs in the layout's row order back into its T tokens (see the general overload).</summary>
    public static void Combine<TIn, TOut>(ComputeStream stream, DeviceSlice<TIn> y, int hidden, ExpertLayout layout,
        DeviceSlice<float> weights, DeviceSlice<TOut> output) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        KernelArguments.ExpectLength(output, (long)layout.Tokens * hidden, nameof(output));
        Combine(stream, y, hidden, layout.PairPositions, layout.TopK, weights, output);
    }

    /// <summary>Combines the rows returned by the all-to-all (in send order) back into the buckets' T tokens.</summary>
    public static void Combine<TIn, TOut>(ComputeStream stream, DeviceSlice<TIn> returned, int hidden, RankBuckets buckets,
        DeviceSlice<float> weights, DeviceSlice<TOut> output) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(buckets);
        ArgumentOutOfRangeException.ThrowIfLessThan(hidden, 1);
        KernelArguments.ExpectLength(output, (long)buckets.Tokens * hidden, nameof(output));
        Combine(stream, returned, hidden, buckets.PairPositions, buckets.TopK, weights, output);
    }

    // ---------------------------------------------------------------------------------------------
    // Host forms: spans in and out. On Backend.Cpu they run on the spans; on Backend.Cuda they copy
    // to the device, run the CUDA kernel, check the device error word and copy back.

    /// <summary>
    /// Host-memory form of <see cref="Align(ComputeStream, DeviceSlice{int}, ExpertLayout)"/>: every element of
    /// every output of <paramref name="layout"/> is written. Its <see cref="HostExpertLayout.SortedPairIds"/>
    /// needs at least <see cref="AlignCapacity"/> elements, <see cref="HostExpertLayout.BlockExperts"/>
    /// exactly that length / BlockSize.
    /// </summary>
    /// <exception cref="ArgumentException">A length or value is out of range; nothing is written.</exception>
    public static void Align(ReadOnlySpan<int> physicalIds, HostExpertLayout layout, Backend backend = Backend.Cpu)
    {
        var (topK, firstSlot, slotsPerRank, blockSize) = (layout.TopK, layout.FirstSlot, layout.SlotsPerRank, layout.BlockSize);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1, "TopK");
        ArgumentOutOfRangeException.ThrowIfLessThan(slotsPerRank, 1, "SlotsPerRank");
        ArgumentOutOfRangeException.ThrowIfLessThan(blockSize, 1, "BlockSize");
        var tokens = KernelArguments.WholeRows(physicalIds.Length, topK, nameof(physicalIds));
        KernelArguments.ExpectLength(layout.ExpertCounts.Length, slotsPerRank, "ExpertCounts");
        KernelArguments.ExpectLength(layout.ExpertOffsets.Length, slotsPerRank + 1L, "ExpertOffsets");
        KernelArguments.ExpectLength(layout.BlockExperts.Length, layout.SortedPairIds.Length / blockSize, "BlockExperts");
        KernelArguments.ExpectLength(layout.PairPositions.Length, physicalIds.Length, "PairPositions");

        if (backend == Backend.Cuda)
        {
            using var device = new DeviceRoundTrip();
            // The host spans fix the capacity (it may exceed the worst case), so size the views to them.
            var views = device.Own(ExpertLayout.Owning(checked((int)tokens), topK, firstSlot, slotsPerRank, blockSize,
                ExpertLayout.AllocateBuffers(Backend.Cuda, tokens * topK, slotsPerRank, layout.SortedPairIds.Length, blockSize)));
            Align(device.Stream, device.Upload(physicalIds), views);
            device.Download(views.ExpertCounts, layout.ExpertCounts);
            device.Download(views.ExpertOffsets, layout.ExpertOffsets);
            device.Download(views.SortedPairIds, layout.SortedPairIds);
            device.Download(views.BlockExperts, layout.BlockExperts);
            device.Download(views.PairPositions, layout.PairPositions);
            return;
        }
        using var leases = new LeaseScope();
        fixed (int* ids = physicalIds, counts = layout.ExpertCounts, offsets = layout.ExpertOffsets, sorted = layout.SortedPairIds,
               blocks = layout.BlockExperts, positions = layout.PairPositions)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_align(leases.Stream(ComputeStream.Cpu), ids, tokens, topK, firstSlot,
                slotsPerRank, blockSize, layout.SortedPairIds.Length, counts, offsets, sorted, blocks, positions));
        }
    }

    /// <summary>
    /// Host-memory form of <see cref="BucketByRank(ComputeStream, DeviceSlice{int}, RankBuckets)"/>: every
    /// output of <paramref name="buckets"/> is written.
    /// </summary>
    /// <exception cref="ArgumentException">A length or slot is out of range; nothing is written.</exception>
    public static void BucketByRank(ReadOnlySpan<int> physicalIds, HostRankBuckets buckets, Backend backend = Backend.Cpu)
    {
        var (topK, slots, ranks) = (buckets.TopK, buckets.Slots, buckets.Ranks);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1, "TopK");
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1, "Ranks");
        var tokens = KernelArguments.WholeRows(physicalIds.Length, topK, nameof(physicalIds));
        KernelArguments.ExpectLength(buckets.RankCounts.Length, ranks, "RankCounts");
        KernelArguments.ExpectLength(buckets.RankOffsets.Length, ranks + 1L, "RankOffsets");
        KernelArguments.ExpectLength(buckets.SendPairIds.Length, physicalIds.Length, "SendPairIds");
        KernelArguments.ExpectLength(buckets.PairPositions.Length, physicalIds.Length, "PairPositions");

        if (backend == Backend.Cuda)
        {
            using var device = new DeviceRoundTrip();
            var views = device.Own(RankBuckets.Allocate(Backend.Cuda, checked((int)tokens), topK, slots, ranks));
            BucketByRank(device.Stream, device.Upload(physicalIds), views);
            device.Download(views.RankCounts, buckets.RankCounts);
            device.Download(views.RankOffsets, buckets.RankOffsets);
            device.Download(views.SendPairIds, buckets.SendPairIds);
            device.Download(views.PairPositions, buckets.PairPositions);
            return;
        }
        using var leases = new LeaseScope();
        fixed (int* ids = physicalIds, counts = buckets.RankCounts, offsets = buckets.RankOffsets, send = buckets.SendPairIds,
               positions = buckets.PairPositions)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_bucket_by_rank(leases.Stream(ComputeStream.Cpu), ids, tokens, topK, slots,
                ranks, counts, offsets, send, positions));
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
        var tokens = KernelArguments.WholeRows(x.Length, hidden, nameof(x));
        KernelArguments.ExpectLength(output.Length, (long)rowPairIds.Length * hidden, nameof(output));

        if (backend == Backend.Cuda)
        {
            using var device = new DeviceRoundTrip();
            var result = device.Upload<T>(output);  // rows not written keep their values
            Permute<T>(device.Stream, device.Upload(x), hidden, topK, device.Upload(rowPairIds), device.Upload<int>([numRows]), result);
            device.Download(result, output);
            return;
        }
        using var leases = new LeaseScope();
        fixed (T* input = x, result = output)
        fixed (int* ids = rowPairIds)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_permute(leases.Stream(ComputeStream.Cpu), dtype, input, tokens, hidden, topK,
                ids, &numRows, rowPairIds.Length, result));
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
        var yRows = KernelArguments.WholeRows(y.Length, hidden, nameof(y));
        var tokens = KernelArguments.WholeRows(output.Length, hidden, nameof(output));
        KernelArguments.ExpectLength(pairPositions.Length, tokens * topK, nameof(pairPositions));
        if (!weights.IsEmpty) KernelArguments.ExpectLength(weights.Length, tokens * topK, nameof(weights));

        if (backend == Backend.Cuda)
        {
            using var device = new DeviceRoundTrip();
            var result = device.Allocate<TOut>(output.Length);
            Combine<TIn, TOut>(device.Stream, device.Upload(y), hidden, device.Upload(pairPositions), topK,
                weights.IsEmpty ? default : device.Upload(weights).AsSlice(), result);
            device.Download(result, output);
            return;
        }
        using var leases = new LeaseScope();
        fixed (TIn* input = y)
        fixed (TOut* result = output)
        fixed (int* positions = pairPositions)
        fixed (float* w = weights)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_dispatch_combine(leases.Stream(ComputeStream.Cpu), inType, input, yRows, hidden,
                positions, weights.IsEmpty ? null : w, tokens, topK, outType, result));
        }
    }

    // ---------------------------------------------------------------------------------------------

    internal static eplb_dtype_t DtypeOf<T>() where T : unmanaged =>
        typeof(T) == typeof(float) ? eplb_dtype_t.EPLB_DTYPE_F32
        : typeof(T) == typeof(BFloat16) ? eplb_dtype_t.EPLB_DTYPE_BF16
        : throw new NotSupportedException($"dispatch ops take float or BFloat16 elements, not {typeof(T).Name}");
}

/// <summary>
/// The host-memory counterpart of <see cref="ExpertLayout"/> for the host-span
/// <see cref="ExpertDispatch.Align(ReadOnlySpan{int}, HostExpertLayout, Backend)"/>: the rank's slots,
/// the block size and the output spans.
/// </summary>
public readonly ref struct HostExpertLayout
{
    /// <summary>K, pairs per token.</summary>
    public required int TopK { get; init; }

    /// <summary>The first slot this rank holds.</summary>
    public required int FirstSlot { get; init; }

    /// <summary>R/G, the slots (local experts) this rank holds.</summary>
    public required int SlotsPerRank { get; init; }

    /// <summary>Rows per block; each expert's rows are padded to a multiple of it.</summary>
    public required int BlockSize { get; init; }

    /// <summary><c>[SlotsPerRank]</c> output: routed pairs per local expert.</summary>
    public required Span<int> ExpertCounts { get; init; }

    /// <summary><c>[SlotsPerRank + 1]</c> output: each expert's first row (padded), then the total.</summary>
    public required Span<int> ExpertOffsets { get; init; }

    /// <summary>Output: the pair of each row or <see cref="ExpertDispatch.Padding"/>; its length is the capacity (at least <see cref="ExpertDispatch.AlignCapacity"/>).</summary>
    public required Span<int> SortedPairIds { get; init; }

    /// <summary><c>[capacity / BlockSize]</c> output: the local expert of each block, or <see cref="ExpertDispatch.Padding"/>.</summary>
    public required Span<int> BlockExperts { get; init; }

    /// <summary><c>[T * K]</c> output: each pair's row, or <see cref="ExpertDispatch.Padding"/> when it is not local.</summary>
    public required Span<int> PairPositions { get; init; }
}

/// <summary>
/// The host-memory counterpart of <see cref="RankBuckets"/> for the host-span
/// <see cref="ExpertDispatch.BucketByRank(ReadOnlySpan{int}, HostRankBuckets, Backend)"/>.
/// </summary>
public readonly ref struct HostRankBuckets
{
    /// <summary>K, pairs per token.</summary>
    public required int TopK { get; init; }

    /// <summary>R, slots over all ranks.</summary>
    public required int Slots { get; init; }

    /// <summary>G, destination ranks.</summary>
    public required int Ranks { get; init; }

    /// <summary><c>[G]</c> output: routed pairs per destination rank.</summary>
    public required Span<int> RankCounts { get; init; }

    /// <summary><c>[G + 1]</c> output: each rank's first send row, then the total.</summary>
    public required Span<int> RankOffsets { get; init; }

    /// <summary><c>[T * K]</c> output: the pair of each send row (rank-contiguous), <see cref="ExpertDispatch.Padding"/> past the total.</summary>
    public required Span<int> SendPairIds { get; init; }

    /// <summary><c>[T * K]</c> output: each pair's send row, or <see cref="ExpertDispatch.Padding"/> for an unrouted pair.</summary>
    public required Span<int> PairPositions { get; init; }
}
