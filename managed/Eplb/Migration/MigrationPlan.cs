namespace Eplb.Migration;

/// <summary>
/// One expert sent between ranks: all its tensors, from the sender's old weights at
/// <see cref="SourceSlot"/> into the receiver's staging buffer at <see cref="DestinationSlot"/>
/// (both local slot indices, i.e. in <c>[0, R/G)</c>).
/// </summary>
public readonly record struct ExpertTransfer(int Expert, int SourceRank, int SourceSlot, int DestinationRank, int DestinationSlot);

/// <summary>
/// A copy inside one rank into its staging buffer at <see cref="DestinationSlot"/>: from the old
/// weights (<see cref="FromStaging"/> false) or, for fan-out of a received expert, from another
/// staging slot (true).
/// </summary>
public readonly record struct LocalCopy(int Rank, int Expert, int SourceSlot, int DestinationSlot, bool FromStaging);

/// <summary>
/// How one layer moves from an old to a new slot assignment (docs/design.md §5). Executed in three phases per
/// rank: (1) local copies from old weights, (2) receives (in batches), (3) fan-out copies inside the
/// staging buffer; then the changed slots are committed from staging to the weights, together with
/// the layer's tables. Old weights are only read until the commit, so any fault before it leaves the
/// old layer complete.
/// </summary>
public sealed class LayerMigrationPlan
{
    internal LayerMigrationPlan(int ranks, int slotsPerRank, IReadOnlyList<LocalCopy> localCopies,
        IReadOnlyList<ExpertTransfer> transfers, IReadOnlyList<LocalCopy> fanOuts, IReadOnlyList<IReadOnlyList<int>> changedSlots,
        IReadOnlyList<IReadOnlyList<ExpertTransfer>> batches)
    {
        Ranks = ranks;
        SlotsPerRank = slotsPerRank;
        LocalCopies = localCopies;
        Transfers = transfers;
        FanOuts = fanOuts;
        ChangedSlots = changedSlots;
        Batches = batches;
    }

    /// <summary>G, the ranks.</summary>
    public int Ranks { get; }

    /// <summary>R/G, slots per rank.</summary>
    public int SlotsPerRank { get; }

    /// <summary>Copies from a rank's old weights into its staging buffer (expert already on the rank).</summary>
    public IReadOnlyList<LocalCopy> LocalCopies { get; }

    /// <summary>Cross-rank sends, in ascending expert order, then sender order.</summary>
    public IReadOnlyList<ExpertTransfer> Transfers { get; }

    /// <summary>Copies inside a staging buffer from the slot that received an expert to its other slots.</summary>
    public IReadOnlyList<LocalCopy> FanOuts { get; }

    /// <summary>Per rank, the local slots whose expert changes (committed from staging).</summary>
    public IReadOnlyList<IReadOnlyList<int>> ChangedSlots { get; }

    /// <summary>
    /// <see cref="Transfers"/> grouped so that in each batch every rank talks to at most one peer
    /// (one batch holding everything when batching is off).
    /// </summary>
    public IReadOnlyList<IReadOnlyList<ExpertTransfer>> Batches { get; }

    /// <summary>Whether nothing moves.</summary>
    public bool IsEmpty => ChangedSlots.All(s => s.Count == 0);

    /// <summary>Number of slots whose expert changes, over all ranks.</summary>
    public int SlotsChanged => ChangedSlots.Sum(s => s.Count);

    /// <summary>Experts received over the transport: one per rank and expert it lacks (<see cref="Transfers"/>).</summary>
    public int ExpertsReceived => Transfers.Count;

    /// <summary>Bytes received over the transport when one expert's tensors weigh <paramref name="bytesPerExpert"/>.</summary>
    public long BytesToMove(long bytesPerExpert) => checked(ExpertsReceived * bytesPerExpert);
}
