using Eplb.Runtime;

namespace Eplb.Migration;

/// <summary>
/// Executes a <see cref="LayerMigrationPlan"/> for the ranks of this process in two steps:
/// <see cref="Stage"/> builds each rank's new layer in its staging buffer (reading the old weights
/// only), then <see cref="Exchange"/> (or the one-way <see cref="Commit"/>) puts the changed slots
/// into the weights. Between the two the old layer is intact, which is what makes a fault or a
/// cancellation harmless; <see cref="Exchange"/> keeps the old experts in the staging buffer, so
/// <see cref="Revert"/> can undo it until the caller decides the layer is switched.
/// </summary>
public static class LayerMigrator
{
    /// <summary>
    /// Local copies, then the transfers batch by batch, then the fan-out copies; queued on each rank's
    /// stream from <paramref name="streamOf"/> (null: complete per copy) and complete on return.
    /// </summary>
    public static void Stage(LayerMigrationPlan plan, IExpertTransport transport, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation = default, Func<int, ComputeStream?>? streamOf = null) =>
        StageCore(plan, transport, weightsOf, stagingOf, cancellation, streamOf, probe: null);

    internal static void StageCore(LayerMigrationPlan plan, IExpertTransport transport, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation, Func<int, ComputeStream?>? streamOf, CopyProbe? probe)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(transport);
        var local = transport.LocalRanks.ToHashSet();
        foreach (var copy in plan.LocalCopies)
        {
            if (!local.Contains(copy.Rank)) continue;
            cancellation.ThrowIfCancellationRequested();
            probe?.Invoke(CopyPoint.StageLocal, copy.Rank);
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
            probe?.Invoke(CopyPoint.StageFanOut, fan.Rank);
            var staging = stagingOf(fan.Rank);
            CopyExpert(staging, staging, fan.SourceSlot, fan.DestinationSlot, streamOf?.Invoke(fan.Rank));
        }
        Synchronize(local, streamOf);
    }

    /// <summary>Copies every changed slot of the local ranks from staging into the weights (no way back; see <see cref="Exchange"/>).</summary>
    public static void Commit(LayerMigrationPlan plan, IReadOnlyList<int> localRanks, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, Func<int, ComputeStream?>? streamOf = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(localRanks);
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

    /// <summary>
    /// Swaps every changed slot of the local ranks between the staging buffer and the weights,
    /// through <paramref name="scratchOf"/> (one expert of each tensor, same layout): afterwards the
    /// weights hold the new layer and the staging buffer the old experts of those slots, which is the
    /// undo log <see cref="Revert"/> reads. Three copies per tensor and slot, queued on each rank's
    /// stream from <paramref name="streamOf"/> (null: complete per copy).
    /// <para>
    /// All or nothing: when a copy throws, every slot swapped so far (and the one in progress) is
    /// restored from the undo log before the exception propagates, so the weights are the old layer.
    /// A copy that fails while restoring is reported as an <see cref="AggregateException"/> holding
    /// the original fault first.
    /// </para>
    /// </summary>
    public static void Exchange(LayerMigrationPlan plan, IReadOnlyList<int> localRanks, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, Func<int, IReadOnlyList<ExpertTensor>> scratchOf, Func<int, ComputeStream?>? streamOf = null) =>
        ExchangeCore(plan, localRanks, weightsOf, stagingOf, scratchOf, streamOf, probe: null);

    internal static void ExchangeCore(LayerMigrationPlan plan, IReadOnlyList<int> localRanks, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, Func<int, IReadOnlyList<ExpertTensor>> scratchOf, Func<int, ComputeStream?>? streamOf,
        CopyProbe? probe)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(localRanks);
        // Swapped (rank, slot, tensor) triples in order; the one in progress holds its old expert in scratch.
        var swapped = new List<(IReadOnlyList<ExpertTensor> Weights, IReadOnlyList<ExpertTensor> Staging, ComputeStream? Stream, int Slot, int Tensor)>();
        (ExpertTensor Weights, ExpertTensor Scratch, ComputeStream? Stream, int Slot)? inProgress = null;
        try
        {
            foreach (var rank in localRanks)
            {
                if (plan.ChangedSlots[rank].Count == 0) continue;
                var weights = weightsOf(rank);
                var staging = stagingOf(rank);
                var scratch = scratchOf(rank);
                var stream = streamOf?.Invoke(rank);
                foreach (var slot in plan.ChangedSlots[rank])
                {
                    for (var t = 0; t < weights.Count; t++)
                    {
                        probe?.Invoke(CopyPoint.CommitWeights, rank);
                        scratch[t].CopySlotFrom(weights[t], slot, 0, stream);        // scratch <- old
                        inProgress = (weights[t], scratch[t], stream, slot);
                        probe?.Invoke(CopyPoint.CommitWeights, rank);
                        weights[t].CopySlotFrom(staging[t], slot, slot, stream);     // weights <- new
                        probe?.Invoke(CopyPoint.CommitWeights, rank);
                        staging[t].CopySlotFrom(scratch[t], 0, slot, stream);        // staging <- old (the undo log)
                        inProgress = null;
                        swapped.Add((weights, staging, stream, slot, t));
                    }
                }
            }
        }
        catch (Exception fault)
        {
            var failures = new List<Exception>();
            if (inProgress is { } current)
                Try(failures, () => current.Weights.CopySlotFrom(current.Scratch, 0, current.Slot, current.Stream));
            for (var i = swapped.Count - 1; i >= 0; i--)
            {
                var (weights, staging, stream, slot, t) = swapped[i];
                Try(failures, () => weights[t].CopySlotFrom(staging[t], slot, slot, stream));
            }
            if (failures.Count > 0) throw new AggregateException("a weight copy failed and the old weights could not all be restored", [fault, .. failures]);
            throw;
        }
    }

    /// <summary>
    /// Undoes a completed <see cref="Exchange"/>: copies the old experts back from the staging buffer
    /// into the changed slots. Tries every slot; a copy that fails is reported after the others, as an
    /// <see cref="AggregateException"/>.
    /// </summary>
    public static void Revert(LayerMigrationPlan plan, IReadOnlyList<int> localRanks, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, Func<int, ComputeStream?>? streamOf = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(localRanks);
        var failures = new List<Exception>();
        foreach (var rank in localRanks)
        {
            if (plan.ChangedSlots[rank].Count == 0) continue;
            IReadOnlyList<ExpertTensor> weights, staging;
            try
            {
                weights = weightsOf(rank);
                staging = stagingOf(rank);
            }
            catch (Exception e)
            {
                failures.Add(e);
                continue;
            }
            var stream = streamOf?.Invoke(rank);
            foreach (var slot in plan.ChangedSlots[rank])
                for (var t = 0; t < weights.Count; t++)
                    Try(failures, () => weights[t].CopySlotFrom(staging[t], slot, slot, stream));
        }
        if (failures.Count > 0) throw new AggregateException("the old weights could not all be restored", failures);
    }

    private static void Try(List<Exception> failures, Action copy)
    {
        try
        {
            copy();
        }
        catch (Exception e)
        {
            failures.Add(e);
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

/// <summary>The device copies of a migration a test can make fail (<see cref="CopyProbe"/>).</summary>
internal enum CopyPoint
{
    /// <summary>Staging: a local copy from the old weights.</summary>
    StageLocal,
    /// <summary>Staging: a fan-out copy inside the staging buffer.</summary>
    StageFanOut,
    /// <summary>Commit: one of the three copies of a weight slot's swap.</summary>
    CommitWeights,
    /// <summary>Commit: a table copy from the staged second table set.</summary>
    CommitTables,
}

/// <summary>Called before each device copy of a migration (fault injection in tests); throwing fails that copy.</summary>
internal delegate void CopyProbe(CopyPoint point, int rank);
