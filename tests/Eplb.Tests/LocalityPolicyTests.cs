using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The <c>locality</c> policy (docs/design.md §2.3): primaries group-to-node, redundant replicas anywhere.</summary>
public class LocalityPolicyTests
{
    private static readonly PlacementRequest FourNodes = new(288, 8, 4, 32);

    [Test]
    public void MeetsTheGoalsOnEveryRealFile([ValueSource(typeof(TestSupport), nameof(TestSupport.LoadFileNames))] string name)
    {
        var load = TestSupport.RealLoad(name);
        var p = PlacementPolicies.Locality.Plan(load, FourNodes);
        PlacementOracle.AssertValid(p, 58, 256, 288, 32);
        var balancedness = p.Balancedness(load);
        var local = p.NodeLocalFraction(load, 8);
        TestContext.Out.WriteLine($"{name}: balancedness {balancedness:F4}, node-local {local:F4}");
        Assert.That(balancedness, Is.GreaterThanOrEqualTo(0.95));
        Assert.That(local, Is.GreaterThanOrEqualTo(0.90));
        Assert.That(PlacementOracle.Balancedness(p, load), Is.EqualTo(balancedness).Within(1e-12));
        // Every group keeps all its experts on one node, and the hierarchical policy is beaten.
        Assert.That(PlacementOracle.GroupsHaveAHomeNode(p, 8), Is.True);
        Assert.That(balancedness, Is.GreaterThan(PlacementPolicies.DeepSeek.Plan(load, FourNodes).Balancedness(load) + 0.05));
    }

    [Test]
    public void NoDuplicateOnRankHoldsOnRealLoads()
    {
        var load = TestSupport.RealLoad("prefill_in4096");
        var p = PlacementPolicies.Locality.Plan(load, FourNodes with { NoDuplicateOnRank = true });
        PlacementOracle.AssertValid(p, 58, 256, 288, 32);
        Assert.That(PlacementOracle.HasDuplicateOnGpu(p), Is.False);
        Assert.That(PlacementOracle.GroupsHaveAHomeNode(p, 8), Is.True);
        Assert.That(p.Balancedness(load), Is.GreaterThanOrEqualTo(0.95));
    }

    [Test]
    public void AwayPriceTradesBalanceForLocality()
    {
        var load = TestSupport.RealLoad("decode_in1000out1000").Select([0, 7, 19, 33, 50]);
        var free = new LocalityPolicy { AwayPrice = 0 }.Plan(load, FourNodes);
        var dear = new LocalityPolicy { AwayPrice = 1 }.Plan(load, FourNodes);
        Assert.That(free.Balancedness(load), Is.GreaterThan(dear.Balancedness(load)));
        Assert.That(dear.NodeLocalFraction(load, 8), Is.GreaterThan(free.NodeLocalFraction(load, 8)));
    }

    [Test]
    public void WithoutAWholeGroupPerNodeItBalancesGlobally()
    {
        var load = TestSupport.RealLoad("prefill_in1024");
        foreach (var request in new[] { new PlacementRequest(288, 8, 3, 72), new PlacementRequest(320, 8, 5, 40), new PlacementRequest(288, 8, 1, 32) })
        {
            var p = PlacementPolicies.Locality.Plan(load, request);
            PlacementOracle.AssertValid(p, 58, 256, request.Slots, request.Ranks);
            Assert.That(p.Balancedness(load), Is.GreaterThanOrEqualTo(PlacementPolicies.DeepSeek.Plan(load, request).Balancedness(load)), request.ToString());
        }
    }

    [Test]
    public void CurrentPlacementOnlyReordersSlotsInsideEachGpu()
    {
        var load = TestSupport.RealLoad("prefill_in512").Select([0, 1, 2]);
        var current = ExpertPlacement.Initial(3, 256, 288, 32, 4);
        var plain = PlacementPolicies.Locality.Plan(load, FourNodes);
        var kept = PlacementPolicies.Locality.Plan(load, FourNodes, current);
        Assert.That(kept.Balancedness(load), Is.EqualTo(plain.Balancedness(load)).Within(1e-12));
        Assert.That(kept.SlotsChanged(current), Is.LessThanOrEqualTo(plain.SlotsChanged(current)));
    }
}
