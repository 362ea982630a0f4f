using System.Text.Json;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>`eplb simulate` as a user runs it (issue 15 §5-6 and issue 13 §4's hostile arguments).</summary>
public class SimulationCliTests
{
    // The built-in loads (no --load), 8 GPUs, few tokens: the whole pipeline in a few seconds.
    private static readonly string[] Quick =
    [
        "simulate", "--ranks", "8", "--nodes", "2", "--decode-passes", "80", "--prefill-passes", "1", "--tokens", "16", "--prefill-tokens", "64",
        "--window", "8", "--backend", "cpu",
    ];

    private static DirectoryInfo Scratch() => Directory.CreateTempSubdirectory("eplb-sim-");

    [Test]
    public void TheCommandPrintsTheTableAndWritesTheJsonAndThePlot()
    {
        var dir = Scratch();
        try
        {
            var json = Path.Combine(dir.FullName, "sim.json");
            var plot = Path.Combine(dir.FullName, "sim.png");
            var result = CliRunner.Run([.. Quick, "--json", json, "--plot", plot]);
            Assert.That(result.ExitCode, Is.Zero, result.Stderr);
            var lines = result.Stdout.Split('\n');
            Assert.That(lines.Select(l => l.TrimEnd('\r').Length), Is.All.LessThanOrEqualTo(80), "the table fits 80 columns");
            foreach (var name in new[] { "no EPLB", "static", "deepseek", "locality", "incremental", "locality+local", "cpu backend", "Model figures" })
                Assert.That(result.Stdout, Does.Contain(name));
            Assert.That(result.Stdout, Does.Not.Contain("pass 1/"), "progress goes to stderr, never into the table");

            using var document = JsonDocument.Parse(File.ReadAllText(json));
            var settings = document.RootElement.GetProperty("settings");
            Assert.That(settings.GetProperty("ranks").GetInt32(), Is.EqualTo(8));
            Assert.That(settings.GetProperty("backend").GetString(), Is.EqualTo("cpu"));
            Assert.That(settings.GetProperty("phases").GetArrayLength(), Is.EqualTo(2));
            Assert.That(settings.GetProperty("cost_model").GetProperty("hbm_bytes_per_second").GetDouble(), Is.EqualTo(4.3e12));
            var runs = document.RootElement.GetProperty("runs").EnumerateArray().ToList();
            Assert.That(runs.Select(r => r.GetProperty("name").GetString()),
                Is.EqualTo(new[] { "no EPLB", "static", "deepseek", "locality", "incremental", "locality+local" }));
            foreach (var run in runs)
            {
                foreach (var key in new[] { "balancedness", "cross_node_fraction", "tokens_per_s", "gain_vs_no_eplb" })
                {
                    Assert.That(run.GetProperty(key).TryGetProperty("steady", out _), Is.True, key);
                    Assert.That(run.GetProperty(key).GetProperty("whole").GetDouble(), Is.Not.NaN, key);
                }
                Assert.That(run.GetProperty("step_ms").GetProperty("p99").GetDouble(),
                    Is.GreaterThanOrEqualTo(run.GetProperty("step_ms").GetProperty("p50").GetDouble()));
                Assert.That(run.GetProperty("rearrangements").GetProperty("failed").GetInt32(), Is.Zero);
                Assert.That(run.GetProperty("stall_s").GetDouble(), Is.GreaterThanOrEqualTo(0));
                Assert.That(run.GetProperty("slots_moved").GetInt64(), Is.GreaterThanOrEqualTo(0));
                Assert.That(run.GetProperty("bytes_moved_per_gpu").GetDouble(), Is.GreaterThanOrEqualTo(0));
                var phases = run.GetProperty("phases").EnumerateArray().ToList();
                Assert.That(phases.Select(p => p.GetProperty("load").GetString()), Is.EqualTo(new[] { "decode_in1000out1000", "prefill_in4096" }));
                Assert.That(phases.Select(p => p.GetProperty("tokens_per_s").GetProperty("whole").GetDouble()), Is.All.GreaterThan(0));
            }
            Assert.That(runs[0].GetProperty("slots").GetInt32(), Is.EqualTo(256));
            Assert.That(runs[2].GetProperty("rearrangements").GetProperty("completed").GetInt32(), Is.GreaterThanOrEqualTo(1));
            Assert.That(File.ReadAllBytes(plot).Take(4), Is.EqualTo(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }));
            Assert.That(dir.GetFiles(".*"), Is.Empty, "no temporary file is left behind");
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Test]
    public void TwoRunsWithOneSeedWriteTheSameJson()
    {
        var dir = Scratch();
        try
        {
            var seed = TestSupport.NewRandom().Next().ToString();
            var first = Path.Combine(dir.FullName, "a.json");
            var second = Path.Combine(dir.FullName, "b.json");
            Assert.That(CliRunner.Run([.. Quick, "--seed", seed, "--json", first]).ExitCode, Is.Zero);
            Assert.That(CliRunner.Run([.. Quick, "--seed", seed, "--json", second]).ExitCode, Is.Zero);
            Assert.That(File.ReadAllBytes(second), Is.EqualTo(File.ReadAllBytes(first)), "async EPLB included");
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [TestCase("--decode-passes", "0", "--decode-passes must be >= 1 (got 0)")]
    [TestCase("--gpus", "7", "multiple of ranks (G = 7)")]
    [TestCase("--policy", "greedy", "unknown placement policy 'greedy'")]
    [TestCase("--node-local", "incremental", "node-local run of 'incremental' needs 'incremental'")]
    [TestCase("--backend", "tpu", "unknown backend 'tpu'")]
    [TestCase("--load", "/no/such.json", "/no/such.json")]
    [TestCase("--affinity", "1.5", "affinity must be in [0, 1] (got 1.5)")]
    [TestCase("--interval", "20", "interval 20 is shorter than layers + 2 = 60")]
    [TestCase("--cost", "warp_speed=9", "unknown cost constant 'warp_speed'")]
    [TestCase("--cost", "hbm_bytes_per_second=-1", "must be a positive number")]
    [TestCase("--tokens", "300000000", "--tokens 300000000")]
    [TestCase("--window", "100000000", "--window 100000000")]
    [TestCase("--gpus", "1000000", "1000000")]
    [TestCase("--gpus", "100000", "100000")]
    public void BadArgumentsAreOneLineAndExitTwo(string option, string value, string expected)
    {
        var dir = Scratch();
        try
        {
            var json = Path.Combine(dir.FullName, "sim.json");
            string[] args = option == "--node-local"
                ? ["simulate", "--policy", "deepseek", option, value, "--json", json]
                : option == "--decode-passes"
                    ? ["simulate", option, value, "--json", json]
                    : ["simulate", option, value, "--json", json, "--decode-passes", "2"];
            var result = CliRunner.Run(args);
            Assert.That(result.ExitCode, Is.EqualTo(2), result.Stdout + result.Stderr);
            Assert.That(result.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1), result.Stderr);
            Assert.That(result.Stderr, Does.StartWith("eplb: ").And.Contain(expected));
            Assert.That(File.Exists(json), Is.False, "nothing is written on error");
            Assert.That(dir.GetFiles(), Is.Empty);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Test]
    public void HugeRunsAreRefusedWithTheirEstimatedMemory()
    {
        var result = CliRunner.Run("simulate", "--window", "100000000");
        Assert.That(result.ExitCode, Is.EqualTo(2));
        Assert.That(result.Stderr, Does.Contain("would need about").And.Contain("TiB").And.Contain("available to this process"));
    }

    [Test]
    public void AnUnwritablePlotLeavesNoJson()
    {
        var dir = Scratch();
        try
        {
            var json = Path.Combine(dir.FullName, "ok.json");
            var result = CliRunner.Run([.. Quick, "--json", json, "--plot", "/proc/eplb-cannot-write.png"]);
            Assert.That(result.ExitCode, Is.EqualTo(2), result.Stderr);
            Assert.That(result.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1));
            Assert.That(result.Stderr, Does.Contain("--plot"));
            Assert.That(File.Exists(json), Is.False);
            var missing = CliRunner.Run([.. Quick, "--json", json, "--plot", Path.Combine(dir.FullName, "no", "such", "x.png")]);
            Assert.That(missing.ExitCode, Is.EqualTo(2));
            Assert.That(missing.Stderr, Does.Contain("does not exist"));
            Assert.That(dir.GetFileSystemInfos(), Is.Empty);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Test]
    public void RanksThatDoNotSplitTheExpertsAreNamed()
    {
        var result = CliRunner.Run("simulate", "--gpus", "48", "--nodes", "4", "--decode-passes", "2", "--prefill-passes", "1", "--tokens", "4",
            "--prefill-tokens", "8", "--policy", "deepseek", "--backend", "cpu");
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(result.Stdout, Does.Contain("no EPLB: 288").And.Contain("does not split over 48 GPUs"));
    }
}
