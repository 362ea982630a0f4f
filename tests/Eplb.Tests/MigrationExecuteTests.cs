using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// Weight migration over simulated ranks, in the style of vLLM's execute tests: fake weights
/// <c>expert*1000 + layer*100 + tensor*10 + index</c>, random old/new placements with redundancy.
/// </summary>
public class MigrationExecuteTests
{
    private static readonly (int Ranks, int Layers, int LocalSlots, int LogicalExperts)[] Shapes =
        [(2, 1, 2, 3), (2, 2, 3, 4), (2, 4, 8, 16), (4, 1, 2, 6), (4, 2, 2, 5), (4, 8, 8, 16)];

    private static IEnumerable<TestCaseData> Cases() =>
        Shapes.Select(s => new TestCaseData(Backend.Cpu, s.Ranks, s.Layers, s.LocalSlots, s.LogicalExperts))
            .Concat(Shapes.Select(s => new TestCaseData(Backend.Cuda, s.Ranks, s.Layers, s.LocalSlots, s.LogicalExperts).SetCategory("GPU")));

    internal static int[] RandomPlacement(Random random, int slots, int experts)
    {
        var placement = Enumerable.Range(0, slots).Select(s => s < experts ? s : random.Next(experts)).ToArray();
        random.Shuffle(placement);
        return placement;
    }

    [TestCaseSource(nameof(Cases))]
    public void EverySlotEndsWithItsNewExpertsWeights(Backend backend, int ranks, int layers, int localSlots, int experts)
    {
        if (backend == Backend.Cuda) TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var slots = ranks * localSlots;
        int[] sizes = [random.Next(1, 33), random.Next(1, 9), 3];  // weights and scales of other shapes
        var old = Enumerable.Range(0, layers).Select(_ => RandomPlacement(random, slots, experts)).ToArray();
        var next = Enumerable.Range(0, layers).Select(_ => RandomPlacement(random, slots, experts)).ToArray();
        var rankModels = Enumerable.Range(0, ranks).Select(r => new SimulatedRank(r, ranks, layers, experts, slots, sizes, backend, initialPhy2Log: old)).ToArray();
        try
        {
            using var transport = new InProcessTransport(ranks);
            var staging = rankModels.Select(m => m.GetExpertWeights(0).Select(w =>
                new DeviceBuffer<byte>(backend, w.BytesPerExpert * w.SlotsPerRank)).ToArray()).ToArray();
            try
            {
                var stagingTensors = staging.Select((buffers, r) => (IReadOnlyList<ExpertTensor>)buffers
                    .Select((b, t) => ExpertTensor.Create($"w{t}", b.AsSlice(), localSlots)).ToArray()).ToArray();
                for (var layer = 0; layer < layers; layer++)
                {
                    var plan = MigrationPlanner.PlanLayer(old[layer], next[layer], ranks);
                    LayerMigrator.Stage(plan, transport, r => rankModels[r].GetExpertWeights(layer), r => stagingTensors[r]);
                    LayerMigrator.Commit(plan, transport.LocalRanks, r => rankModels[r].GetExpertWeights(layer), r => stagingTensors[r]);
                }
            }
            finally
            {
                foreach (var buffers in staging)
                    foreach (var b in buffers) b.Dispose();
            }
            for (var layer = 0; layer < layers; layer++)
                for (var r = 0; r < ranks; r++)
                    Assert.That(rankModels[r].ExpertsInWeights(layer), Is.EqualTo(next[layer][(r * localSlots)..((r + 1) * localSlots)]),
                        $"layer {layer}, rank {r}: every slot holds exactly its new expert's weights (all tensors)");
        }
        finally
        {
            foreach (var m in rankModels) m.Dispose();
        }
    }

    [Test]
    public void SamePlacementLeavesEveryByte()
    {
        var random = TestSupport.NewRandom();
        var old = Enumerable.Range(0, 2).Select(_ => RandomPlacement(random, 12, 7)).ToArray();
        var ranks = Enumerable.Range(0, 3).Select(r => new SimulatedRank(r, 3, 2, 7, 12, [5, 2], initialPhy2Log: old)).ToArray();
        var before = ranks.Select(r => r.Snapshot()).ToArray();
        using var transport = new InProcessTransport(3);
        for (var layer = 0; layer < 2; layer++)
        {
            var plan = MigrationPlanner.PlanLayer(old[layer], old[layer], 3);
            Assert.That(plan.IsEmpty, Is.True);
            LayerMigrator.Stage(plan, transport, r => ranks[r].GetExpertWeights(layer), _ => throw new AssertionException("no staging needed"));
            LayerMigrator.Commit(plan, transport.LocalRanks, r => ranks[r].GetExpertWeights(layer), _ => throw new AssertionException("no commit needed"));
        }
        for (var r = 0; r < 3; r++) Assert.That(ranks[r].Snapshot(), Is.EqualTo(before[r]));
        foreach (var r in ranks) r.Dispose();
    }
}
