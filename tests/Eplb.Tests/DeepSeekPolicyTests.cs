using System.Diagnostics;
using System.Text.Json;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The <c>deepseek</c> policy: exact parity with deepseek-ai/EPLB <c>rebalance_experts</c> (docs/design.md §2.1).</summary>
public class DeepSeekPolicyTests
{
    private static readonly IPlacementPolicy DeepSeek = PlacementPolicies.DeepSeek;

    private static ExpertLoad Rows(params double[][] rows) => ExpertLoad.FromRows(rows);

    [Test]
    public void ReadmeGoldenExampleMatchesExactly()
    {
        // deepseek-ai/EPLB README: R = 16, groups 4, nodes 2, G = 8.
        var load = Rows([90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]);
        var p = DeepSeek.Plan(load, new PlacementRequest(16, 4, 2, 8));
        Assert.That(p.Phy2Log(0).ToArray(), Is.EqualTo(new[] { 5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1 }));
        Assert.That(p.Phy2Log(1).ToArray(), Is.EqualTo(new[] { 7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1 }));
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1 }));
        Assert.That(p.LogCnt(1).ToArray(), Is.EqualTo(new[] { 1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1 }));
        PlacementOracle.AssertValid(p, 2, 12, 16, 8);
        Assert.That(p.MaxReplicas, Is.EqualTo(2));
    }

    [Test]
    public void FourExpertsOnOneGpuGetOneReplicaEach()
    {
        var p = DeepSeek.Plan(Rows([10, 20, 30, 40]), new PlacementRequest(4, 1, 1, 1));
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 1, 1, 1, 1 }));
        Assert.That(p.Phy2Log(0).ToArray(), Is.EquivalentTo(new[] { 0, 1, 2, 3 }));
    }

    [Test]
    public void FlatLoadWithoutRedundancyGivesOneReplicaEach()
    {
        var p = DeepSeek.Plan(Rows(Enumerable.Repeat(50.0, 8).ToArray()), new PlacementRequest(8, 2, 2, 4));
        Assert.That(p.LogCnt(0).ToArray(), Is.All.EqualTo(1));
        PlacementOracle.AssertValid(p, 1, 8, 8, 4);
    }

    [Test]
    public void OneHotExpertIsKeptWorseThanInitialAsTheReferenceIs()
    {
        // Hierarchical: group {0..3} alone on node 0 gets its 2 extras for expert 0 (1000/3 each);
        // node 0's GPUs get 1000/3 + 1000/3 + 1 and 1000/3 + 1 + 1, node 1's 2 and 2: 251.75 mean
        // over a 667.67 maximum = 0.377. The initial placement has 502 at most: 0.5015.
        var load = Rows([1000, 1, 1, 1, 1, 1, 1, 1]);
        var p = DeepSeek.Plan(load, new PlacementRequest(12, 2, 2, 4));
        Assert.That(p.LogCnt(0)[0], Is.GreaterThan(p.LogCnt(0)[1]));
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 3, 1, 1, 1, 2, 2, 1, 1 }));
        Assert.That(p.Balancedness(load), Is.EqualTo(251.75 / (2000.0 / 3 + 1)).Within(1e-9));
        Assert.That(p.Balancedness(load), Is.EqualTo(0.377).Within(0.0005));
        var initial = ExpertPlacement.Initial(1, 8, 12, 4, 2);
        Assert.That(initial.Balancedness(load), Is.EqualTo(251.75 / 502).Within(1e-12));
        Assert.That(p.Balancedness(load), Is.LessThan(initial.Balancedness(load)));
        // The same expert twice on one GPU is a known property of the reference (expert 4 on GPU 2).
        Assert.That(PlacementOracle.HasDuplicateOnGpu(p), Is.True);
    }

    [Test]
    public void ThreeShapesOfSixExpertsAreValid()
    {
        var load = Rows([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [3, 3, 3, 3, 3, 3]);
        var p = DeepSeek.Plan(load, new PlacementRequest(8, 2, 2, 4));
        PlacementOracle.AssertValid(p, 3, 6, 8, 4);
        // Hierarchical: each node gets one extra replica, for its hottest expert.
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 1, 1, 2, 1, 1, 2 }));
        Assert.That(p.LogCnt(1).ToArray(), Is.EqualTo(new[] { 2, 1, 1, 2, 1, 1 }));
        Assert.That(p.LogCnt(2).ToArray(), Is.EqualTo(new[] { 2, 1, 1, 2, 1, 1 }));  // ties: the first of each node
    }

    [Test]
    public void HottestExpertGetsAtLeastTwoReplicas()
    {
        var p = DeepSeek.Plan(Rows([100, 50, 200, 75, 150, 25, 300, 80]), new PlacementRequest(12, 4, 2, 4));
        Assert.That(p.LogCnt(0)[6], Is.GreaterThanOrEqualTo(2));
        PlacementOracle.AssertValid(p, 1, 8, 12, 4);
    }

    [Test]
    public void GroupsNotDivisibleByNodesRunTheGlobalPolicy()
    {
        var load = Rows([10, 20, 30, 40, 50, 60]);
        var p = DeepSeek.Plan(load, new PlacementRequest(8, 3, 2, 4));
        var global = DeepSeek.Plan(load, new PlacementRequest(8, 1, 1, 4));
        Assert.That(p.Phy2Log(0).ToArray(), Is.EqualTo(global.Phy2Log(0).ToArray()));
        Assert.That(p.Nodes, Is.EqualTo(2));
        // Global: the two extras go to 60 and 50; 60/2, 50/2, 40, 30, 25, 20, 10 ... packed 2 per GPU.
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 1, 1, 1, 1, 2, 2 }));
    }

    [TestCase(7, 1, 1, 4, "R = 7", "G = 4")]
    [TestCase(12, 1, 4, 6, "G = 6", "nodes (4)")]
    [TestCase(4, 1, 1, 4, "R = 4", "N = 6")]
    [TestCase(12, 0, 1, 4, "groups (0)", "")]
    public void PreconditionsAreClearExceptions(int slots, int groups, int nodes, int gpus, string first, string second)
    {
        var e = Assert.Throws<ArgumentException>(() => DeepSeek.Plan(Rows([1, 2, 3, 4, 5, 6]), new PlacementRequest(slots, groups, nodes, gpus)))!;
        Assert.That(e.Message, Does.Contain(first).And.Contain(second));
    }

    [Test]
    public void AllZeroLoadSendsEveryExtraOfANodeToItsFirstExpert()
    {
        var p = DeepSeek.Plan(new ExpertLoad(1, 8, new double[8]), new PlacementRequest(12, 2, 2, 4));
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 3, 1, 1, 1, 3, 1, 1, 1 }));
    }

    [Test]
    public void MatchesTheReferenceOnTieFreeRandomCases()
    {
        // Generated by Reference/deepseek_reference.py (a float32 transliteration of eplb.py).
        var path = Path.Combine(TestSupport.RepoRoot, "tests", "Eplb.Tests", "Reference", "deepseek-reference-cases.json");
        using var cases = JsonDocument.Parse(File.ReadAllBytes(path));
        var compared = 0;
        foreach (var c in cases.RootElement.EnumerateArray())
        {
            var weight = c.GetProperty("weight").EnumerateArray().Select(r => r.EnumerateArray().Select(v => v.GetDouble()).ToArray()).ToArray();
            var request = new PlacementRequest(c.GetProperty("replicas").GetInt32(), c.GetProperty("groups").GetInt32(),
                c.GetProperty("nodes").GetInt32(), c.GetProperty("gpus").GetInt32());
            var p = DeepSeek.Plan(Rows(weight), request);
            var phy2log = Ints2(c.GetProperty("phy2log"));
            var logcnt = Ints2(c.GetProperty("logcnt"));
            for (var l = 0; l < weight.Length; l++)
            {
                Assert.That(p.Phy2Log(l).ToArray(), Is.EqualTo(phy2log[l]), $"case {compared}, {request}, layer {l}");
                Assert.That(p.LogCnt(l).ToArray(), Is.EqualTo(logcnt[l]), $"case {compared}, layer {l}");
            }
            compared++;
        }
        Assert.That(compared, Is.GreaterThanOrEqualTo(50));
    }

    [TestCase("prefill_in1024", 288, 8, 4, 32)]
    [TestCase("decode_in1000out1000", 288, 8, 1, 72)]
    [TestCase("decode_in2000out100", 320, 8, 5, 40)]
    public void MatchesTheReferenceOnTieFreeRealLayers(string file, int slots, int groups, int nodes, int gpus)
    {
        // Runs the Python transliteration live (plain python3, no packages); skipped without python3.
        var script = Path.Combine(TestSupport.RepoRoot, "tests", "Eplb.Tests", "Reference", "deepseek_reference.py");
        var dump = Path.Combine(TestSupport.LoadDataDir, file + ".json");
        string output;
        try
        {
            var start = new ProcessStartInfo("python3") { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var arg in new[] { script, "plan", "--load", dump, "--replicas", $"{slots}", "--groups", $"{groups}", "--nodes", $"{nodes}", "--gpus", $"{gpus}" })
                start.ArgumentList.Add(arg);
            using var process = Process.Start(start)!;
            output = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            Assert.That(process.ExitCode, Is.Zero, process.StandardError.ReadToEnd());
        }
        catch (System.ComponentModel.Win32Exception)
        {
            Assert.Ignore("python3 is not installed");
            return;
        }
        var load = TestSupport.RealLoad(file);
        var p = DeepSeek.Plan(load, new PlacementRequest(slots, groups, nodes, gpus));
        using var reference = JsonDocument.Parse(output);
        var layers = reference.RootElement.EnumerateArray().ToArray();
        Assert.That(layers, Has.Length.EqualTo(load.Layers));
        var compared = 0;
        for (var l = 0; l < layers.Length; l++)
        {
            if (layers[l].ValueKind == JsonValueKind.Null) continue;  // a tie the reference leaves to torch
            Assert.That(p.Phy2Log(l).ToArray(), Is.EqualTo(Ints(layers[l].GetProperty("phy2log"))), $"layer {l}");
            Assert.That(p.LogCnt(l).ToArray(), Is.EqualTo(Ints(layers[l].GetProperty("logcnt"))), $"layer {l}");
            compared++;
        }
        TestContext.Out.WriteLine($"{compared} of {layers.Length} layers are tie-free and equal");
        Assert.That(compared, Is.GreaterThan(layers.Length / 3));
    }

    [Test]
    public void HierarchicalReachesTheSpecRangeOnEveryRealFile([ValueSource(typeof(TestSupport), nameof(TestSupport.LoadFileNames))] string name)
    {
        // docs/design.md §2.3: 0.75-0.89 aggregate at 4 nodes x 8 GPUs, R = 288; global 0.97-0.99.
        var load = TestSupport.RealLoad(name);
        var hierarchical = DeepSeek.Plan(load, new PlacementRequest(288, 8, 4, 32));
        var global = DeepSeek.Plan(load, new PlacementRequest(288, 8, 3, 72));
        Assert.That(hierarchical.Balancedness(load), Is.InRange(0.74, 0.89));
        Assert.That(hierarchical.NodeLocalFraction(load, 8), Is.EqualTo(1.0));
        Assert.That(PlacementOracle.GroupsHaveAHomeNode(hierarchical, 8), Is.True);
        Assert.That(global.Balancedness(load), Is.InRange(0.97, 1.0));
    }

    [Test]
    public void NoDuplicateOnRankRemovesDuplicatesAndOtherwiseChangesNothing()
    {
        var hot = Rows([1000, 1, 1, 1, 1, 1, 1, 1]);
        var p = DeepSeek.Plan(hot, new PlacementRequest(12, 2, 2, 4) { NoDuplicateOnRank = true });
        PlacementOracle.AssertValid(p, 1, 8, 12, 4);
        Assert.That(PlacementOracle.HasDuplicateOnGpu(p), Is.False);
        Assert.That(p.LogCnt(0).ToArray(), Is.All.LessThanOrEqualTo(2));  // at most one per GPU of the node
        // The README golden has no duplicate: the option leaves it alone.
        var golden = Rows([90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]);
        var plain = DeepSeek.Plan(golden, new PlacementRequest(16, 4, 2, 8));
        var strict = DeepSeek.Plan(golden, new PlacementRequest(16, 4, 2, 8) { NoDuplicateOnRank = true });
        Assert.That(strict.Phy2LogTable.ToArray(), Is.EqualTo(plain.Phy2LogTable.ToArray()));
    }

    [Test]
    public void MaxReplicasCapsReplicationAndFixesTheTableCapacity()
    {
        var hot = Rows([1000, 1, 1, 1, 1, 1, 1, 1]);
        var p = DeepSeek.Plan(hot, new PlacementRequest(12, 1, 1, 4) { MaxReplicas = 2 });
        PlacementOracle.AssertValid(p, 1, 8, 12, 4);
        Assert.That(p.MaxReplicas, Is.EqualTo(2));
        Assert.That(p.LogCnt(0).ToArray(), Is.EqualTo(new[] { 2, 2, 2, 2, 1, 1, 1, 1 }));  // then the next by ratio, lowest id
        var wide = DeepSeek.Plan(hot, new PlacementRequest(12, 1, 1, 4) { MaxReplicas = 8 });
        Assert.That(wide.MaxReplicas, Is.EqualTo(8));
        Assert.That(wide.Phy2LogTable.ToArray(), Is.EqualTo(DeepSeek.Plan(hot, new PlacementRequest(12, 1, 1, 4)).Phy2LogTable.ToArray()));
        Assert.That(Assert.Throws<ArgumentException>(() => DeepSeek.Plan(hot, new PlacementRequest(24, 1, 1, 4) { MaxReplicas = 2 }))!.Message,
            Does.Contain("maxReplicas = 2"));
    }

    [Test]
    public void CurrentPlacementOnlyReordersSlotsInsideEachGpu()
    {
        var load = TestSupport.RealLoad("decode_in1800out100");
        var request = new PlacementRequest(288, 8, 4, 32);
        var current = ExpertPlacement.Initial(load.Layers, 256, 288, 32, 4);
        var plain = DeepSeek.Plan(load, request);
        var kept = DeepSeek.Plan(load, request, current);
        Assert.That(kept.Balancedness(load), Is.EqualTo(plain.Balancedness(load)).Within(1e-12));
        Assert.That(kept.SlotsChanged(current), Is.LessThan(plain.SlotsChanged(current)));
        var off = DeepSeek.Plan(load, request with { PreserveSlots = false }, current);
        Assert.That(off.Phy2LogTable.ToArray(), Is.EqualTo(plain.Phy2LogTable.ToArray()));
    }

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(v => v.GetInt32()).ToArray();

    private static int[][] Ints2(JsonElement e) => e.EnumerateArray().Select(Ints).ToArray();
}
