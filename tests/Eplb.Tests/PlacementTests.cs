using NUnit.Framework;

namespace Eplb.Tests;

/// <summary><see cref="ExpertPlacement"/>: tables, invariants, metrics (docs/design.md §1) and slot preservation (docs/design.md §2.2).</summary>
public class PlacementTests
{
    [Test]
    public void InitialPlacementPutsExpertSModNInSlotS()
    {
        var p = ExpertPlacement.Initial(2, 4, 6, 3);
        PlacementOracle.AssertValid(p, 2, 4, 6, 3);
        for (var l = 0; l < 2; l++)
        {
            Assert.That(p.Phy2Log(l).ToArray(), Is.EqualTo(new[] { 0, 1, 2, 3, 0, 1 }));
            Assert.That(p.LogCnt(l).ToArray(), Is.EqualTo(new[] { 2, 2, 1, 1 }));
            Assert.That(p.Log2Phy(l).ToArray(), Is.EqualTo(new[] { 0, 4, 1, 5, 2, -1, 3, -1 }));
        }
        Assert.That((p.MaxReplicas, p.SlotsPerRank, p.RanksPerNode), Is.EqualTo((2, 2, 3)));
    }

    [Test]
    public void FixedCapacityPadsLog2PhyWithMinusOne()
    {
        var p = ExpertPlacement.FromPhy2Log([[2, 0, 1, 0]], 3, ranks: 2, maxReplicas: 4);
        Assert.That(p.MaxReplicas, Is.EqualTo(4));
        Assert.That(p.Log2Phy(0).ToArray(), Is.EqualTo(new[] { 1, 3, -1, -1, 2, -1, -1, -1, 0, -1, -1, -1 }));
        Assert.That(p.WithMaxReplicas(2).Log2Phy(0).ToArray(), Is.EqualTo(new[] { 1, 3, 2, -1, 0, -1 }));
        Assert.Throws<ArgumentException>(() => p.WithMaxReplicas(1));
    }

    [Test]
    public void FromPhy2LogCopiesItsInput()
    {
        int[] row = [0, 1, 2, 0];
        var p = ExpertPlacement.FromPhy2Log([row], 3, ranks: 2);
        row[3] = 2;
        Assert.That(p.Phy2Log(0).ToArray(), Is.EqualTo(new[] { 0, 1, 2, 0 }));
    }

    [TestCase(new[] { 0, 1, 3, 0 }, 3, 2, 1, 0, "expert 3, outside [0, 3)")]
    [TestCase(new[] { 0, 1, 1, 0 }, 3, 2, 1, 0, "no slot for expert 2")]
    [TestCase(new[] { 0, 1, 2, 0 }, 3, 3, 1, 0, "multiple of ranks (G = 3)")]
    [TestCase(new[] { 0, 1, 2, 0 }, 3, 2, 4, 0, "multiple of nodes (4)")]
    [TestCase(new[] { 0, 0, 0, 1, 2, 0 }, 3, 2, 1, 3, "4 replicas, more than maxReplicas = 3")]
    [TestCase(new[] { 0, 1, 2, 0 }, 5, 2, 1, 0, "must be >= logical experts (N = 5)")]
    public void InvalidTablesAreRejectedWithTheValue(int[] row, int experts, int gpus, int nodes, int kmax, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => ExpertPlacement.FromPhy2Log([row], experts, gpus, nodes, kmax))!;
        Assert.That(e.Message, Does.Contain(message));
    }

    [Test]
    public void RaggedAndEmptyRowsAreRejected()
    {
        Assert.That(Assert.Throws<ArgumentException>(() => ExpertPlacement.FromPhy2Log([[0, 1], [0, 1, 1, 0]], 2, 1))!.Message,
            Does.Contain("layer 1 has 4 slots, layer 0 has 2"));
        Assert.Throws<ArgumentException>(() => ExpertPlacement.FromPhy2Log([], 2, 1));
        Assert.That(ExpertPlacement.Initial(0, 8, 16, 4).Layers, Is.Zero);
    }

    [Test]
    public void BalancednessIsMeanOverMaxPerLayerAndSumsOverLayers()
    {
        // Slots 0..5 hold 0,1,2,3,0,1 (2 per GPU). Layer 0 loads [8,4,2,2]: GPUs 4+2, 2+2, 4+2 -> mean
        // 16/3, max 6. Layer 1 loads [0,0,0,3]: GPUs 0, 3, 0 -> mean 1, max 3.
        var p = ExpertPlacement.Initial(2, 4, 6, 3);
        var load = new ExpertLoad(2, 4, [8, 4, 2, 2, 0, 0, 0, 3]);
        var gpu = new double[3];
        p.RankLoads(load, 0, gpu);
        Assert.That(gpu, Is.EqualTo(new[] { 6.0, 4.0, 6.0 }));
        Assert.That(p.BalancednessPerLayer(load), Is.EqualTo(new[] { 16.0 / 3 / 6, 1.0 / 3 }).Within(1e-12));
        Assert.That(p.Balancedness(load), Is.EqualTo((16.0 / 3 + 1) / (6 + 3)).Within(1e-12));
        Assert.That(ExpertPlacement.Initial(1, 4, 6, 3).Balancedness(new ExpertLoad(1, 4, [0, 0, 0, 0])), Is.Zero);
    }

    [Test]
    public void BalancednessMatchesTheOracleOnRealLoads()
    {
        var load = TestSupport.RealLoad("decode_in1000out1000");
        var p = ExpertPlacement.Initial(load.Layers, load.LogicalExperts, 288, 32, 4);
        Assert.That(p.Balancedness(load), Is.EqualTo(PlacementOracle.Balancedness(p, load)).Within(1e-12));
        Assert.That(p.Balancedness(load), Is.InRange(0.1, 0.5));
    }

    [Test]
    public void NodeLocalFractionCountsLoadOnEachGroupsBusiestNode()
    {
        // Nodes of one GPU with 2 slots; slots [0,2 | 1,3]; loads [4,1,1,4]. Groups {0,1} and {2,3}:
        // group 0 serves 4 on node 0 and 1 on node 1, group 1 serves 1 and 4: 8 of 10 at home. One
        // group: node 0 serves 4+1, node 1 serves 1+4: 5 of 10.
        var p = ExpertPlacement.FromPhy2Log([[0, 2, 1, 3]], 4, ranks: 2, nodes: 2);
        var load = new ExpertLoad(1, 4, [4, 1, 1, 4]);
        Assert.That(p.NodeLocalFraction(load, 2), Is.EqualTo(0.8).Within(1e-12));
        Assert.That(p.NodeLocalFraction(load, 1), Is.EqualTo(0.5).Within(1e-12));
        Assert.Throws<ArgumentException>(() => p.NodeLocalFraction(load, 3));
        Assert.That(ExpertPlacement.FromPhy2Log([[0, 1, 2, 3]], 4, 2, 2).NodeLocalFraction(load, 2), Is.EqualTo(1.0));
    }

    [Test]
    public void SlotsChangedAndBytesToMoveCountRemoteReceivesOncePerRank()
    {
        // 3 GPUs of 2 slots. GPU 0: {0,1} -> {1,0} (reordered: no transfer); GPU 1: {2,3} -> {2,2}
        // (local copy); GPU 2: {0,1} -> {3,0} (receives 3). Five slots differ.
        var old = ExpertPlacement.FromPhy2Log([[0, 1, 2, 3, 0, 1]], 4, 3);
        var now = ExpertPlacement.FromPhy2Log([[1, 0, 2, 2, 3, 0]], 4, 3);
        Assert.That(now.SlotsChanged(old), Is.EqualTo(5));
        Assert.That(now.SlotsChanged(old, 0), Is.EqualTo(5));
        Assert.That(MigrationPlanner.ExpertsToReceive(old, now), Is.EqualTo(1));
        Assert.That(MigrationPlanner.BytesToMove(old, now, MigrationPlanner.DeepSeekV3ExpertBytes), Is.EqualTo(44_050_944));
        Assert.That(old.SlotsChanged(old), Is.Zero);
        Assert.Throws<ArgumentException>(() => now.SlotsChanged(ExpertPlacement.Initial(1, 4, 6, 2)));
    }

    [Test]
    public void DeepSeekV3ExpertIsFp8WeightsPlusBlockScales()
    {
        // gate, up, down: 7168 x 2048 bytes each, plus (7168/128) x (2048/128) float32 scales each.
        Assert.That(MigrationPlanner.DeepSeekV3ExpertBytes, Is.EqualTo(3 * (7168L * 2048 + 56 * 16 * 4)));
    }

    [Test]
    public void SlotPreservationKeepsStayingExpertsInTheirOldSlots()
    {
        // GPU 0: old [0,1,2], plan [1,3,0] -> 0 and 1 stay put, 3 takes the free slot: [0,1,3].
        // GPU 1: old [3,0,1], plan [2,2,0] -> 0 stays in slot 4, the 2s fill slots 3 and 5: [2,0,2].
        var old = ExpertPlacement.FromPhy2Log([[0, 1, 2, 3, 0, 1]], 4, 2);
        var plan = ExpertPlacement.FromPhy2Log([[1, 3, 0, 2, 2, 0]], 4, 2);
        var kept = plan.WithSlotsPreservedFrom(old);
        Assert.That(kept.Phy2Log(0).ToArray(), Is.EqualTo(new[] { 0, 1, 3, 2, 0, 2 }));
        Assert.That(kept.SlotsChanged(old), Is.EqualTo(3));
        Assert.That(plan.SlotsChanged(old), Is.EqualTo(6));
        Assert.That(kept.LogCnt(0).ToArray(), Is.EqualTo(plan.LogCnt(0).ToArray()));
    }

    [Test]
    public void SlotPreservationNeverChangesBalancednessOrAddsChanges()
    {
        var random = TestSupport.NewRandom();
        for (var trial = 0; trial < 50; trial++)
        {
            var gpus = random.Next(1, 6);
            var experts = random.Next(1, 12);
            var slots = gpus * random.Next((experts + gpus - 1) / gpus, experts + 3);
            var load = PlacementOracle.RandomLoad(random, 2, experts);
            var old = RandomPlacement(random, 2, experts, slots, gpus);
            var plan = RandomPlacement(random, 2, experts, slots, gpus);
            var kept = plan.WithSlotsPreservedFrom(old);
            PlacementOracle.AssertValid(kept, 2, experts, slots, gpus);
            Assert.That(kept.Balancedness(load), Is.EqualTo(plan.Balancedness(load)).Within(1e-12));
            Assert.That(kept.SlotsChanged(old), Is.LessThanOrEqualTo(plan.SlotsChanged(old)));
            for (var g = 0; g < gpus; g++)
            {
                var per = slots / gpus;
                Assert.That(kept.Phy2Log(1).Slice(g * per, per).ToArray(), Is.EquivalentTo(plan.Phy2Log(1).Slice(g * per, per).ToArray()));
            }
        }
    }

    internal static ExpertPlacement RandomPlacement(Random random, int layers, int experts, int slots, int gpus, int nodes = 1)
    {
        var rows = new List<int[]>();
        for (var l = 0; l < layers; l++)
        {
            var row = Enumerable.Range(0, slots).Select(s => s < experts ? s : random.Next(experts)).ToArray();
            random.Shuffle(row);
            rows.Add(row);
        }
        return ExpertPlacement.FromPhy2Log(rows, experts, gpus, nodes);
    }
}
