using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The per-layer migration plan (docs/design.md §5).</summary>
public class MigrationPlannerTests
{
    [Test]
    public void OneTransferWhenOneSlotChanges()
    {
        // 2 ranks of 2 slots: [0,1 | 1,2] -> [0,1 | 0,2]: expert 0 from rank 0 to rank 1, nothing else.
        var plan = MigrationPlanner.PlanLayer([0, 1, 1, 2], [0, 1, 0, 2], ranks: 2);
        Assert.That(plan.Transfers, Is.EqualTo(new[] { new ExpertTransfer(0, 0, 0, 1, 0) }));
        Assert.That(plan.LocalCopies, Is.Empty);
        Assert.That(plan.FanOuts, Is.Empty);
        Assert.That(plan.ChangedSlots[0], Is.Empty);
        Assert.That(plan.ChangedSlots[1], Is.EqualTo(new[] { 0 }));
    }

    [Test]
    public void SendersSplitReceiversByQuotientAndRemainder()
    {
        // 5 ranks of 1 slot: [0,0,1,1,1] -> all 0: senders {0,1}, receivers {2,3,4}, q = 1:
        // sender 0 serves 2 and the remainder 4, sender 1 serves 3.
        var plan = MigrationPlanner.PlanLayer([0, 0, 1, 1, 1], [0, 0, 0, 0, 0], ranks: 5);
        var pairs = plan.Transfers.Select(t => (t.SourceRank, t.DestinationRank)).OrderBy(p => p).ToArray();
        Assert.That(pairs, Is.EqualTo(new[] { (0, 2), (0, 4), (1, 3) }));
        Assert.That(plan.Transfers.All(t => t.Expert == 0), Is.True);
    }

    [Test]
    public void SamePlacementMovesNothing()
    {
        var random = TestSupport.NewRandom();
        var old = Enumerable.Range(0, 48).Select(_ => random.Next(20)).ToArray();
        var plan = MigrationPlanner.PlanLayer(old, old, ranks: 6);
        Assert.That(plan.IsEmpty, Is.True);
        Assert.That(plan.Transfers.Count + plan.LocalCopies.Count + plan.FanOuts.Count, Is.Zero);
    }

    [Test]
    public void LocalCopiesAndFanOutReceiveOncePerRank()
    {
        // Rank 1 [3, 4, 5] -> [4, 0, 0]: 4 is local (copy from slot 1), 0 is received once into slot 1
        // and fanned out to slot 2.
        var plan = MigrationPlanner.PlanLayer([0, 1, 2, 3, 4, 5], [0, 1, 2, 4, 0, 0], ranks: 2);
        Assert.That(plan.LocalCopies, Is.EqualTo(new[] { new LocalCopy(1, 4, 1, 0, false) }));
        Assert.That(plan.Transfers, Is.EqualTo(new[] { new ExpertTransfer(0, 0, 0, 1, 1) }));
        Assert.That(plan.FanOuts, Is.EqualTo(new[] { new LocalCopy(1, 0, 1, 2, true) }));
    }

    [Test, Repeat(40)]
    public void RandomPlansRebuildTheNewPlacement()
    {
        var random = TestSupport.NewRandom();
        var ranks = random.Next(1, 9);
        var perRank = random.Next(1, 6);
        var experts = random.Next(1, ranks * perRank + 1);
        int[] Placement()
        {
            var p = Enumerable.Range(0, ranks * perRank).Select(s => s < experts ? s : random.Next(experts)).ToArray();
            random.Shuffle(p);
            return p;
        }
        var old = Placement();
        var next = Placement();
        var batched = random.Next(2) == 0;
        var plan = MigrationPlanner.PlanLayer(old, next, ranks, batch: batched);

        // Execute on plain arrays: staging starts empty, then local copies, transfers, fan-out, commit.
        var weights = (int[])old.Clone();
        var staging = Enumerable.Repeat(-1, old.Length).ToArray();
        foreach (var c in plan.LocalCopies) staging[c.Rank * perRank + c.DestinationSlot] = weights[c.Rank * perRank + c.SourceSlot];
        var received = new HashSet<(int Rank, int Expert)>();
        foreach (var batch in plan.Batches)
        {
            var talks = new Dictionary<int, int>();
            foreach (var t in batch)
            {
                Assert.That(weights[t.SourceRank * perRank + t.SourceSlot], Is.EqualTo(t.Expert), "the sender must hold the expert");
                Assert.That(received.Add((t.DestinationRank, t.Expert)), Is.True, "an expert is received at most once per rank");
                foreach (var (a, b) in new[] { (t.SourceRank, t.DestinationRank), (t.DestinationRank, t.SourceRank) })
                {
                    if (batched && talks.TryGetValue(a, out var peer)) Assert.That(peer, Is.EqualTo(b), "one peer per rank per batch");
                    talks[a] = b;
                }
                staging[t.DestinationRank * perRank + t.DestinationSlot] = weights[t.SourceRank * perRank + t.SourceSlot];
            }
        }
        Assert.That(plan.Batches.Sum(b => b.Count), Is.EqualTo(plan.Transfers.Count));
        if (!batched) Assert.That(plan.Batches.Count, Is.LessThanOrEqualTo(1));
        foreach (var f in plan.FanOuts) staging[f.Rank * perRank + f.DestinationSlot] = staging[f.Rank * perRank + f.SourceSlot];
        for (var rank = 0; rank < ranks; rank++)
            foreach (var slot in plan.ChangedSlots[rank])
                weights[rank * perRank + slot] = staging[rank * perRank + slot];
        Assert.That(weights, Is.EqualTo(next));
        Assert.That(plan.SlotsChanged, Is.EqualTo(old.Zip(next).Count(p => p.First != p.Second)));
    }

    [Test]
    public void BadInputIsRejected()
    {
        Assert.Throws<ArgumentException>(() => MigrationPlanner.PlanLayer([0, 1], [0, 1, 2], 1));
        Assert.Throws<ArgumentException>(() => MigrationPlanner.PlanLayer([0, 1, 2], [0, 1, 2], 2));
        Assert.Throws<ArgumentException>(() => MigrationPlanner.PlanLayer([0, -1], [0, 1], 1));
        var missing = Assert.Throws<ArgumentException>(() => MigrationPlanner.PlanLayer([0, 0], [0, 5], 2))!;
        Assert.That(missing.Message, Does.Contain("expert 5"));
    }

    [Test]
    public void LocalSlotsListEveryReplicaOnTheRank()
    {
        int[] phy2log = [3, 1, 3, 0, 2, 3];
        Assert.That(ExpertMap.LocalSlots(phy2log, 0, 3, 3), Is.EqualTo(new[] { 0, 2 }));
        Assert.That(ExpertMap.LocalSlots(phy2log, 1, 3, 3), Is.EqualTo(new[] { 2 }));
        Assert.That(ExpertMap.LocalSlots(phy2log, 1, 3, 1), Is.Empty);
        Assert.Throws<ArgumentOutOfRangeException>(() => ExpertMap.LocalSlots(phy2log, 2, 3, 1));
    }
}
