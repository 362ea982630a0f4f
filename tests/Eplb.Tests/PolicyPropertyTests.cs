using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Every policy on awkward sizes, random loads and any thread count.</summary>
public class PolicyPropertyTests
{
    public static IEnumerable<string> Policies => PlacementPolicies.Names;

    [Test]
    public void RegistryListsTheThreePolicies()
    {
        // The built-in policies come first; tests may register more after them.
        Assert.That(PlacementPolicies.Names.Take(3), Is.EqualTo(new[] { "deepseek", "locality", "incremental" }));
        Assert.That(PlacementPolicies.Get("DeepSeek").Name, Is.EqualTo("deepseek"));
        var e = Assert.Throws<ArgumentException>(() => PlacementPolicies.Get("greedy"))!;
        Assert.That(e.Message, Does.Contain("'greedy'").And.Contain("deepseek, locality, incremental"));
    }

    // (layers, experts, slots, groups, nodes, gpus): N prime, G = 1, R = N, one slot per GPU,
    // nodes that do not divide the groups, more GPUs than experts.
    [TestCase(3, 7, 7, 1, 1, 1)]
    [TestCase(2, 13, 26, 1, 1, 2)]
    [TestCase(2, 31, 36, 1, 2, 4)]
    [TestCase(2, 12, 12, 4, 2, 12)]
    [TestCase(2, 12, 16, 4, 2, 16)]
    [TestCase(3, 16, 24, 4, 4, 8)]
    [TestCase(2, 16, 24, 4, 3, 6)]
    [TestCase(2, 8, 32, 2, 2, 8)]
    [TestCase(1, 256, 288, 8, 4, 32)]
    public void EveryPolicyGivesValidPlacementsOnRandomLoads(int layers, int experts, int slots, int groups, int nodes, int gpus)
    {
        var random = TestSupport.NewRandom();
        foreach (var name in Policies)
        {
            var policy = PlacementPolicies.Get(name);
            for (var trial = 0; trial < 6; trial++)
            {
                var load = PlacementOracle.RandomLoad(random, layers, experts);
                var request = new PlacementRequest(slots, groups, nodes, gpus) { NoDuplicateOnRank = trial % 2 == 1 };
                var current = trial >= 4 ? PlacementTests.RandomPlacement(random, layers, experts, slots, gpus, nodes) : null;
                if (request.NoDuplicateOnRank && (long)gpus * experts < slots) continue;
                ExpertPlacement p;
                try
                {
                    p = policy.Plan(load, request, current);
                }
                catch (ArgumentException e) when (request.NoDuplicateOnRank && e.Message.Contains("noDuplicateOnRank"))
                {
                    continue;  // infeasible by construction (a node's GPUs cannot host enough distinct experts)
                }
                PlacementOracle.AssertValid(p, layers, experts, slots, gpus);
                Assert.That(p.Nodes, Is.EqualTo(nodes));
                if (request.NoDuplicateOnRank) Assert.That(PlacementOracle.HasDuplicateOnGpu(p), Is.False, $"{name} {request}");
                Assert.That(p.Balancedness(load), Is.EqualTo(PlacementOracle.Balancedness(p, load)).Within(1e-12));
            }
        }
    }

    [TestCaseSource(nameof(Policies))]
    public void UniformLoadNeedsNoRedundancyToBeBalanced(string name)
    {
        var load = new ExpertLoad(2, 16, Enumerable.Repeat(5.0, 32).ToArray());
        var p = PlacementPolicies.Get(name).Plan(load, new PlacementRequest(16, 4, 2, 8));
        Assert.That(p.Balancedness(load), Is.EqualTo(1.0).Within(1e-12));
        Assert.That(p.LogCnt(0).ToArray(), Is.All.EqualTo(1));
    }

    [TestCaseSource(nameof(Policies))]
    public void AllZeroLoadIsValid(string name)
    {
        var load = new ExpertLoad(2, 16, new double[32]);
        var p = PlacementPolicies.Get(name).Plan(load, new PlacementRequest(24, 4, 2, 8));
        PlacementOracle.AssertValid(p, 2, 16, 24, 8);
        Assert.That(p.Balancedness(load), Is.Zero);
    }

    [TestCaseSource(nameof(Policies))]
    public void NoLayersGivesAnEmptyPlacement(string name)
    {
        var p = PlacementPolicies.Get(name).Plan(new ExpertLoad(0, 16, []), new PlacementRequest(24, 4, 2, 8));
        Assert.That((p.Layers, p.Slots, p.Ranks), Is.EqualTo((0, 24, 8)));
    }

    [TestCaseSource(nameof(Policies))]
    public void ResultsDoNotDependOnTheThreadCount(string name)
    {
        var policy = PlacementPolicies.Get(name);
        var load = TestSupport.RealLoad("prefill_in4096");
        var current = PlacementPolicies.DeepSeek.Plan(TestSupport.RealLoad("decode_in1800out100"), new PlacementRequest(288, 8, 4, 32));
        var request = new PlacementRequest(288, 8, 4, 32);
        var one = policy.Plan(load, request with { MaxDegreeOfParallelism = 1 }, current).Phy2LogTable.ToArray();
        foreach (var threads in new[] { 2, 3, 8, 0 })
            Assert.That(policy.Plan(load, request with { MaxDegreeOfParallelism = threads }, current).Phy2LogTable.ToArray(), Is.EqualTo(one), $"{threads} threads");
    }
}
