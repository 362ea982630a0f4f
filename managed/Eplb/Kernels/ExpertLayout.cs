using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// The expert-contiguous layout of one rank's (token, k) pairs that <see cref="ExpertDispatch.Align(ComputeStream, DeviceSlice{int}, ExpertLayout)"/>
/// fills (docs/design.md §6, <c>eplb_dispatch_align</c>): the pairs whose slot lies in
/// <c>[FirstSlot, FirstSlot + SlotsPerRank)</c>, grouped by local expert in ascending pair order
/// (pair = token * TopK + k), each expert padded to a multiple of <see cref="BlockSize"/> rows.
/// Expert e owns rows <c>[ExpertOffsets[e], ExpertOffsets[e + 1])</c>; padding rows and rows past
/// the total hold <see cref="ExpertDispatch.Padding"/>.
/// </summary>
/// <remarks>
/// Either owns its buffers (<see cref="Allocate"/>; dispose it) or views memory owned elsewhere (the
/// constructor; disposing does nothing), like <see cref="EplbLayerState"/>.
/// </remarks>
public sealed class ExpertLayout : IDisposable
{
    private readonly DeviceBuffer<int>[] _owned;

    /// <summary>Views caller-owned memory; every view must be sized for the shape and on one backend.</summary>
    /// <exception cref="ArgumentException">A view is missing, mis-sized or on another backend.</exception>
    public ExpertLayout(int tokens, int topK, int firstSlot, int slotsPerRank, int blockSize,
        DeviceSlice<int> expertCounts, DeviceSlice<int> expertOffsets, DeviceSlice<int> sortedPairIds,
        DeviceSlice<int> blockExperts, DeviceSlice<int> pairPositions)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(firstSlot);
        ArgumentOutOfRangeException.ThrowIfLessThan(slotsPerRank, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(blockSize, 1);
        var pairs = (long)tokens * topK;
        var capacity = sortedPairIds.IsNull ? 0 : sortedPairIds.Length;
        var needed = ExpertDispatch.AlignCapacity(pairs, slotsPerRank, blockSize);
        if (capacity < needed)
            throw new ArgumentException($"sortedPairIds has {capacity} elements; {pairs} pairs over {slotsPerRank} experts " +
                                        $"padded to {blockSize} need {needed}", nameof(sortedPairIds));
        KernelArguments.ExpectLength(expertCounts, slotsPerRank, nameof(expertCounts));
        KernelArguments.ExpectLength(expertOffsets, slotsPerRank + 1L, nameof(expertOffsets));
        KernelArguments.ExpectLength(blockExperts, capacity / blockSize, nameof(blockExperts));
        KernelArguments.ExpectLength(pairPositions, pairs, nameof(pairPositions));
        Backend = expertCounts.Backend;
        KernelArguments.SameBackend(Backend, expertOffsets, nameof(expertOffsets));
        KernelArguments.SameBackend(Backend, sortedPairIds, nameof(sortedPairIds));
        KernelArguments.SameBackend(Backend, blockExperts, nameof(blockExperts));
        KernelArguments.SameBackend(Backend, pairPositions, nameof(pairPositions));
        Tokens = tokens;
        TopK = topK;
        FirstSlot = firstSlot;
        SlotsPerRank = slotsPerRank;
        BlockSize = blockSize;
        Capacity = capacity;
        ExpertCounts = expertCounts;
        ExpertOffsets = expertOffsets;
        SortedPairIds = sortedPairIds;
        BlockExperts = blockExperts;
        PairPositions = pairPositions;
        _owned = [];
    }

    private ExpertLayout(int tokens, int topK, int firstSlot, int slotsPerRank, int blockSize, DeviceBuffer<int>[] owned)
        : this(tokens, topK, firstSlot, slotsPerRank, blockSize, owned[0], owned[1], owned[2], owned[3], owned[4]) =>
        _owned = owned;

    /// <summary>A layout over five buffers (counts, offsets, sorted ids, block experts, positions) that it then owns.</summary>
    internal static ExpertLayout Owning(int tokens, int topK, int firstSlot, int slotsPerRank, int blockSize, DeviceBuffer<int>[] owned) =>
        OwnedBuffers.Own(owned, buffers => new ExpertLayout(tokens, topK, firstSlot, slotsPerRank, blockSize, buffers));

    /// <summary>The five buffers of a layout of <paramref name="pairs"/> pairs with <paramref name="capacity"/> rows.</summary>
    internal static DeviceBuffer<int>[] AllocateBuffers(Backend backend, long pairs, int slotsPerRank, long capacity, int blockSize) =>
        OwnedBuffers.Allocate(backend, slotsPerRank, slotsPerRank + 1L, capacity, capacity / blockSize, pairs);

    /// <summary>
    /// Allocates the buffers of a layout for <paramref name="tokens"/> x <paramref name="topK"/>
    /// pairs on <paramref name="backend"/>, with the worst-case capacity (<see cref="ExpertDispatch.AlignCapacity"/>).
    /// The layout owns them: dispose it.
    /// </summary>
    public static ExpertLayout Allocate(Backend backend, int tokens, int topK, int firstSlot, int slotsPerRank, int blockSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        var pairs = (long)tokens * topK;
        var capacity = ExpertDispatch.AlignCapacity(pairs, slotsPerRank, blockSize);
        return Owning(tokens, topK, firstSlot, slotsPerRank, blockSize, AllocateBuffers(backend, pairs, slotsPerRank, capacity, blockSize));
    }

    /// <summary>The backend all views live on.</summary>
    public Backend Backend { get; }

    /// <summary>T, the tokens the layout is sized for.</summary>
    public int Tokens { get; }

    /// <summary>K, experts per token.</summary>
    public int TopK { get; }

    /// <summary>The first physical slot of this rank; slot <c>FirstSlot + e</c> is local expert e.</summary>
    public int FirstSlot { get; }

    /// <summary>R/G, the slots of this rank: local expert e is slot <c>FirstSlot + e</c>.</summary>
    public int SlotsPerRank { get; }

    /// <summary>Rows per block; every expert's rows are padded to a multiple of it.</summary>
    public int BlockSize { get; }

    /// <summary>Rows of <see cref="SortedPairIds"/> (and of a permuted activation buffer).</summary>
    public long Capacity { get; }

    /// <summary><c>[E]</c> local pairs per expert.</summary>
    public DeviceSlice<int> ExpertCounts { get; }

    /// <summary><c>[E + 1]</c> padded exclusive offsets; the last one is the total row count.</summary>
    public DeviceSlice<int> ExpertOffsets { get; }

    /// <summary>The total padded row count as a one-element view (what permute takes as its row count).</summary>
    public DeviceSlice<int> NumRows => ExpertOffsets.Slice(SlotsPerRank, 1);

    /// <summary><c>[Capacity]</c> the pair of each row, <see cref="ExpertDispatch.Padding"/> on padding.</summary>
    public DeviceSlice<int> SortedPairIds { get; }

    /// <summary><c>[Capacity / BlockSize]</c> the local expert of each row block, <see cref="ExpertDispatch.Padding"/> past the total.</summary>
    public DeviceSlice<int> BlockExperts { get; }

    /// <summary><c>[T][K]</c> the row of each pair, <see cref="ExpertDispatch.Padding"/> when not local.</summary>
    public DeviceSlice<int> PairPositions { get; }

    /// <summary>Releases the buffers when the layout owns them (<see cref="Allocate"/>).</summary>
    public void Dispose() => OwnedBuffers.Dispose(_owned);
}
