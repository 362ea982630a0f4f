using System.Text.Json;
using Eplb.Formats;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The round trip with SGLang (issue 14): what <c>eplb plan</c> writes passes SGLang's own loading rules
/// (<see cref="SglangContract"/>) for all 61 layers of DeepSeek-V3 and every policy, and what SGLang's
/// recorder writes (<c>.pt</c>, stat and per_pass) plans exactly like the equivalent JSON.
/// </summary>
public class SglangContractTests
{
    private const int ModelLayers = 61, Experts = 256, Slots = 288, Ranks = 32;

    private string _dir = "";

    [SetUp]
    public void CreateFolder() => _dir = Directory.CreateTempSubdirectory("eplb-sglang-").FullName;

    [TearDown]
    public void DeleteFolder() => Directory.Delete(_dir, recursive: true);

    private static string Dump(string name) => Path.Combine(TestSupport.LoadDataDir, name + ".json");

    private string InDir(string name) => Path.Combine(_dir, name);

    private static string[] Plan(string load, string output, params string[] more) =>
        ["plan", "--load", load, "--slots", "288", "--groups", "8", "--nodes", "4", "--ranks", "32", "--out", output, .. more];

    /// <summary>The policies eplb ships (other tests register more in this process).</summary>
    private static readonly string[] Policies = ["deepseek", "locality", "incremental"];

    public static IEnumerable<TestCaseData> FilesAndPolicies() =>
        from file in TestSupport.LoadFileNames
        from policy in Policies
        select new TestCaseData(file, policy).SetName($"{{m}}({file},{policy})");

    [TestCaseSource(nameof(FilesAndPolicies))]
    public void EveryPolicyOnEveryRealFileWritesWhatSglangLoads(string file, string policyName)
    {
        var load = ExpertLoadFile.Read(Dump(file));
        Assert.That((load.ModelLayers, load.UnplannedLayerIds), Is.EqualTo((ModelLayers, new[] { 0, 1, 2 })));
        var planned = PlacementPolicies.Get(policyName).Plan(load.Planned, new PlacementRequest(Slots, 8, 4, Ranks));
        var model = PlacementFile.ForModel(planned, load.PlannedLayerIds, load.ModelLayers);
        foreach (var extension in new[] { ".json", ".pt" })
        {
            var path = InDir("placement" + extension);
            using (var stream = File.Create(path))
            {
                if (extension == ".pt") PlacementFile.WriteTorch(stream, model);
                else PlacementFile.WriteJson(stream, model);
            }
            var metadata = SglangContract.Load(path, ModelLayers, Experts, Slots - Experts, Ranks);
            SglangContract.AssertSameReplicas(metadata, model);
            var trivial = Enumerable.Range(0, Slots).Select(s => (long)(s % Experts)).ToArray();
            for (var l = 0; l < 3; l++) Assert.That(metadata.Phy2Log[l], Is.EqualTo(trivial), $"dense layer {l} keeps SGLang's trivial row");
            for (var i = 0; i < planned.Layers; i++)
                Assert.That(metadata.Phy2Log[load.PlannedLayerIds[i]], Is.EqualTo(planned.Phy2Log(i).ToArray().Select(e => (long)e)),
                    $"layer {load.PlannedLayerIds[i]} is the plan of that model layer");
        }
    }

    [TestCase("deepseek", "4")]
    [TestCase("deepseek", "1")]
    [TestCase("locality", "4")]
    [TestCase("incremental", "4")]
    public void ThePlanCommandWritesWhatSglangLoadsAndReportsTheRest(string policy, string nodes)
    {
        var output = InDir("placement.json");
        var old = InDir("old.json");
        var args = new List<string> { "plan", "--load", Dump("prefill_in4096"), "--slots", "288", "--groups", "8", "--nodes", nodes, "--ranks", "32",
            "--out", output, "--policy", policy };
        if (policy == "incremental")
        {
            // --old in SGLang's own shape (61 rows, only physical_to_logical_map), from another window.
            Assert.That(CliRunner.Run(Plan(Dump("decode_in1000out1000"), old)).ExitCode, Is.Zero);
            args.AddRange(["--old", old]);
        }
        var result = CliRunner.Run([.. args]);
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        var metadata = SglangContract.Load(output, ModelLayers, Experts, Slots - Experts, Ranks);

        using var report = JsonDocument.Parse(File.ReadAllBytes(output + ".report.json"));
        var root = report.RootElement;
        Assert.That(root.GetProperty("policy").GetString(), Is.EqualTo(policy));
        Assert.That(root.GetProperty("model_layers").GetInt32(), Is.EqualTo(ModelLayers));
        Assert.That(root.GetProperty("planned_layer_ids").EnumerateArray().Select(v => v.GetInt32()), Is.EqualTo(Enumerable.Range(3, 58)));
        Assert.That(root.GetProperty("unplanned_layer_ids").EnumerateArray().Select(v => v.GetInt32()), Is.EqualTo(new[] { 0, 1, 2 }));
        Assert.That(root.GetProperty("load_files")[0].GetProperty("format").GetString(), Is.EqualTo(nameof(ExpertLoadFormat.JsonLogicalCount)));
        Assert.That(root.GetProperty("changed_against").GetString(), Is.EqualTo(policy == "incremental" ? "old" : "initial"));
        // The report's logical_to_physical_map and replica counts are the lists SGLang derives, row by model layer.
        var log2phy = root.GetProperty("logical_to_physical_map").EnumerateArray().ToList();
        var counts = root.GetProperty("logical_replica_count").EnumerateArray().ToList();
        Assert.That((log2phy.Count, counts.Count), Is.EqualTo((ModelLayers, ModelLayers)));
        for (var l = 0; l < ModelLayers; l++)
        {
            var lists = log2phy[l].EnumerateArray().Select(e => e.EnumerateArray().Select(v => v.GetInt32()).Where(s => s >= 0).ToArray()).ToList();
            Assert.That(lists, Is.EqualTo(metadata.LogicalToAllPhysical[l]), $"layer {l}");
            Assert.That(counts[l].EnumerateArray().Select(v => v.GetInt32()), Is.EqualTo(metadata.LogicalToAllPhysical[l].Select(list => list.Length)));
        }
        var balancedness = root.GetProperty("balancedness").GetDouble();
        var load = ExpertLoadFile.Read(Dump("prefill_in4096")).Planned;
        var planned = ExpertPlacement.FromPhy2Log(Enumerable.Range(3, 58).Select(l => metadata.Phy2Log[l].Select(v => (int)v).ToArray()).ToList(), Experts, Ranks,
            int.Parse(nodes));
        Assert.That(balancedness, Is.EqualTo(PlacementOracle.Balancedness(planned, load)).Within(1e-12));
        Assert.That(root.GetProperty("balancedness_per_layer").EnumerateArray().Select(v => v.GetDouble()), Is.EqualTo(planned.BalancednessPerLayer(load)).Within(1e-12));
        Assert.That(root.GetProperty("balancedness_before").GetDouble(), Is.LessThan(balancedness));

        Assert.That(result.Stdout, Does.Contain($"read {Dump("prefill_in4096")}: JSON {{\"logical_count\": ...}}"));
        Assert.That(result.Stdout, Does.Contain("61 model layers x 256 experts: 3 layers with no load keep SGLang's trivial row: 0, 1, 2"));
        Assert.That(result.Stdout, Does.Contain($"wrote {output} (physical_to_logical_map only, 61 layers x 288 slots, JSON)")
            .And.Contain($"the report {output}.report.json"));
    }

    [Test]
    public void TheTorchOutputHoldsTheSameMapAsTheJson()
    {
        var json = InDir("p.json");
        var pt = InDir("p.pt");
        Assert.That(CliRunner.Run(Plan(Dump("decode_in500out1500"), json, "--policy", "locality")).ExitCode, Is.Zero);
        var result = CliRunner.Run(Plan(Dump("decode_in500out1500"), pt, "--policy", "locality"));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(result.Stdout, Does.Contain("61 layers x 288 slots, torch.save)"));
        var fromJson = SglangContract.Load(json, ModelLayers, Experts, Slots - Experts, Ranks);
        var fromTorch = SglangContract.Load(pt, ModelLayers, Experts, Slots - Experts, Ranks);
        Assert.That(fromTorch.Phy2Log, Is.EqualTo(fromJson.Phy2Log));
        using var archive = TorchArchive.Open(pt);
        Assert.That(((TorchTensor)((IReadOnlyDictionary<string, object?>)archive.Root!)[PlacementFile.MapKey]!).DType, Is.EqualTo(TorchDType.Int64),
            "int64, as torch.tensor makes of Python ints");
    }

    /// <summary>SGLang's stat dump of a real load: its counts split over three buffer steps, int32, plus a step the buffer never filled.</summary>
    private static void WriteStatDump(string path, ExpertLoad load)
    {
        var cells = load.Layers * load.LogicalExperts;
        var steps = new int[4 * cells];
        for (var i = 0; i < cells; i++)
        {
            var total = checked((int)load.Values[i]);
            steps[i] = total / 3;
            steps[cells + i] = total / 2;
            steps[2 * cells + i] = total - total / 3 - total / 2;
        }
        using var stream = File.Create(path);
        TorchArchive.Save(stream, new Dictionary<string, object?>
        {
            ["rank"] = 0L,
            ["logical_count"] = TorchTensor.FromInt32(steps, 4, load.Layers, load.LogicalExperts),
            ["average_utilization_rate_over_window"] = null,
        });
    }

    [Test]
    public void AStatRecorderDumpPlansExactlyLikeTheEquivalentJson()
    {
        var recorder = InDir("expert_distribution_recorder_1718000000.123.pt");
        WriteStatDump(recorder, ExpertLoad.Read(Dump("prefill_in2048")));
        foreach (var policy in Policies)
        {
            var fromPt = CliRunner.Run(Plan(recorder, InDir("from-pt.json"), "--policy", policy));
            var fromJson = CliRunner.Run(Plan(Dump("prefill_in2048"), InDir("from-json.json"), "--policy", policy));
            Assert.That((fromPt.ExitCode, fromJson.ExitCode), Is.EqualTo((0, 0)), fromPt.Stderr + fromJson.Stderr);
            Assert.That(File.ReadAllBytes(InDir("from-pt.json")), Is.EqualTo(File.ReadAllBytes(InDir("from-json.json"))), policy);
            Assert.That(fromPt.Stdout, Does.Contain($"read {recorder}: SGLang recorder dump, stat/stat_approx mode (torch.save archive): 4 buffer steps summed, rank 0"));
            SglangContract.Load(InDir("from-pt.json"), ModelLayers, Experts, Slots - Experts, Ranks);
        }
    }

    [Test]
    public void PerRankPerPassDumpsSumAndFoldToTheSameLoad()
    {
        // The physical counts SGLang's per_pass recorder would see under a non-trivial placement: each
        // logical count split over the expert's replicas, over two ranks' files and two passes each.
        var json = ExpertLoad.Read(Dump("decode_in1800out100"));
        var file = ExpertLoadFile.Read(Dump("decode_in1800out100"));
        var model = PlacementFile.ForModel(PlacementPolicies.DeepSeek.Plan(file.Planned, new PlacementRequest(Slots, 8, 4, Ranks)), file.PlannedLayerIds, ModelLayers);
        var map = new long[ModelLayers * Slots];
        var physical = new int[ModelLayers * Slots];
        for (var l = 0; l < ModelLayers; l++)
        {
            var seen = new int[Experts];
            for (var s = 0; s < Slots; s++)
            {
                var e = model.Phy2Log(l)[s];
                map[l * Slots + s] = e;
                var total = (int)json[l, e];
                var replicas = model.LogCnt(l)[e];
                physical[l * Slots + s] = total / replicas + (seen[e]++ < total % replicas ? 1 : 0);
            }
        }
        var paths = new List<string>();
        for (var rank = 0; rank < 2; rank++)
        {
            var records = new List<object?>();
            for (var pass = 0; pass < 2; pass++)
            {
                var share = physical.Select((c, i) => (c + ((i + rank * 2 + pass) & 3)) / 4).ToArray();
                records.Add(new Dictionary<string, object?>
                {
                    ["forward_pass_id"] = (long)pass, ["rank"] = (long)rank, ["gatherer_key"] = "primary",
                    ["global_physical_count"] = TorchTensor.FromInt32(share, ModelLayers, Slots),
                });
            }
            var path = InDir($"expert_distribution_recorder_1718000000.5_{rank}.pt");
            using (var stream = File.Create(path))
                TorchArchive.Save(stream, new Dictionary<string, object?> { ["records"] = records, ["last_physical_to_logical_map"] = TorchTensor.FromInt64(map, ModelLayers, Slots) });
            paths.Add(path);
        }
        // (c + k) / 4 for k = 0..3 sums to c: the four shares add up to the physical counts exactly.
        var summed = ExpertLoadFile.Read(paths);
        Assert.That(summed.Load.Values.ToArray(), Is.EqualTo(json.Values.ToArray()));
        Assert.That(summed.Sources.Select(s => s.Format), Is.All.EqualTo(ExpertLoadFormat.SglangRecorderPerPass));

        var fromPt = CliRunner.Run(Plan(paths[0], InDir("from-pt.json"), "--load", paths[1]));
        var fromJson = CliRunner.Run(Plan(Dump("decode_in1800out100"), InDir("from-json.json")));
        Assert.That((fromPt.ExitCode, fromJson.ExitCode), Is.EqualTo((0, 0)), fromPt.Stderr + fromJson.Stderr);
        Assert.That(File.ReadAllBytes(InDir("from-pt.json")), Is.EqualTo(File.ReadAllBytes(InDir("from-json.json"))));
        Assert.That(fromPt.Stdout, Does.Contain($"read {paths[1]}: SGLang recorder dump, per_pass/per_token mode (torch.save archive): 2 forward passes summed (rank 1)"));
    }

    [TestCase("recorder_stat.pt")]
    [TestCase("recorder_stat_int64_strided.pt")]
    [TestCase("recorder_stat_float32_offset.pt")]
    [TestCase("recorder_per_pass.pt")]
    public void DumpsMadeByRealTorchPlanLikeTheirJson(string fixture)
    {
        var equivalent = InDir("equivalent.json");
        File.WriteAllText(equivalent, JsonSerializer.Serialize(new { logical_count = TorchArchiveTests.Expected(fixture) }));
        string[] Small(string load, string output) => ["plan", "--load", load, "--slots", "10", "--groups", "1", "--nodes", "1", "--ranks", "2", "--out", output];
        var fromPt = CliRunner.Run(Small(Path.Combine(TorchArchiveTests.FixtureDir, fixture), InDir("a.json")));
        var fromJson = CliRunner.Run(Small(equivalent, InDir("b.json")));
        Assert.That((fromPt.ExitCode, fromJson.ExitCode), Is.EqualTo((0, 0)), fromPt.Stderr + fromJson.Stderr);
        Assert.That(File.ReadAllText(InDir("a.json")), Is.EqualTo(File.ReadAllText(InDir("b.json"))));
        var metadata = SglangContract.Load(InDir("a.json"), 6, 8, 2, 2);
        Assert.That(metadata.Phy2Log[0], Is.EqualTo(new long[] { 0, 1, 2, 3, 4, 5, 6, 7, 0, 1 }), "a dense layer keeps the trivial row");
        Assert.That(fromPt.Stdout, Does.Contain("6 model layers x 8 experts: 2 layers with no load keep SGLang's trivial row: 0, 1"));
    }

    [Test]
    public void OldPlacementsInEveryShapeAreMatchedByLayer()
    {
        // The same load planned again with its own plan in force changes no slot, whichever shape the old file has.
        var sglangJson = InDir("old.json");
        var sglangPt = InDir("old.pt");
        Assert.That(CliRunner.Run(Plan(Dump("prefill_in1024"), sglangJson)).ExitCode, Is.Zero);
        Assert.That(CliRunner.Run(Plan(Dump("prefill_in1024"), sglangPt)).ExitCode, Is.Zero);
        var rows = SglangContract.Load(sglangJson, ModelLayers, Experts, Slots - Experts, Ranks).Phy2Log;
        // What eplb plan wrote before it followed SGLang's layout: MoE rows only, layer_ids, more keys.
        var older = InDir("older.json");
        File.WriteAllText(older, JsonSerializer.Serialize(new
        {
            physical_to_logical_map = rows[3..], logical_replica_count = new[] { 1 }, layer_ids = Enumerable.Range(3, 58), policy = "deepseek",
        }));
        var olderWithoutIds = InDir("older-no-ids.json");
        File.WriteAllText(olderWithoutIds, JsonSerializer.Serialize(new { physical_to_logical_map = rows[3..], policy = "deepseek" }));
        foreach (var old in new[] { sglangJson, sglangPt, older, olderWithoutIds })
        {
            var result = CliRunner.Run(Plan(Dump("prefill_in1024"), InDir("next.json"), "--old", old));
            Assert.That(result.ExitCode, Is.Zero, result.Stderr);
            Assert.That(result.Stdout, Does.Contain("slots changed 0 of 16704 (against the old placement)"), old);
        }
    }

    [Test]
    public void ModelLayersPlacesALoadOfMoeRowsOnlyAtTheLastLayers()
    {
        var full = ExpertLoad.Read(Dump("decode_in2000out100"));
        var moeOnly = InDir("moe-only.json");
        File.WriteAllText(moeOnly, JsonSerializer.Serialize(Enumerable.Range(3, 58).Select(l => full.Layer(l).ToArray())));
        var fromFull = CliRunner.Run(Plan(Dump("decode_in2000out100"), InDir("full.json")));
        var fromMoe = CliRunner.Run(Plan(moeOnly, InDir("moe.json"), "--model-layers", "61"));
        Assert.That((fromFull.ExitCode, fromMoe.ExitCode), Is.EqualTo((0, 0)), fromMoe.Stderr);
        Assert.That(File.ReadAllBytes(InDir("moe.json")), Is.EqualTo(File.ReadAllBytes(InDir("full.json"))));
        Assert.That(fromMoe.Stdout, Does.Contain("JSON [L][N] array; its 58 rows are layers 3..60 of 61"));
        var tooFew = CliRunner.Run(Plan(moeOnly, InDir("bad.json"), "--model-layers", "10"));
        Assert.That((tooFew.ExitCode, tooFew.Stderr.Trim()), Is.EqualTo((2, $"eplb: {moeOnly}: 58 layers, more than the model's 10")));
    }

    [Test]
    public void HostileDumpsAreOneLineExitTwoAndWriteNothing()
    {
        var notZip = InDir("random.pt");
        File.WriteAllBytes(notZip, [0x13, 0x37, 0, 0xff]);
        var whole = File.ReadAllBytes(Path.Combine(TorchArchiveTests.FixtureDir, "recorder_stat.pt"));
        var truncated = InDir("truncated.pt");
        File.WriteAllBytes(truncated, whole[..(whole.Length / 2)]);
        var evil = InDir("evil.pt");
        using (var zip = System.IO.Compression.ZipFile.Open(evil, System.IO.Compression.ZipArchiveMode.Create))
        using (var s = zip.CreateEntry("evil/data.pkl").Open())
            s.Write(new PickleBuilder().Proto().Global("posix", "system").Str("touch /tmp/eplb-pwned").Raw(0x85).Op('R').Op('.').Build());
        var placement = InDir("placement.pt");
        Assert.That(CliRunner.Run(Plan(Dump("prefill_in512"), placement)).ExitCode, Is.Zero);
        var cases = new (string Load, string Expected)[]
        {
            (notZip, "neither a torch.save archive (zip) nor JSON"),
            (truncated, "not a readable zip archive (truncated or damaged?)"),
            (evil, "pickle global posix.system at byte 2 is refused"),
            (placement, "the archive holds a placement (physical_to_logical_map), not an expert load"),
            (InDir("placement.pt.report.json"), "expected a \"logical_count\" key"),
        };
        foreach (var (load, expected) in cases)
        {
            var output = InDir("out.json");
            var result = CliRunner.Run(Plan(load, output));
            Assert.That(result.ExitCode, Is.EqualTo(2), load + result.Stdout);
            Assert.That(result.Stderr, Does.StartWith($"eplb: {load}: ").And.Contain(expected));
            Assert.That(result.Stderr.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
            Assert.That(Directory.GetFiles(_dir).Where(f => Path.GetFileName(f).StartsWith("out.json", StringComparison.Ordinal)), Is.Empty);
        }
        Assert.That(File.Exists("/tmp/eplb-pwned"), Is.False);
    }
}
