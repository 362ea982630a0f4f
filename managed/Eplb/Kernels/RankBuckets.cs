using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// The EP all-to-all metadata that <see cref="ExpertDispatch.BucketByRank(ComputeStream, DeviceSlice{int}, RankBuckets)"/>
/// fills (docs/design.md §6, <c>eplb_dispatch_bucket_by_rank</c>): the routed (token, k) pairs grouped by
/// destination rank (slot s lives on rank <c>s / (Slots / Ranks)</c>), ascending pair order
/// inside a rank, one send row per pair; and the send row of every pair, to bring the results back
/// in token order with <see cref="ExpertDispatch.Combine{TIn, TOut}(ComputeStream, DeviceSlice{TIn}, int, RankBuckets, DeviceSlice{float}, DeviceSlice{TOut})"/>.
/// </summary>
/// <remarks>
/// Either owns its buffers (<see cref="Allocate"/>; dispose it) or views memory owned elsewhere.
/// </remarks>
public sealed class RankBuckets : IDisposable
{
    private readonly DeviceBuffer<int>[] _owned;

    /// <summary>Views caller-owned memory; every view must be sized for the shape and on one backend.</summary>
    /// <exception cref="ArgumentException">A view is missing, mis-sized or on another backend, or R is not a multiple of G.</exception>
    public RankBuckets(int tokens, int topK, int slots, int ranks, DeviceSlice<int> rankCounts,
        DeviceSlice<int> rankOffsets, DeviceSlice<int> sendPairIds, DeviceSlice<int> pairPositions)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        ExpertTopology.SlotsPerRankOf(slots, ranks);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, ranks);
        var pairs = (long)tokens * topK;
        KernelArguments.ExpectLength(rankCounts, ranks, nameof(rankCounts));
        KernelArguments.ExpectLength(rankOffsets, ranks + 1L, nameof(rankOffsets));
        KernelArguments.ExpectLength(sendPairIds, pairs, nameof(sendPairIds));
        KernelArguments.ExpectLength(pairPositions, pairs, nameof(pairPositions));
        Backend = rankCounts.Backend;
        KernelArguments.SameBackend(Backend, rankOffsets, nameof(rankOffsets));
        KernelArguments.SameBackend(Backend, sendPairIds, nameof(sendPairIds));
        KernelArguments.SameBackend(Backend, pairPositions, nameof(pairPositions));
        Tokens = tokens;
        TopK = topK;
        Slots = slots;
        Ranks = ranks;
        RankCounts = rankCounts;
        RankOffsets = rankOffsets;
        SendPairIds = sendPairIds;
        PairPositions = pairPositions;
        _owned = [];
    }

    private RankBuckets(int tokens, int topK, int slots, int ranks, DeviceBuffer<int>[] owned)
        : this(tokens, topK, slots, ranks, owned[0], owned[1], owned[2], owned[3]) => _owned = owned;

    /// <summary>Allocates the buffers for <paramref name="tokens"/> x <paramref name="topK"/> pairs; dispose the result.</summary>
    public static RankBuckets Allocate(Backend backend, int tokens, int topK, int slots, int ranks)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        var pairs = (long)tokens * topK;
        return OwnedBuffers.Own(OwnedBuffers.Allocate(backend, ranks, ranks + 1L, pairs, pairs),
            buffers => new RankBuckets(tokens, topK, slots, ranks, buffers));
    }

    /// <summary>The backend all views live on.</summary>
    public Backend Backend { get; }

    /// <summary>T, the tokens the buckets are sized for.</summary>
    public int Tokens { get; }

    /// <summary>K, experts per token.</summary>
    public int TopK { get; }

    /// <summary>R, the physical slots of the layer.</summary>
    public int Slots { get; }

    /// <summary>G, the EP ranks; rank g owns slots <c>[g*R/G, (g+1)*R/G)</c>.</summary>
    public int Ranks { get; }

    /// <summary><c>[G]</c> pairs sent to each rank.</summary>
    public DeviceSlice<int> RankCounts { get; }

    /// <summary><c>[G + 1]</c> exclusive offsets of each rank's send rows; the last one is the routed pair count.</summary>
    public DeviceSlice<int> RankOffsets { get; }

    /// <summary>The routed pair count as a one-element view (the row count permute takes).</summary>
    public DeviceSlice<int> NumRows => RankOffsets.Slice(Ranks, 1);

    /// <summary><c>[T * K]</c> the pair of each send row, <see cref="ExpertDispatch.Padding"/> past the routed pairs.</summary>
    public DeviceSlice<int> SendPairIds { get; }

    /// <summary><c>[T][K]</c> the send row of each pair, <see cref="ExpertDispatch.Padding"/> when not routed.</summary>
    public DeviceSlice<int> PairPositions { get; }

    /// <summary>Releases the buffers when the buckets own them (<see cref="Allocate"/>).</summary>
    public void Dispose() => OwnedBuffers.Dispose(_owned);
}
