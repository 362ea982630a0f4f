using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The traffic the simulator draws (issue 15 §1), against the recorded loads and against the one
/// published per-iteration figure: TensorRT-LLM's "Scaling Expert Parallelism" blog, part 1, Table 1
/// (DeepSeek-R1, EP32 on 32 GB200, machine-translation set, no EPLB, 8 slots per rank, 128 pairs per
/// slot per iteration): hottest rank 1 + 1.564 = 2.56x the mean, hottest slot 1 + 10.948 = 11.9x the
/// mean, averaged over layers and iterations. docs/benchmarks.md discusses the gap in the slot figure.
/// </summary>
public class SimulationCalibrationTests
{
    private const int Ranks = 32, Tokens = 128, TopK = 8;

    private static SimulationOptions Options(ExpertLoad load, PhaseKind kind, double affinity, int seed, double requestPasses = 1000) => new()
    {
        Phases = [new SimulationPhase("load", load, kind, 1000, 4096)],
        Ranks = Ranks,
        DecodeTokens = Tokens,
        PrefillTokens = 1024,
        Affinity = affinity,
        RequestPasses = requestPasses,
        Seed = seed,
    };

    // Per pass and layer: counts per expert over all ranks.
    private static IEnumerable<double[]> Counts(SimulationOptions options, int passes)
    {
        var phase = options.Phases[0];
        var traffic = new RequestTraffic(options);
        traffic.StartPhase(phase, 0);
        var tokens = traffic.TokensPerRank(phase);
        var layers = phase.Load.Layers;
        var ids = new int[Ranks * layers * tokens * TopK];
        for (var pass = 0; pass < passes; pass++)
        {
            traffic.Fill(pass, ids);
            for (var l = 0; l < layers; l++)
            {
                var counts = new double[phase.Load.LogicalExperts];
                for (var r = 0; r < Ranks; r++)
                {
                    var row = ids.AsSpan((r * layers + l) * tokens * TopK, tokens * TopK);
                    for (var t = 0; t < tokens; t++)
                    {
                        var token = row.Slice(t * TopK, TopK);
                        foreach (var e in token) counts[e]++;
                        Assert.That(token.ToArray().Distinct().Count(), Is.EqualTo(TopK), "K distinct experts");
                        Assert.That(token.ToArray().Select(e => e / 32).Distinct().Count(), Is.LessThanOrEqualTo(4), "at most 4 of 8 groups");
                    }
                }
                yield return counts;
            }
        }
    }

    private static (double Slot, double Rank) MeanHottest(IEnumerable<double[]> counts)
    {
        double slot = 0, rank = 0;
        var n = 0;
        foreach (var c in counts)
        {
            var mean = c.Average();
            slot += c.Max() / mean;
            var ranks = Enumerable.Range(0, Ranks).Select(g => c.Skip(g * 8).Take(8).Sum()).ToArray();
            rank += ranks.Max() / ranks.Average();
            n++;
        }
        return (slot / n, rank / n);
    }

    private static ExpertLoad Layers(string name, int count) =>
        TestSupport.RealLoad(name).Select(Enumerable.Range(0, count).Select(l => l * 58 / count).ToArray());

    [Test]
    public void TheDrawsReproduceTheRecordedLoad()
    {
        var load = Layers("decode_in1000out1000", 12);
        var options = Options(load, PhaseKind.Decode, affinity: 0.5, seed: TestSupport.NewRandom().Next(), requestPasses: 4);
        var totals = new double[load.Layers][];
        var index = 0;
        foreach (var counts in Counts(options, 24))
        {
            var l = index++ % load.Layers;
            totals[l] ??= new double[counts.Length];
            for (var e = 0; e < counts.Length; e++) totals[l][e] += counts[e];
        }
        for (var l = 0; l < load.Layers; l++)
        {
            var p = load.Layer(l).ToArray();
            var q = totals[l];
            // 24 passes x 4096 tokens x 8 = 786K picks a layer: an expert at the mean gets ~3K, 2% error.
            // Distinct picks flatten the hottest experts and the group limit lifts popular groups by a few
            // percent more, so the hottest expert's share is held to 12% and the shape to r >= 0.98.
            Assert.That(q.Max() / q.Average(), Is.EqualTo(p.Max() / p.Average()).Within(12).Percent, $"layer {l}: hottest expert / mean");
            Assert.That(Correlation(p, q), Is.GreaterThan(0.98), $"layer {l}");
        }
    }

    [Test]
    public void PerPassSpreadAtTensorRtLlmsShape()
    {
        var load = Layers("decode_in1000out1000", 29);
        var (slot, rank) = MeanHottest(Counts(Options(load, PhaseKind.Decode, 0.5, TestSupport.NewRandom().Next()), 4));
        var runLongSlot = Enumerable.Range(0, load.Layers).Average(l => load.Layer(l).ToArray().Max() / load.Layer(l).ToArray().Average());
        TestContext.Out.WriteLine($"per pass: hottest slot {slot:F2}x, hottest rank {rank:F2}x the mean; run-long hottest slot {runLongSlot:F2}x");
        // The rank figure is what sets step time: within 25% of TensorRT-LLM's 2.56 (another dataset and
        // model snapshot; the SGLang dumps' own run-long rank figure is 2.9 over all layers).
        Assert.That(rank, Is.InRange(2.56 * 0.85, 2.56 * 1.25));
        // 128 pairs a slot add sampling noise on top of the run-long skew, never less than ~95% of it
        // (distinct picks flatten the hottest expert); TensorRT-LLM's 11.9x comes from a far more
        // skewed workload than these dumps, whose run-long hottest expert is 5-8x.
        Assert.That(slot, Is.GreaterThan(runLongSlot * 0.95).And.LessThan(11.9));
    }

    [Test]
    public void AffinityShapesPrefillButNotTheDecodeSpread()
    {
        var seed = TestSupport.NewRandom().Next();
        var decode = Layers("decode_in1000out1000", 16);
        var independent = MeanHottest(Counts(Options(decode, PhaseKind.Decode, 0, seed), 4));
        var sticky = MeanHottest(Counts(Options(decode, PhaseKind.Decode, 0.9, seed), 4));
        // A decode pass holds one token of each request: the tokens are independent draws of the same
        // marginal whatever the affinity, so the per-pass spread cannot move (64 layer-passes; the mean
        // hottest-slot ratio has a standard error near 1.5% here, the tolerance is 3 of them).
        Assert.That(sticky.Slot, Is.EqualTo(independent.Slot).Within(5).Percent);
        Assert.That(sticky.Rank, Is.EqualTo(independent.Rank).Within(5).Percent);
        // Prefill: each request's 1024-token chunk shares its own experts, so high affinity concentrates a pass.
        var prefill = Layers("prefill_in4096", 16);
        var prefillIndependent = MeanHottest(Counts(Options(prefill, PhaseKind.Prefill, 0, seed), 2));
        var prefillSticky = MeanHottest(Counts(Options(prefill, PhaseKind.Prefill, 0.9, seed), 2));
        Assert.That(prefillSticky.Slot, Is.GreaterThan(prefillIndependent.Slot * 1.15));
    }

    [Test]
    public void RequestsLiveTheirSampledPasses()
    {
        var load = Layers("decode_in1000out1000", 2);
        var options = Options(load, PhaseKind.Decode, 0.5, TestSupport.NewRandom().Next(), requestPasses: 20);
        var traffic = new RequestTraffic(options);
        traffic.StartPhase(options.Phases[0], 0);
        var ids = new int[Ranks * load.Layers * Tokens * TopK];
        for (var pass = 0; pass < 40; pass++) traffic.Fill(pass, ids);
        // 4096 requests, each ending with probability 1/20 a pass: 8192 replacements in 40 passes, sd ~90.
        var replaced = traffic.RequestsStarted - Ranks * Tokens;
        Assert.That(replaced, Is.EqualTo(8192).Within(6).Percent);
    }

    [Test]
    public void TheCostModelPricesWhatItIsGiven()
    {
        var cost = CostModel.DeepSeekV3OnH200;
        Assert.That(cost.ExpertBytes, Is.EqualTo(44_050_944), "3 x 7168 x 2048 FP8 + 56 x 16 FP32 block scales each");
        // Few tokens: reading 9 experts' weights dominates; many tokens: their FLOPs.
        Assert.That(cost.ExpertSeconds(9, 10), Is.EqualTo(9 * 44_050_944 / 4.3e12).Within(1e-15));
        Assert.That(cost.ExpertSeconds(1, 100_000), Is.EqualTo(100_000 * 2.0 * 3 * 7168 * 2048 / 1.58e15).Within(1e-12));
        // Links are full duplex and in parallel: the larger direction on the slower link decides.
        var pair = 7168 + 56 * 4 + 7168 * 2;
        Assert.That(cost.CommunicationSeconds(100, 300, 50, 10), Is.EqualTo(Math.Max(300.0 * pair / 150e9, 50.0 * pair / 45e9)).Within(1e-15));
        Assert.That(cost.TransferSeconds(150e9, 45e9), Is.EqualTo(1.0).Within(1e-12));
        var faster = cost.With("network_bytes_per_second", 90e9);
        Assert.That(faster.NetworkBytesPerSecond, Is.EqualTo(90e9));
        Assert.That(cost.NetworkBytesPerSecond, Is.EqualTo(45e9), "With returns a copy");
        Assert.That(CostModel.Names, Does.Contain("hbm_bytes_per_second").And.Contain("decode_context_tokens"));
        Assert.That(cost.Values().Keys, Is.EquivalentTo(CostModel.Names));
        Assert.Throws<ArgumentException>(() => cost.With("warp_speed", 1));
        Assert.Throws<ArgumentException>(() => cost.With("hbm_bytes_per_second", 0));
        Assert.Throws<ArgumentException>(() => cost.With("hbm_bytes_per_second", double.NaN));
    }

    private static double Correlation(double[] a, double[] b)
    {
        double ma = a.Average(), mb = b.Average(), sab = 0, saa = 0, sbb = 0;
        for (var i = 0; i < a.Length; i++)
        {
            sab += (a[i] - ma) * (b[i] - mb);
            saa += (a[i] - ma) * (a[i] - ma);
            sbb += (b[i] - mb) * (b[i] - mb);
        }
        return sab / Math.Sqrt(saa * sbb);
    }
}
