using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The <c>incremental</c> policy (docs/design.md §2.3, vLLM #24069): few slot changes from the current placement.</summary>
public class IncrementalPolicyTests
{
    private static readonly PlacementRequest FourNodes = new(288, 8, 4, 32);

    public static IEnumerable<TestCaseData> ConsecutiveFiles()
    {
        var names = TestSupport.LoadFileNames.ToArray();
        for (var i = 0; i + 1 < names.Length; i++) yield return new TestCaseData(names[i], names[i + 1]);
    }

    [TestCaseSource(nameof(ConsecutiveFiles))]
    public void ReachesTheFreshPlanWithAQuarterOfItsChanges(string oldFile, string newFile)
    {
        // The placement in force was planned for the old load; the new load arrives.
        var reference = PlacementPolicies.Locality;
        var current = reference.Plan(TestSupport.RealLoad(oldFile), FourNodes);
        var load = TestSupport.RealLoad(newFile);
        var fresh = reference.Plan(load, FourNodes, current);
        var p = PlacementPolicies.Incremental.Plan(load, FourNodes, current);
        PlacementOracle.AssertValid(p, 58, 256, 288, 32);
        var gap = fresh.Balancedness(load) - p.Balancedness(load);
        var ratio = (double)p.SlotsChanged(current) / fresh.SlotsChanged(current);
        TestContext.Out.WriteLine($"fresh {fresh.Balancedness(load):F4} ({fresh.SlotsChanged(current)} slots), " +
                                  $"incremental {p.Balancedness(load):F4} ({p.SlotsChanged(current)} slots, {ratio:P1})");
        Assert.That(gap, Is.LessThanOrEqualTo(0.01));
        Assert.That(ratio, Is.LessThanOrEqualTo(0.25));
    }

    [Test]
    public void AGoodEnoughPlacementIsLeftAlone()
    {
        var load = TestSupport.RealLoad("prefill_in2048");
        var current = PlacementPolicies.Locality.Plan(load, FourNodes);
        var p = PlacementPolicies.Incremental.Plan(load, FourNodes, current);
        Assert.That(p.SlotsChanged(current), Is.Zero);
    }

    [Test]
    public void ToleranceAndBudgetAreHonoured()
    {
        var load = TestSupport.RealLoad("decode_in500out1500");
        var current = PlacementPolicies.Locality.Plan(TestSupport.RealLoad("prefill_in4096"), FourNodes);
        var fresh = PlacementPolicies.Locality.Plan(load, FourNodes, current).Balancedness(load);
        var loose = PlacementPolicies.Incremental.Plan(load, FourNodes with { BalancednessTolerance = 0.05 }, current);
        var tight = PlacementPolicies.Incremental.Plan(load, FourNodes with { BalancednessTolerance = 0.002 }, current);
        Assert.That(loose.Balancedness(load), Is.GreaterThanOrEqualTo(fresh - 0.05));
        Assert.That(tight.Balancedness(load), Is.GreaterThanOrEqualTo(fresh - 0.002));
        Assert.That(loose.SlotsChanged(current), Is.LessThan(tight.SlotsChanged(current)));
        var capped = PlacementPolicies.Incremental.Plan(load, FourNodes with { MaxChangedSlotsPerLayer = 3 }, current);
        for (var l = 0; l < load.Layers; l++) Assert.That(capped.SlotsChanged(current, l), Is.LessThanOrEqualTo(3), $"layer {l}");
        Assert.That(capped.Balancedness(load), Is.GreaterThan(current.Balancedness(load)));
    }

    [Test]
    public void WithoutACurrentPlacementItStartsFromTheInitialOne()
    {
        var load = TestSupport.RealLoad("prefill_in512").Select([0, 10, 20]);
        var initial = ExpertPlacement.Initial(3, 256, 288, 32, 4);
        var p = PlacementPolicies.Incremental.Plan(load, FourNodes);
        Assert.That(p.Phy2LogTable.ToArray(), Is.EqualTo(PlacementPolicies.Incremental.Plan(load, FourNodes, initial).Phy2LogTable.ToArray()));
        Assert.That(p.Balancedness(load), Is.GreaterThanOrEqualTo(PlacementPolicies.Locality.Plan(load, FourNodes).Balancedness(load) - 0.01));
        Assert.That(p.SlotsChanged(initial), Is.LessThan(PlacementPolicies.Locality.Plan(load, FourNodes, initial).SlotsChanged(initial)));
    }

    [Test]
    public void NoDuplicateOnRankRepairsACurrentPlacementWithDuplicates()
    {
        // The deepseek plan of this load puts an expert twice on a GPU; incremental must not keep it.
        var load = ExpertLoad.FromRows([[1000, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1000]]);
        var request = new PlacementRequest(12, 2, 2, 4);
        var current = PlacementPolicies.DeepSeek.Plan(load, request);
        Assert.That(PlacementOracle.HasDuplicateOnGpu(current), Is.True);
        var p = PlacementPolicies.Incremental.Plan(load, request with { NoDuplicateOnRank = true }, current);
        PlacementOracle.AssertValid(p, 2, 8, 12, 4);
        Assert.That(PlacementOracle.HasDuplicateOnGpu(p), Is.False);
    }

    [Test]
    public void TheCurrentPlacementMustMatchTheRequest()
    {
        var load = TestSupport.RealLoad("prefill_in512").Select([0]);
        var e = Assert.Throws<ArgumentException>(() => PlacementPolicies.Incremental.Plan(load, FourNodes, ExpertPlacement.Initial(1, 256, 320, 32, 4)))!;
        Assert.That(e.Message, Does.Contain("320").And.Contain("288"));
    }
}
