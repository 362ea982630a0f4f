using System.Text.Json;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// <c>eplb plan</c> as a user runs it: the placement file (only SGLang's key), the report beside it,
/// figures, and one-line errors with exit code 2. SGLang's acceptance rules: <see cref="SglangContractTests"/>.
/// </summary>
public class CliPlanTests
{
    private string _dir = "";

    [SetUp]
    public void CreateFolder() => _dir = Directory.CreateTempSubdirectory("eplb-plan-").FullName;

    [TearDown]
    public void DeleteFolder() => Directory.Delete(_dir, recursive: true);

    private static string Dump(string name) => Path.Combine(TestSupport.LoadDataDir, name + ".json");

    private string Write(string name, string content)
    {
        var path = Path.Combine(_dir, name);
        File.WriteAllText(path, content);
        return path;
    }

    private static string[] Plan(string load, string output, params string[] more) =>
        ["plan", "--load", load, "--slots", "288", "--groups", "8", "--nodes", "4", "--ranks", "32", "--out", output, .. more];

    [Test]
    public void WritesThePlacementWithOnlySglangsKeyAndTheReportBesideIt()
    {
        var output = Path.Combine(_dir, "placement.json");
        var result = CliRunner.Run(Plan(Dump("decode_in1000out1000"), output));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        using var placement = JsonDocument.Parse(File.ReadAllBytes(output));
        Assert.That(placement.RootElement.EnumerateObject().Select(p => p.Name), Is.EqualTo(new[] { "physical_to_logical_map" }));
        var rows = placement.RootElement.GetProperty("physical_to_logical_map").EnumerateArray().Select(r => r.EnumerateArray().Select(v => v.GetInt32()).ToArray()).ToList();
        Assert.That(rows, Has.Count.EqualTo(61));
        Assert.That(rows, Is.All.Length.EqualTo(288));
        var phy2log = rows.Skip(3).ToList();
        using var json = JsonDocument.Parse(File.ReadAllBytes(output + ".report.json"));
        var root = json.RootElement;
        Assert.That(root.EnumerateObject().Select(p => p.Name), Is.EqualTo(new[]
        {
            "placement_file", "load_files", "policy", "slots", "groups", "nodes", "ranks", "logical_experts", "model_layers", "planned_layer_ids",
            "unplanned_layer_ids", "balancedness_before", "balancedness", "balancedness_per_layer", "node_local_fraction", "slots_changed",
            "slots_total", "changed_against", "bytes_to_move", "expert_bytes", "elapsed_ms", "logical_to_physical_map", "logical_replica_count",
        }));
        Assert.That(root.GetProperty("planned_layer_ids").EnumerateArray().Select(v => v.GetInt32()), Is.EqualTo(Enumerable.Range(3, 58)));
        Assert.That(root.GetProperty("policy").GetString(), Is.EqualTo("deepseek"));
        Assert.That((root.GetProperty("slots").GetInt32(), root.GetProperty("groups").GetInt32(), root.GetProperty("nodes").GetInt32(),
            root.GetProperty("ranks").GetInt32()), Is.EqualTo((288, 8, 4, 32)));

        // The file is the deepseek plan, and its figures are those of docs/design.md §1.
        var load = TestSupport.RealLoad("decode_in1000out1000");
        var expected = PlacementPolicies.DeepSeek.Plan(load, new PlacementRequest(288, 8, 4, 32));
        var p = ExpertPlacement.FromPhy2Log(phy2log, 256, 32, 4);
        Assert.That(p.Phy2LogTable.ToArray(), Is.EqualTo(expected.Phy2LogTable.ToArray()));
        Assert.That(root.GetProperty("balancedness").GetDouble(), Is.EqualTo(PlacementOracle.Balancedness(p, load)).Within(1e-12));
        Assert.That(root.GetProperty("balancedness_per_layer").EnumerateArray().Select(v => v.GetDouble()), Is.EqualTo(p.BalancednessPerLayer(load)).Within(1e-12));
        Assert.That(root.GetProperty("node_local_fraction").GetDouble(), Is.EqualTo(1.0));
        Assert.That(root.GetProperty("elapsed_ms").GetDouble(), Is.GreaterThan(0));
        var counts = root.GetProperty("logical_replica_count").EnumerateArray().Skip(3).ToList();
        var log2phy = root.GetProperty("logical_to_physical_map").EnumerateArray().Skip(3).ToList();
        for (var l = 0; l < 58; l++)
        {
            Assert.That(counts[l].EnumerateArray().Select(v => v.GetInt32()), Is.EqualTo(p.LogCnt(l).ToArray()));
            var experts = log2phy[l].EnumerateArray().ToList();
            Assert.That(experts, Has.Count.EqualTo(256));
            Assert.That(experts.Select(r => r.EnumerateArray().Select(v => v.GetInt32()).Where(s => s >= 0)),
                Is.EqualTo(Enumerable.Range(0, 256).Select(e => p.Log2Phy(l).Slice(e * p.MaxReplicas, p.MaxReplicas).ToArray().Where(s => s >= 0))));
        }
        Assert.That(root.GetProperty("slots_changed").GetInt32(), Is.EqualTo(p.SlotsChanged(ExpertPlacement.Initial(58, 256, 288, 32, 4))));
        Assert.That(result.Stdout, Does.Contain("3 layers with no load keep SGLang's trivial row: 0, 1, 2"));
        Assert.That(result.Stdout, Does.Match(@"balancedness 0\.\d{3} -> 0\.759"));
        Assert.That(result.Stdout, Does.Contain("node-local 1.000").And.Contain("slots changed").And.Contain("GiB to move").And.Contain("planned in"));
    }

    [Test]
    public void IncrementalFromAnOldPlacementChangesFewSlots()
    {
        var old = Path.Combine(_dir, "old.json");
        var fresh = Path.Combine(_dir, "fresh.json");
        var next = Path.Combine(_dir, "next.json");
        Assert.That(CliRunner.Run(Plan(Dump("decode_in1800out100"), old, "--policy", "locality")).ExitCode, Is.Zero);
        var full = CliRunner.Run(Plan(Dump("decode_in2000out100"), fresh, "--policy", "locality", "--old", old));
        var small = CliRunner.Run(Plan(Dump("decode_in2000out100"), next, "--policy", "incremental", "--old", old, "--no-duplicate-on-gpu"));
        Assert.That(small.ExitCode, Is.Zero, small.Stderr);
        Assert.That(full.ExitCode, Is.Zero, full.Stderr);
        static int Changed(string stdout) => int.Parse(System.Text.RegularExpressions.Regex.Match(stdout, @"slots changed (\d+)").Groups[1].Value);
        Assert.That(Changed(small.Stdout), Is.LessThan(Changed(full.Stdout) / 4));
        Assert.That(small.Stdout, Does.Contain("against the old placement"));
        using var json = JsonDocument.Parse(File.ReadAllBytes(next + ".report.json"));
        Assert.That(json.RootElement.GetProperty("policy").GetString(), Is.EqualTo("incremental"));
    }

    [Test]
    public void AcceptsBareArraysAndStepDumps()
    {
        var bare = Write("bare.json", "[[0, 0, 0, 0], [4, 3, 2, 1], [1, 1, 9, 1]]");
        var steps = Write("steps.json", "{\"logical_count\": [[[4, 3, 2, 1]], [[0, 0, 0, 9]]]}");
        var output = Path.Combine(_dir, "p.json");
        // --replicas and --gpus (the README's first names) are aliases of --slots and --ranks.
        var result = CliRunner.Run("plan", "--load", bare, "--replicas", "6", "--groups", "2", "--nodes", "1", "--gpus", "2", "--out", output);
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        using (var json = JsonDocument.Parse(File.ReadAllBytes(output + ".report.json")))
            Assert.That(json.RootElement.GetProperty("planned_layer_ids").EnumerateArray().Select(v => v.GetInt32()), Is.EqualTo(new[] { 1, 2 }));
        result = CliRunner.Run("plan", "--load", steps, "--replicas", "6", "--groups", "2", "--nodes", "1", "--gpus", "2", "--out", output, "--policy", "locality");
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        using (var json = JsonDocument.Parse(File.ReadAllBytes(output + ".report.json")))
            Assert.That(json.RootElement.GetProperty("logical_replica_count")[0].EnumerateArray().Select(v => v.GetInt32()).Sum(), Is.EqualTo(6));
    }

    [Test]
    public void MaxReplicasFixesTheWidthOfTheLogicalToPhysicalMap()
    {
        var output = Path.Combine(_dir, "p.json");
        var result = CliRunner.Run(Plan(Dump("prefill_in2048"), output, "--policy", "locality", "--max-replicas", "6"));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        using var json = JsonDocument.Parse(File.ReadAllBytes(output + ".report.json"));
        foreach (var layer in json.RootElement.GetProperty("logical_to_physical_map").EnumerateArray())
            foreach (var expert in layer.EnumerateArray())
                Assert.That(expert.GetArrayLength(), Is.EqualTo(6));
        Assert.That(json.RootElement.GetProperty("logical_replica_count").EnumerateArray().SelectMany(r => r.EnumerateArray()).Max(v => v.GetInt32()),
            Is.LessThanOrEqualTo(6));
    }

    public static IEnumerable<TestCaseData> BadInputs()
    {
        yield return new TestCaseData("missing.json", null, new[] { "--replicas", "288" }, "does not exist").SetName("MissingFile");
        yield return new TestCaseData("bad.json", "[[1, 2", new[] { "--replicas", "288" }, "malformed JSON").SetName("MalformedJson");
        yield return new TestCaseData("bad.json", "[[1, 2], [3]]", new[] { "--replicas", "288" }, "ragged rows").SetName("RaggedRows");
        yield return new TestCaseData("bad.json", "[[1, -2]]", new[] { "--replicas", "288" }, "must be finite and >= 0").SetName("NegativeLoad");
        yield return new TestCaseData("bad.json", "[[1, NaN]]", new[] { "--replicas", "288" }, "malformed JSON").SetName("NaNLoad");
        yield return new TestCaseData("bad.json", "[[0, 0], [0, 0]]", new[] { "--replicas", "288" }, "nothing to plan").SetName("AllZero");
        yield return new TestCaseData(null, null, new[] { "--replicas", "290" }, "must be a multiple of ranks (G = 32)").SetName("ReplicasNotMultipleOfGpus");
        yield return new TestCaseData(null, null, new[] { "--replicas", "224" }, "must be >= logical experts (N = 256)").SetName("FewerSlotsThanExperts");
        yield return new TestCaseData(null, null, new[] { "--replicas", "288", "--policy", "magic" }, "unknown placement policy 'magic'").SetName("UnknownPolicy");
        yield return new TestCaseData(null, null, new[] { "--replicas", "288", "--old", "nowhere.json" }, "does not exist").SetName("MissingOld");
        yield return new TestCaseData("old.json", "{\"physical_to_logical_map\": [[0, 1]]}", new[] { "--replicas", "288", "--old", "$FILE" }, "1 layers, but the load has 61").SetName("OldWithOtherShape");
        yield return new TestCaseData(null, null, new[] { "--replicas", "x" }, "").SetName("NonNumericSlots");
        yield return new TestCaseData(null, null, Array.Empty<string>(), "--slots").SetName("MissingSlots");
        yield return new TestCaseData(null, null, new[] { "--replicas", "288", "--repeat", "0" }, "--repeat must be in [1, 1000000] (got 0)").SetName("ZeroRepeats");
    }

    [TestCaseSource(nameof(BadInputs))]
    public void BadInputIsOneLineAndExitTwoAndWritesNothing(string? file, string? content, string[] options, string expected)
    {
        var load = Dump("prefill_in512");
        var extra = new List<string>();
        if (file != null)
        {
            var path = Path.Combine(_dir, file);
            if (content != null) File.WriteAllText(path, content);
            if (options.Contains("$FILE")) options = options.Select(o => o == "$FILE" ? path : o).ToArray();
            else load = path;
        }
        var output = Path.Combine(_dir, "out.json");
        var args = new List<string> { "plan", "--load", load, "--groups", "8", "--nodes", "4", "--ranks", "32", "--out", output };
        args.AddRange(options.Select(o => o == "nowhere.json" ? Path.Combine(_dir, o) : o));
        var result = CliRunner.Run([.. args]);
        Assert.That(result.ExitCode, Is.EqualTo(2), result.Stdout + result.Stderr);
        Assert.That(result.Stderr, Does.StartWith("eplb: ").And.Contain(expected));
        Assert.That(result.Stderr.TrimEnd().Split('\n'), Has.Length.EqualTo(1), result.Stderr);
        Assert.That(File.Exists(output), Is.False);
        Assert.That(Directory.GetFiles(_dir).Where(f => f.Contains("out.json")), Is.Empty);
    }

    [Test]
    public void RepeatReportsTheMedianTimeOfTheSamePlan()
    {
        var once = Path.Combine(_dir, "once.json");
        var repeated = Path.Combine(_dir, "repeated.json");
        Assert.That(CliRunner.Run(Plan(Dump("prefill_in512"), once)).ExitCode, Is.Zero);
        var result = CliRunner.Run(Plan(Dump("prefill_in512"), repeated, "--repeat", "5"));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(result.Stdout, Does.Match(@"planned in \d+\.\d{3} ms \(median of 5 runs\)"));
        using var a = JsonDocument.Parse(File.ReadAllBytes(once));
        using var b = JsonDocument.Parse(File.ReadAllBytes(repeated));
        Assert.That(b.RootElement.GetProperty("physical_to_logical_map").GetRawText(), Is.EqualTo(a.RootElement.GetProperty("physical_to_logical_map").GetRawText()));
        using var report = JsonDocument.Parse(File.ReadAllBytes(repeated + ".report.json"));
        Assert.That(report.RootElement.GetProperty("elapsed_ms").GetDouble(), Is.GreaterThan(0));
    }

    [Test]
    public void AnUnwritableOutputIsExitTwo()
    {
        var result = CliRunner.Run(Plan(Dump("prefill_in512"), Path.Combine(_dir, "no", "such", "dir", "p.json")));
        Assert.That(result.ExitCode, Is.EqualTo(2));
        Assert.That(result.Stderr, Does.StartWith("eplb: "));
    }
}
