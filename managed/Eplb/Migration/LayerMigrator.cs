using Eplb.Runtime;

namespace Eplb.Migration;

/// <summary>
/// Executes a <see cref="LayerMigrationPlan"/> for the ranks of this process in two steps:
/// <see cref="Stage"/> builds each rank's new layer in its staging buffer (reading the old weights
/// only), <see cref="Commit"/> copies the changed slots into the weights. Between the two the old
/// layer is intact, which is what makes a fault or a cancellation harmless.
/// </summary>
public static class LayerMigrator
{
    /// <summary>
    /// Local copies, then the transfers batch by batch, then the fan-out copies; queued on each rank's
    /// stream from <paramref name="streamOf"/> (null: complete per copy) and complete on return.
    /// </summary>
    public static void Stage(LayerMigrationPlan plan, IExpertTransport transport, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation = default, Func<int, ComputeStream?>? streamOf = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(transport);
        var local = transport.LocalRanks.ToHashSet();
        foreach (var copy in plan.LocalCopies)
        {
            if (!local.Contains(copy.Rank)) continue;
            cancellation.ThrowIfCancellationRequested();
            CopyExpert(weightsOf(copy.Rank), stagingOf(copy.Rank), copy.SourceSlot, copy.DestinationSlot, streamOf?.Invoke(copy.Rank));
        }
        Synchronize(local, streamOf);
        foreach (var batch in plan.Batches)
        {
            cancellation.ThrowIfCancellationRequested();
            transport.Transfer(batch, weightsOf, stagingOf, cancellation);
        }
        foreach (var fan in plan.FanOuts)
        {
            if (!local.Contains(fan.Rank)) continue;
            cancellation.ThrowIfCancellationRequested();
            var staging = stagingOf(fan.Rank);
            CopyExpert(staging, staging, fan.SourceSlot, fan.DestinationSlot, streamOf?.Invoke(fan.Rank));
        }
        Synchronize(local, streamOf);
    }

    /// <summary>Copies every changed slot of the local ranks from staging into the weights.</summary>
    public static void Commit(LayerMigrationPlan plan, IReadOnlyList<int> localRanks, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, Func<int, ComputeStream?>? streamOf = null)
    {
        foreach (var rank in localRanks)
        {
            if (plan.ChangedSlots[rank].Count == 0) continue;
            var weights = weightsOf(rank);
            var staging = stagingOf(rank);
            var stream = streamOf?.Invoke(rank);
            foreach (var slot in plan.ChangedSlots[rank])
                for (var t = 0; t < weights.Count; t++)
                    weights[t].CopySlotFrom(staging[t], slot, slot, stream);
        }
    }

    private static void CopyExpert(IReadOnlyList<ExpertTensor> from, IReadOnlyList<ExpertTensor> to, int sourceSlot, int destinationSlot,
        ComputeStream? stream)
    {
        for (var t = 0; t < to.Count; t++) to[t].CopySlotFrom(from[t], sourceSlot, destinationSlot, stream);
    }

    private static void Synchronize(IEnumerable<int> ranks, Func<int, ComputeStream?>? streamOf)
    {
        if (streamOf is null) return;
        foreach (var rank in ranks) streamOf(rank)?.Synchronize();
    }
}
