using System.Text.Json;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The serving simulation and its command (issue 8).</summary>
public class SimulationTests
{
    private static SimulationOptions Small(Backend backend = Backend.Cpu, SimulationRouting routing = SimulationRouting.Hash)
    {
        // 8 MoE layers of two real dumps (decode, then prefill), 8 GPUs in 2 nodes.
        var layers = Enumerable.Range(0, 8).Select(l => l * 7).ToArray();
        return new SimulationOptions
        {
            Loads = [TestSupport.RealLoad("decode_in1000out1000").Select(layers), TestSupport.RealLoad("prefill_in4096").Select(layers)],
            Ranks = 8,
            Nodes = 2,
            Slots = 288,
            Groups = 8,
            Steps = 96,
            Tokens = 512,
            WindowSize = 16,
            StepInterval = 32,
            Backend = backend,
            Routing = routing,
            Seed = 11,
        };
    }

    [Test]
    public void EveryPolicyBeatsNoEplbOnTheRealLoads()
    {
        var result = new ServingSimulation(Small()).Run();
        Assert.That(result.Runs.Select(r => r.Name), Is.EqualTo(new[] { "no EPLB", "deepseek", "locality", "incremental" }));
        var baseline = result.NoEplb;
        Assert.That(baseline.Rearrangements, Is.Zero);
        Assert.That(baseline.SlotsMoved, Is.Zero);
        foreach (var run in result.Runs.Skip(1))
        {
            Assert.That(run.Balancedness, Is.GreaterThan(baseline.Balancedness + 0.05), run.Name);
            Assert.That(run.Rearrangements, Is.GreaterThanOrEqualTo(1), run.Name);
            Assert.That(run.SlotsMoved, Is.GreaterThan(0), run.Name);
            Assert.That(run.BytesMoved, Is.GreaterThan(0), run.Name);
            Assert.That(run.FullScaleBytesMoved, Is.GreaterThan(run.BytesMoved), run.Name);
            Assert.That(run.BalancednessPerStep, Has.Length.EqualTo(96));
            Assert.That(run.BalancednessPerStep, Is.All.InRange(0.0, 1.0));
            Assert.That(run.NodeLocalFraction, Is.InRange(0.5, 1.0), run.Name);
            Assert.That(run.RankLoad, Has.Length.EqualTo(8));
        }
        // Every routed token lands on some GPU: the mean GPU load is tokens x K per layer / G.
        Assert.That(baseline.RankLoad.Average(), Is.EqualTo(512.0 * 8 / 8).Within(1e-9));
    }

    [Test]
    public void SameSeedSameNumbers()
    {
        var options = Small() with { Steps = 40, Policies = ["deepseek"], UseAsync = false };
        var a = new ServingSimulation(options).Run();
        var b = new ServingSimulation(options).Run();
        Assert.That(b.Runs.Select(r => r.Balancedness), Is.EqualTo(a.Runs.Select(r => r.Balancedness)));
        Assert.That(b.Runs.Select(r => r.SlotsMoved), Is.EqualTo(a.Runs.Select(r => r.SlotsMoved)));
    }

    [Test]
    public void SoftmaxRoutingFollowsTheLoadToo()
    {
        var options = Small(routing: SimulationRouting.Softmax) with { Steps = 48, Tokens = 128, Policies = ["locality"] };
        var result = new ServingSimulation(options).Run();
        Assert.That(result.Runs[1].Balancedness, Is.GreaterThan(result.NoEplb.Balancedness));
    }

    [Test]
    public void BadOptionsAreRejectedBeforeRunning()
    {
        Assert.Throws<ArgumentException>(() => new ServingSimulation(Small() with { Ranks = 7 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(Small() with { Nodes = 3 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(Small() with { Tokens = 4 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(Small() with { Policies = ["greedy"] }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(Small() with { Loads = [] }).Run());
    }

    [Test]
    public void SamplerDrawsFollowTheDirichletMean()
    {
        var sampler = new RoutingSampler(3, concentration: 1e7);  // almost no per-pass noise
        double[] load = [1, 2, 3, 4, 0, 10];
        var ids = new int[60000];
        sampler.Sample(load, 20000, 3, ids);
        var counts = new int[6];
        foreach (var id in ids) counts[id]++;
        Assert.That(counts[4], Is.Zero, "an expert without load is never drawn");
        for (var e = 0; e < 6; e++) Assert.That(counts[e] / 60000.0, Is.EqualTo(load[e] / 20).Within(0.01), $"expert {e}");
        var logits = new float[1000 * 6];
        sampler.SampleLogits(load, 1000, logits);
        var top = new int[6];
        for (var t = 0; t < 1000; t++)
        {
            var row = logits.AsSpan(t * 6, 6);
            var best = 0;
            for (var e = 1; e < 6; e++) if (row[e] > row[best]) best = e;
            top[best]++;
        }
        Assert.That(top[4], Is.Zero);
        Assert.That(top[5], Is.GreaterThan(top[0]), "Gumbel-top-1 picks in proportion to q");
    }

    [Test]
    public void CommandWritesTheJsonTableAndThePlot()
    {
        var dir = Directory.CreateTempSubdirectory("eplb-sim-");
        try
        {
            var json = Path.Combine(dir.FullName, "sim.json");
            var plot = Path.Combine(dir.FullName, "sim.png");
            var result = CliRunner.Run("simulate", "--steps", "12", "--tokens", "64", "--interval", "8", "--window", "4", "--json", json, "--plot", plot,
                "--backend", "cpu");
            Assert.That(result.ExitCode, Is.Zero, result.Stderr);
            Assert.That(result.Stdout, Does.Contain("no EPLB").And.Contain("deepseek").And.Contain("locality").And.Contain("incremental")
                .And.Contain("backend cpu"));
            using var document = JsonDocument.Parse(File.ReadAllText(json));
            var root = document.RootElement;
            Assert.That(root.GetProperty("backend").GetString(), Is.EqualTo("cpu"));
            Assert.That(root.GetProperty("steps").GetInt32(), Is.EqualTo(12));
            Assert.That(root.GetProperty("seconds_per_step").GetDouble(), Is.GreaterThan(0));
            Assert.That(root.GetProperty("no_eplb").GetProperty("balancedness").GetDouble(), Is.InRange(0.0, 1.0));
            foreach (var name in new[] { "deepseek", "locality", "incremental" })
            {
                var policy = root.GetProperty("policies").GetProperty(name);
                foreach (var key in new[] { "balancedness", "node_local_fraction", "rearrangements", "slots_moved", "bytes_moved" })
                    Assert.That(policy.TryGetProperty(key, out _), Is.True, $"{name}.{key}");
            }
            var png = File.ReadAllBytes(plot);
            Assert.That(png.Take(4), Is.EqualTo(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }));
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [TestCase("--steps", "0", "--steps must be >= 1 (got 0)")]
    [TestCase("--gpus", "7", "multiple of ranks (G = 7)")]
    [TestCase("--policy", "greedy", "unknown placement policy 'greedy'")]
    [TestCase("--backend", "tpu", "unknown backend 'tpu'")]
    [TestCase("--load", "/no/such.json", "does not exist")]
    [TestCase("--routing", "topk", "topk")]
    public void BadArgumentsAreOneLineAndExitTwo(string option, string value, string expected)
    {
        var dir = Directory.CreateTempSubdirectory("eplb-sim-");
        try
        {
            var json = Path.Combine(dir.FullName, "sim.json");
            var args = new List<string> { "simulate", option, value, "--json", json };
            if (option != "--steps") args.AddRange(["--steps", "4"]);
            args.AddRange(["--tokens", "64"]);
            var result = CliRunner.Run([.. args]);
            Assert.That(result.ExitCode, Is.EqualTo(2), result.Stdout + result.Stderr);
            Assert.That(result.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1));
            Assert.That(result.Stderr, Does.StartWith("eplb: ").And.Contain(expected));
            Assert.That(File.Exists(json), Is.False, "nothing is written on error");
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Test, Category("GPU")]
    public void CudaRunGivesTheCpuNumbers()
    {
        TestSupport.RequireCuda();
        var cpu = new ServingSimulation(Small() with { UseAsync = false }).Run();
        var cuda = new ServingSimulation(Small(Backend.Cuda) with { UseAsync = false }).Run();
        for (var i = 0; i < cpu.Runs.Count; i++)
        {
            Assert.That(cuda.Runs[i].Balancedness, Is.EqualTo(cpu.Runs[i].Balancedness), cpu.Runs[i].Name);
            Assert.That(cuda.Runs[i].SlotsMoved, Is.EqualTo(cpu.Runs[i].SlotsMoved), cpu.Runs[i].Name);
            Assert.That(cuda.Runs[i].NodeLocalFraction, Is.EqualTo(cpu.Runs[i].NodeLocalFraction), cpu.Runs[i].Name);
        }
    }
}
