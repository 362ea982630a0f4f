using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The serving simulation (issue 15): its runs, baselines, locality, time model and determinism.</summary>
public class SimulationTests
{
    /// <summary>8 MoE layers of two real dumps (decode, then prefill) on 8 GPUs in 2 nodes: small enough for a test, same pipeline.</summary>
    internal static SimulationOptions Small(int seed, Backend backend = Backend.Cpu)
    {
        var layers = Enumerable.Range(0, 8).Select(l => l * 7).ToArray();
        return new SimulationOptions
        {
            Phases =
            [
                new SimulationPhase("decode_in1000out1000", TestSupport.RealLoad("decode_in1000out1000").Select(layers), PhaseKind.Decode, 60),
                new SimulationPhase("prefill_in4096", TestSupport.RealLoad("prefill_in4096").Select(layers), PhaseKind.Prefill, 2, 4096),
            ],
            Ranks = 8,
            Nodes = 2,
            Slots = 288,
            DecodeTokens = 64,
            PrefillTokens = 512,
            WindowSize = 8,
            StepInterval = 30,
            Backend = backend,
            Seed = seed,
        };
    }

    private static int FreshSeed() => TestSupport.NewRandom().Next();

    [Test]
    public void EveryPolicyBeatsStaticInTheSteadyState()
    {
        // 34 decode + 2 prefill passes: one rearrangement (passes 7-14; the next would start at pass 36),
        // then steady passes without migration traffic
        // (on a model of 8 layers one layer's moves cost as much as several passes, so a window holding
        // a second rearrangement measures mostly the migration; docs/benchmarks.md shows it at full size).
        var options = Small(FreshSeed());
        options = options with { Phases = [options.Phases[0] with { Passes = 34 }, options.Phases[1]] };
        var result = new ServingSimulation(options).Run();
        Assert.That(result.Runs.Select(r => r.Name), Is.EqualTo(new[] { "no EPLB", "static", "deepseek", "locality", "incremental", "locality+local" }));
        Assert.That(result.SteadyFromPass, Is.InRange(9, 15), "every policy commits its (up to 8) changed layers from pass 7 on, one a pass");
        var (noEplb, fixedLayout) = (result.Runs[0], result.Runs[1]);
        Assert.That(noEplb.Slots, Is.EqualTo(256), "no EPLB: one slot per expert");
        Assert.That(fixedLayout.Slots, Is.EqualTo(288));
        foreach (var baseline in new[] { noEplb, fixedLayout })
        {
            Assert.That(baseline.Rearrangements, Is.Empty, baseline.Name);
            Assert.That(baseline.SlotsMoved, Is.Zero, baseline.Name);
            Assert.That(baseline.StallSeconds, Is.Zero, baseline.Name);
        }
        Assert.That(noEplb.GainVsNoEplb.Whole, Is.Zero);
        foreach (var run in result.Runs.Skip(2))
        {
            Assert.That(run.Balancedness.Steady, Is.GreaterThan(fixedLayout.Balancedness.Steady!.Value + 0.05), run.Name);
            Assert.That(run.TokensPerSecond.Steady, Is.GreaterThan(fixedLayout.TokensPerSecond.Steady!.Value), run.Name);
            Assert.That(run.GainVsNoEplb.Steady, Is.EqualTo(run.TokensPerSecond.Steady!.Value / noEplb.TokensPerSecond.Steady!.Value - 1).Within(1e-12));
            Assert.That(run.RearrangementsCompleted, Is.EqualTo(1), run.Name);
            Assert.That(run.RearrangementsFailed, Is.Zero, run.Name);
            Assert.That(run.SlotsMoved, Is.GreaterThan(0), run.Name);
            Assert.That(run.BytesMovedPerGpu, Is.GreaterThan(0), run.Name);
            Assert.That(run.StallSeconds, Is.GreaterThan(0), run.Name);
            // Async: one layer a pass, so a rearrangement spans at most as many passes as layers.
            Assert.That(run.Rearrangements.All(r => r.LastPass - r.FirstPass < 8 && r.Layers <= 8), run.Name);
        }
        // Every (token, k) of every rank lands somewhere: per pass G x T x L x K pairs.
        Assert.That(noEplb.TokensPerPass.Take(34), Is.All.EqualTo(8L * 64));
        Assert.That(noEplb.TokensPerPass.Skip(34), Is.All.EqualTo(8L * 512));
        Assert.That(result.Runs.SelectMany(r => r.BalancednessPerPass), Is.All.InRange(0.0, 1.0));
    }

    [Test]
    public void RedundancyAloneHelpsAndIsNotCountedAsEplb()
    {
        // Static keeps the initial layout (slot s holds expert s mod N): the 32 extra slots duplicate
        // experts 0-31 without ever moving; it is its own row so the policies' gain is not confounded with it.
        var result = new ServingSimulation(Small(FreshSeed()) with { Policies = ["deepseek"], NodeLocalPolicies = [] }).Run();
        var (noEplb, fixedLayout) = (result.Runs[0], result.Runs[1]);
        Assert.That(fixedLayout.Balancedness.Whole, Is.Not.EqualTo(noEplb.Balancedness.Whole));
        Assert.That(fixedLayout.RearrangementsCompleted, Is.Zero);
        Assert.That(result.Runs[2].Balancedness.Steady, Is.GreaterThan(fixedLayout.Balancedness.Steady!.Value));
    }

    [Test]
    public void NodeLocalSelectionCutsCrossNodeTraffic()
    {
        var result = new ServingSimulation(Small(FreshSeed()) with { Policies = ["locality"], NodeLocalPolicies = ["locality"] }).Run();
        var (hashed, local) = (result.Runs[2], result.Runs[3]);
        Assert.That(local.Name, Is.EqualTo("locality+local"));
        Assert.That(local.CrossNodeFraction.Steady, Is.LessThan(hashed.CrossNodeFraction.Steady!.Value - 0.01));
        Assert.That(local.RemoteNodesPerToken.Steady, Is.LessThan(hashed.RemoteNodesPerToken.Steady!.Value));
        // Without EPLB every expert has one slot: nothing to choose, the same traffic as static's layout for non-duplicated experts.
        Assert.That(result.Runs[0].CrossNodeFraction.Whole, Is.InRange(0.3, 0.7), "2 nodes: about half of the pairs leave the node");
    }

    [Test]
    public void TheSameSeedGivesTheSameFiguresAsyncIncluded()
    {
        var seed = FreshSeed();
        var options = Small(seed) with { Policies = ["deepseek", "incremental"], NodeLocalPolicies = ["incremental"] };
        var a = new ServingSimulation(options).Run();
        var b = new ServingSimulation(options with { MaxParallelRuns = 1 }).Run();
        for (var i = 0; i < a.Runs.Count; i++)
        {
            Assert.That(b.Runs[i].StepSeconds, Is.EqualTo(a.Runs[i].StepSeconds), a.Runs[i].Name);
            Assert.That(b.Runs[i].BalancednessPerPass, Is.EqualTo(a.Runs[i].BalancednessPerPass), a.Runs[i].Name);
            Assert.That(b.Runs[i].Rearrangements, Is.EqualTo(a.Runs[i].Rearrangements), a.Runs[i].Name);
        }
        var other = new ServingSimulation(options with { Seed = seed + 1 }).Run();
        Assert.That(other.Runs[0].StepSeconds, Is.Not.EqualTo(a.Runs[0].StepSeconds), "another seed draws other traffic");
    }

    [Test]
    public void TheHashRoutingKernelGivesTheMappingOpsFigures()
    {
        // Both run the same epilogue (common/replica.hpp) on the same drawn ids: same slots, same load.
        var options = Small(FreshSeed()) with { Policies = ["incremental"], NodeLocalPolicies = ["incremental"] };
        options = options with { Phases = [options.Phases[0] with { Passes = 24 }, options.Phases[1]] };
        var mapping = new ServingSimulation(options).Run();
        var hash = new ServingSimulation(options with { Kernel = SimulationKernel.Hash }).Run();
        for (var i = 0; i < mapping.Runs.Count; i++)
        {
            Assert.That(hash.Runs[i].StepSeconds, Is.EqualTo(mapping.Runs[i].StepSeconds), mapping.Runs[i].Name);
            Assert.That(hash.Runs[i].CrossNodeFraction, Is.EqualTo(mapping.Runs[i].CrossNodeFraction), mapping.Runs[i].Name);
        }
    }

    [Test]
    public void SyncRearrangementsStallOnePassAsyncOnesSpreadTheirTraffic()
    {
        var options = Small(FreshSeed()) with { Policies = ["deepseek"], NodeLocalPolicies = [] };
        var sync = new ServingSimulation(options with { UseAsync = false }).Run().Runs[2];
        var async = new ServingSimulation(options).Run().Runs[2];
        Assert.That(sync.Rearrangements, Is.Not.Empty);
        Assert.That(sync.Rearrangements.All(r => r.FirstPass == r.LastPass), "sync commits every layer inside one step");
        foreach (var rearrangement in sync.Rearrangements.Where(r => r.Completed))
        {
            // The stall is the busiest rank's receive time: at least the mean rank's bytes over both links at once.
            var cost = CostModel.DeepSeekV3OnH200;
            Assert.That(rearrangement.Seconds,
                Is.GreaterThanOrEqualTo(rearrangement.BytesReceived / 8 / (cost.NvlinkBytesPerSecond + cost.NetworkBytesPerSecond) * 0.999));
            Assert.That(sync.StepSeconds[rearrangement.FirstPass], Is.GreaterThan(rearrangement.Seconds));
        }
        Assert.That(sync.StallSeconds, Is.GreaterThan(0));
        Assert.That(async.Rearrangements.Where(r => r.Completed).All(r => r.LastPass > r.FirstPass), "async commits a layer per pass");
        // Spread over passes, async adds less to any one step than a sync stall.
        Assert.That(async.StepMs.P99, Is.LessThan(sync.StepMs.P99 + 1e-9));
    }

    [Test]
    public void ARearrangementRunningAtTheEndIsLeftOutOfTheTotals()
    {
        // 10 decode passes: the first rearrangement (pass 6) commits its 8 layers on passes 7-14, so it is cut off.
        var options = Small(FreshSeed()) with { Policies = ["deepseek"], NodeLocalPolicies = [] };
        options = options with { Phases = [options.Phases[0] with { Passes = 10 }] };
        var run = new ServingSimulation(options).Run().Runs[2];
        var unfinished = run.Rearrangements.Single();
        Assert.That(unfinished.Completed, Is.False);
        Assert.That(unfinished.Layers, Is.InRange(1, 7));
        Assert.That(run.RearrangementsCompleted, Is.Zero);
        Assert.That(run.SlotsMoved, Is.Zero);
        Assert.That(run.BytesMovedPerGpu, Is.Zero);
        Assert.That(run.StallSeconds, Is.Zero);
    }

    [Test]
    public void RanksThatDoNotSplitTheExpertsGetANamedSubstitute()
    {
        var options = Small(FreshSeed()) with { Ranks = 24, Nodes = 2, Slots = 288, Policies = ["deepseek"], NodeLocalPolicies = [] };
        Assert.That(options.NoEplbSlots, Is.EqualTo(264), "the smallest multiple of 24 above 256");
        var result = new ServingSimulation(options).Run();
        Assert.That(result.Runs[0].Slots, Is.EqualTo(264));
        var table = SimulationTable.Format(options, result, 1);
        Assert.That(table, Does.Contain("does not split over 24 GPUs"));
    }

    [Test]
    public void BadOptionsAreRejectedBeforeRunning()
    {
        var options = Small(1);
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { Ranks = 7 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { Nodes = 3 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { Policies = ["greedy"] }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { Phases = [] }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { Affinity = 1.5 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { TopKGroups = 9 }).Run());
        Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { NodeLocalPolicies = ["incremental"], Policies = ["deepseek"] }).Run());
        var shortInterval = Assert.Throws<ArgumentException>(() => new ServingSimulation(options with { StepInterval = 9 }).Run());
        Assert.That(shortInterval!.Message, Does.Contain("layers + 2 = 10"));
        Assert.DoesNotThrow(() => (options with { StepInterval = 9, UseAsync = false }).Validate(), "sync has no such limit");
    }

    [Test]
    public void MemoryEstimateFollowsTheArguments()
    {
        var options = Small(1);
        var small = options.EstimateMemoryBytes();
        Assert.That(small, Is.GreaterThan(1e6));
        Assert.That((options with { WindowSize = 800 }).EstimateMemoryBytes(), Is.GreaterThan(small * 10));
        Assert.That((options with { PrefillTokens = 512 * 100 }).EstimateMemoryBytes(), Is.GreaterThan(small * 10));
        Assert.That((options with { Ranks = 8000, Slots = 8000 }).EstimateMemoryBytes(), Is.GreaterThan(small * 100));
    }

    [Test, Category("GPU")]
    public void CudaRunGivesTheCpuFigures()
    {
        TestSupport.RequireCuda();
        var options = Small(FreshSeed()) with { Policies = ["locality"] };
        var cpu = new ServingSimulation(options).Run();
        var cuda = new ServingSimulation(options with { Backend = Backend.Cuda }).Run();
        for (var i = 0; i < cpu.Runs.Count; i++)
        {
            Assert.That(cuda.Runs[i].StepSeconds, Is.EqualTo(cpu.Runs[i].StepSeconds), cpu.Runs[i].Name);
            Assert.That(cuda.Runs[i].Rearrangements, Is.EqualTo(cpu.Runs[i].Rearrangements), cpu.Runs[i].Name);
            Assert.That(cuda.Runs[i].CrossNodeFraction, Is.EqualTo(cpu.Runs[i].CrossNodeFraction), cpu.Runs[i].Name);
        }
    }
}
