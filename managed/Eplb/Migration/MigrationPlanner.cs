using Eplb.Placement;

namespace Eplb.Migration;

/// <summary>
/// Plans the weight moves of one layer from an old to a new <c>phy2log</c> (docs/design.md §5, after vLLM's
/// <c>rearrange_expert_weights_inplace</c>). Every rank computes the same plan from the same inputs,
/// so senders and receivers agree without talking:
/// <list type="number">
/// <item>unchanged slots move nothing;</item>
/// <item>an expert the rank already holds is copied locally from its first old slot;</item>
/// <item>otherwise the rank receives it once, into the lowest slot that wants it, then fans it out locally.</item>
/// </list>
/// Sender matching per expert (ascending expert id): senders = ranks holding it in <c>old</c>
/// (ascending), receivers = ranks needing it (ascending); with S senders and q = |receivers| / S,
/// sender i serves receivers <c>[i*q, (i+1)*q)</c> plus receiver <c>S*q + i</c> when present — the
/// load spreads evenly over the holders and the result does not depend on timing.
/// </summary>
public static class MigrationPlanner
{
    /// <summary>
    /// Bytes of one DeepSeek-V3 routed expert in its FP8 checkpoint: gate, up and down projections of
    /// 7168 x 2048 one-byte weights plus one float32 scale per 128 x 128 block
    /// (3 x (7168 x 2048 + 56 x 16 x 4) = 44,050,944).
    /// </summary>
    public const long DeepSeekV3ExpertBytes = 3L * (7168 * 2048 + 7168 / 128 * (2048 / 128) * 4);

    /// <summary>
    /// Experts that cross between ranks to go from <paramref name="from"/> to <paramref name="to"/>:
    /// the transfers of every layer's plan, so each rank receives an expert it lacks once and fans it
    /// out locally, and slots that change to an expert the rank already had are local copies (docs/design.md §5).
    /// </summary>
    /// <exception cref="ArgumentException">The placements have different shapes.</exception>
    public static long ExpertsToReceive(ExpertPlacement from, ExpertPlacement to)
    {
        ArgumentNullException.ThrowIfNull(from);
        ArgumentNullException.ThrowIfNull(to);
        to.CheckSameShape(from, nameof(from));
        long received = 0;
        for (var l = 0; l < to.Layers; l++) received += PlanLayer(from.Phy2Log(l), to.Phy2Log(l), to.Ranks, batch: false).ExpertsReceived;
        return received;
    }

    /// <summary>
    /// Bytes that cross between ranks to go from <paramref name="from"/> to <paramref name="to"/>:
    /// <see cref="ExpertsToReceive"/> times the bytes of one expert's tensors (weights and scales).
    /// </summary>
    /// <param name="from">The placement in force now.</param>
    /// <param name="to">The placement to move to.</param>
    /// <param name="bytesPerExpert">Bytes of one expert of one layer (DeepSeek-V3 FP8: <see cref="DeepSeekV3ExpertBytes"/>).</param>
    public static long BytesToMove(ExpertPlacement from, ExpertPlacement to, long bytesPerExpert)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytesPerExpert);
        return checked(ExpertsToReceive(from, to) * bytesPerExpert);
    }

    /// <summary>Plans one layer. <paramref name="batch"/> groups transfers so each rank talks to one peer per batch.</summary>
    /// <exception cref="ArgumentException">The lengths differ, are not a multiple of <paramref name="ranks"/>, or an id is negative.</exception>
    public static LayerMigrationPlan PlanLayer(ReadOnlySpan<int> oldPhy2Log, ReadOnlySpan<int> newPhy2Log, int ranks, bool batch = true)
    {
        if (oldPhy2Log.Length != newPhy2Log.Length)
            throw new ArgumentException($"old has {oldPhy2Log.Length} slots, new {newPhy2Log.Length}", nameof(newPhy2Log));
        var slotsPerRank = ExpertTopology.SlotsPerRankOf(oldPhy2Log.Length, ranks);
        for (var s = 0; s < oldPhy2Log.Length; s++)
        {
            if (oldPhy2Log[s] < 0) throw new ArgumentException($"old[{s}] = {oldPhy2Log[s]} is not an expert id", nameof(oldPhy2Log));
            if (newPhy2Log[s] < 0) throw new ArgumentException($"new[{s}] = {newPhy2Log[s]} is not an expert id", nameof(newPhy2Log));
        }

        var localCopies = new List<LocalCopy>();
        var fanOuts = new List<LocalCopy>();
        var changed = new List<int>[ranks];
        // needs[expert] = ranks that must receive it, with the local slot it lands in first.
        var needs = new SortedDictionary<int, List<(int Rank, int Slot)>>();
        var fanOutTargets = new List<(int Rank, int Expert, int FirstSlot, int Slot)>();

        for (var rank = 0; rank < ranks; rank++)
        {
            changed[rank] = [];
            var oldLocal = oldPhy2Log.Slice(rank * slotsPerRank, slotsPerRank);
            var newLocal = newPhy2Log.Slice(rank * slotsPerRank, slotsPerRank);
            var received = new Dictionary<int, int>();  // expert -> the slot it is received into
            for (var slot = 0; slot < slotsPerRank; slot++)
            {
                var expert = newLocal[slot];
                if (oldLocal[slot] == expert) continue;  // (1) unchanged
                changed[rank].Add(slot);
                var held = oldLocal.IndexOf(expert);
                if (held >= 0)
                {
                    localCopies.Add(new LocalCopy(rank, expert, held, slot, FromStaging: false));  // (2)
                }
                else if (received.TryGetValue(expert, out var first))
                {
                    fanOutTargets.Add((rank, expert, first, slot));  // (3) fan-out after the receive
                }
                else
                {
                    received[expert] = slot;  // (3) receive once, into the lowest slot wanting it
                    if (!needs.TryGetValue(expert, out var list)) needs[expert] = list = [];
                    list.Add((rank, slot));
                }
            }
        }

        var transfers = new List<ExpertTransfer>();
        foreach (var (expert, receivers) in needs)
        {
            // Senders: ranks that hold the expert in old, ascending, each with its first old slot.
            var senders = new List<(int Rank, int Slot)>();
            for (var rank = 0; rank < ranks; rank++)
            {
                var slot = oldPhy2Log.Slice(rank * slotsPerRank, slotsPerRank).IndexOf(expert);
                if (slot >= 0) senders.Add((rank, slot));
            }
            if (senders.Count == 0)
                throw new ArgumentException($"expert {expert} is wanted by the new placement but held by no rank in the old one", nameof(oldPhy2Log));
            var q = receivers.Count / senders.Count;
            for (var i = 0; i < senders.Count; i++)
            {
                for (var j = i * q; j < (i + 1) * q; j++)
                    transfers.Add(new ExpertTransfer(expert, senders[i].Rank, senders[i].Slot, receivers[j].Rank, receivers[j].Slot));
                var extra = senders.Count * q + i;
                if (extra < receivers.Count)
                    transfers.Add(new ExpertTransfer(expert, senders[i].Rank, senders[i].Slot, receivers[extra].Rank, receivers[extra].Slot));
            }
        }
        foreach (var (rank, expert, first, slot) in fanOutTargets)
            fanOuts.Add(new LocalCopy(rank, expert, first, slot, FromStaging: true));

        return new LayerMigrationPlan(ranks, slotsPerRank, localCopies, transfers, fanOuts, changed,
            batch ? Batch(transfers) : transfers.Count == 0 ? [] : [transfers]);
    }

    /// <summary>
    /// Greedy batching: each transfer goes into the first batch where neither of its ranks already
    /// talks to another peer (a pair may exchange several experts in one batch). Deterministic.
    /// </summary>
    private static List<IReadOnlyList<ExpertTransfer>> Batch(List<ExpertTransfer> transfers)
    {
        var batches = new List<List<ExpertTransfer>>();
        var peers = new List<Dictionary<int, int>>();  // per batch: rank -> the one peer it talks to
        foreach (var transfer in transfers)
        {
            var placed = false;
            for (var b = 0; b < batches.Count && !placed; b++)
            {
                var talk = peers[b];
                var sourceFree = !talk.TryGetValue(transfer.SourceRank, out var sourcePeer) || sourcePeer == transfer.DestinationRank;
                var destinationFree = !talk.TryGetValue(transfer.DestinationRank, out var destinationPeer) || destinationPeer == transfer.SourceRank;
                if (!sourceFree || !destinationFree) continue;
                talk[transfer.SourceRank] = transfer.DestinationRank;
                talk[transfer.DestinationRank] = transfer.SourceRank;
                batches[b].Add(transfer);
                placed = true;
            }
            if (placed) continue;
            batches.Add([transfer]);
            peers.Add(new Dictionary<int, int> { [transfer.SourceRank] = transfer.DestinationRank, [transfer.DestinationRank] = transfer.SourceRank });
        }
        return batches.Select(b => (IReadOnlyList<ExpertTransfer>)b).ToList();
    }
}
