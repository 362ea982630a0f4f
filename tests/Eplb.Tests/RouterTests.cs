using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The routing kernels (docs/design.md §4) through the managed <see cref="Router"/>.</summary>
public class RouterTests
{
    private const int PoisonId = unchecked((int)0xDEADBEEF);

    /// <param name="PendingDeviceError">With the launch check off: whether the stream held a device error afterwards.</param>
    private sealed record Outcome(int[] Ids, float[] Weights, int[] Counters, bool PendingDeviceError = false);

    /// <summary>Routes on a backend through DeviceBuffers, outputs poisoned (ids 0xDEADBEEF, weights NaN).</summary>
    private static Outcome Run(Backend backend, RouterOptions options, float[] logits, float[]? bias = null, HostTables? tables = null,
        int? numUnpadded = null, bool record = true, long[]? tokenIds = null, int[]? tid2eid = null, bool checkDeviceErrors = true)
    {
        using var stream = new ComputeStream(backend);
        var outputs = logits.Length / options.LogicalExperts * options.TopK;
        using var logitBuffer = new DeviceBuffer<float>(backend, logits);
        using var ids = new DeviceBuffer<int>(backend, outputs);
        using var weights = new DeviceBuffer<float>(backend, outputs);
        ids.Fill(PoisonId);
        weights.Fill(float.NaN);
        using var biasBuffer = bias is null ? null : new DeviceBuffer<float>(backend, bias);
        using var unpadded = new DeviceBuffer<int>(backend, [numUnpadded ?? 0]);
        using var log2phy = tables is null ? null : new DeviceBuffer<int>(backend, tables.Log2Phy);
        using var logcnt = tables is null ? null : new DeviceBuffer<int>(backend, tables.LogCnt);
        using var counters = tables is null ? null : new DeviceBuffer<int>(backend, new int[tables.Slots]);
        using var flag = new DeviceBuffer<int>(backend, [record ? 1 : 0]);
        using var tokens = tokenIds is null ? null : new DeviceBuffer<long>(backend, tokenIds);
        using var table = tid2eid is null ? null : new DeviceBuffer<int>(backend, tid2eid);
        var layer = tables is null
            ? null
            : new EplbLayerState(log2phy!, logcnt!, counters!, flag, tables.LogicalExperts, tables.MaxReplicas, tables.Slots);
        var router = new Router(options, layer) { CheckDeviceErrors = checkDeviceErrors };
        var unpaddedSlice = numUnpadded.HasValue ? unpadded.AsSlice() : default;
        if (tokens is null)
            router.Route(stream, logitBuffer, ids, weights, biasBuffer is null ? default : biasBuffer.AsSlice(), unpaddedSlice);
        else
            router.RouteByHash(stream, logitBuffer, tokens, table!, ids, weights, unpaddedSlice);
        stream.Synchronize();
        var pending = false;
        if (!checkDeviceErrors)
        {
            try
            {
                stream.CheckDeviceErrors();
            }
            catch (EplbException e) when (e.Status == EplbStatus.DeviceInputError)
            {
                pending = true;
            }
        }
        return new Outcome(ids.ToArray(stream), weights.ToArray(stream), counters?.ToArray(stream) ?? [], pending);
    }

    private static float[] RandomLogits(Random random, int count, double spread) =>
        Enumerable.Range(0, count).Select(_ => (float)(spread * (random.NextDouble() * 2 - 1) * Math.Sqrt(3))).ToArray();

    // logits = log((load + 1) / total) + Gumbel noise: the top-k by logit is a draw without replacement
    // proportional to the expert's recorded load (the Gumbel-top-k trick).
    private static float[] RealLoadLogits(Random random, ReadOnlySpan<double> load, int tokens)
    {
        var total = 0.0;
        foreach (var v in load) total += v + 1;
        var logits = new float[tokens * load.Length];
        for (var t = 0; t < tokens; t++)
            for (var e = 0; e < load.Length; e++)
                logits[t * load.Length + e] = (float)(Math.Log((load[e] + 1) / total) - Math.Log(-Math.Log(1 - random.NextDouble())));
        return logits;
    }

    [Test]
    public void SigmoidBiasSelectsButTheUnbiasedScoresWeigh()
    {
        // s = sigmoid([0, 1, -1, 2]) = [0.5, 0.7310586, 0.2689414, 0.8807971]; s + [0, 0, 1, 0] picks experts
        // 2 and 3; weights 2.5 * s / (s2 + s3) = 0.5847882, 1.9152118.
        var router = new Router(new RouterOptions { LogicalExperts = 4, TopK = 2, Score = RoutingScore.Sigmoid, RoutedScalingFactor = 2.5f });
        var ids = new int[2];
        var weights = new float[2];
        router.Route([0f, 1f, -1f, 2f], ids, weights, bias: [0f, 0f, 1f, 0f]);
        Assert.That(ids, Is.EqualTo(new[] { 2, 3 }));
        Assert.That(weights[0], Is.EqualTo(0.5847882399400745).Within(1e-6));
        Assert.That(weights[1], Is.EqualTo(1.9152117600599254).Within(1e-6));
    }

    [Test]
    public void SoftmaxWeighsOverTheRowOrOverTheTopK()
    {
        // softmax([1, 2, 3, 0]) at experts 2, 1: 20.08554 / 31.19287 = 0.6439143, 7.389056 / 31.19287 =
        // 0.2368828; over the top-2 only: 0.7310586, 0.2689414.
        float[] logits = [1f, 2f, 3f, 0f];
        var ids = new int[2];
        var weights = new float[2];
        new Router(new RouterOptions { LogicalExperts = 4, TopK = 2, Score = RoutingScore.Softmax, Renormalize = false }).Route(logits, ids, weights);
        Assert.That(ids, Is.EqualTo(new[] { 2, 1 }));
        Assert.That(weights, Is.EqualTo(new[] { 0.6439142598879724f, 0.23688281808991013f }).Within(1e-6));
        new Router(new RouterOptions { LogicalExperts = 4, TopK = 2, Score = RoutingScore.Softmax }).Route(logits, ids, weights);
        Assert.That(weights, Is.EqualTo(new[] { 0.7310585786300049f, 0.2689414213699951f }).Within(1e-6));
    }

    [Test]
    public void GroupLimitedSelectionKeepsTheBestGroups()
    {
        // 4 groups of 2, keep 2: group scores (sum of the two s) [1.0, 1.462, 1.245, 0.899] keep groups 1
        // and 2, so the top-2 is experts 2 and 3 (tied: lower id first), not 0 and 6.
        float[] logits = [3f, -3f, 1f, 1f, 0.5f, 0.5f, 2f, -4f];
        var ids = new int[2];
        var weights = new float[2];
        new Router(new RouterOptions { LogicalExperts = 8, TopK = 2, Score = RoutingScore.Sigmoid, Groups = 4, TopKGroups = 2 })
            .Route(logits, ids, weights);
        Assert.That(ids, Is.EqualTo(new[] { 2, 3 }));
        Assert.That(weights, Is.EqualTo(new[] { 0.5f, 0.5f }));
    }

    [Test]
    public void DeepSeekV3OnRealLoadsRoutesWithinFourGroupsAndWeighsTwoAndAHalf()
    {
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad("decode_in1000out1000");
        var options = RouterOptions.DeepSeekV3;
        const int tokens = 2048;
        var logits = RealLoadLogits(random, load.Layer(20), tokens);
        var bias = RandomLogits(random, 256, 0.05);
        var ids = new int[tokens * 8];
        var weights = new float[tokens * 8];
        new Router(options).Route(logits, ids, weights, bias);
        for (var t = 0; t < tokens; t++)
        {
            var row = ids.AsSpan(t * 8, 8).ToArray();
            Assert.That(row.Distinct().Count(), Is.EqualTo(8), $"row {t}: distinct experts");
            Assert.That(row.Select(e => e / 32).Distinct().Count(), Is.LessThanOrEqualTo(4), $"row {t}: at most 4 of 8 groups");
            Assert.That(weights.AsSpan(t * 8, 8).ToArray().Sum(), Is.EqualTo(2.5).Within(1e-5), $"row {t}: weights sum to the scaling factor");
        }
    }

    [Test]
    public void RealLoadRowsSelectTheLargestScoresWithoutBias()
    {
        // sqrtsoftplus is increasing, so with no bias the top-k by score is the top-k by logit (where no
        // two logits are within float rounding of each other) - and it follows the real popularity.
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad("prefill_in4096");
        var layer = load.Layer(40).ToArray();
        const int tokens = 1024;
        var logits = RealLoadLogits(random, layer, tokens);
        var ids = new int[tokens * 6];
        var weights = new float[tokens * 6];
        new Router(new RouterOptions { LogicalExperts = 256, TopK = 6, RoutedScalingFactor = 1.5f }).Route(logits, ids, weights);
        var compared = 0;
        for (var t = 0; t < tokens; t++)
        {
            var row = logits.AsSpan(t * 256, 256).ToArray();
            var order = Enumerable.Range(0, 256).OrderByDescending(e => row[e]).ToArray();
            if (Enumerable.Range(0, 6).Any(r => row[order[r]] - row[order[r + 1]] < 1e-4 * Math.Abs(row[order[r]]) + 1e-6)) continue;
            compared++;
            Assert.That(ids.AsSpan(t * 6, 6).ToArray(), Is.EqualTo(order.Take(6).ToArray()), $"row {t}");
            var scores = order.Take(6).Select(e => Math.Sqrt(Math.Max(row[e], 0) + Math.Log(1 + Math.Exp(-Math.Abs(row[e]))))).ToArray();
            for (var r = 0; r < 6; r++)
                Assert.That(weights[t * 6 + r], Is.EqualTo(1.5 * scores[r] / scores.Sum()).Within(1e-5), $"row {t} slot {r}");
        }
        Assert.That(compared, Is.GreaterThan(tokens * 9 / 10));
        // The hottest quarter of the experts receives far more tokens than the coldest quarter.
        var routed = new double[256];
        foreach (var e in ids) routed[e]++;
        var byLoad = Enumerable.Range(0, 256).OrderByDescending(e => layer[e]).ToArray();
        Assert.That(byLoad.Take(64).Sum(e => routed[e]), Is.GreaterThan(4 * byLoad.Skip(192).Sum(e => routed[e])));
    }

    [Test]
    public void HashRoutingCountsRepeatedExpertsPerOccurrence()
    {
        // tid2eid[7] = [3, 3, 1]: weights sqrtsoftplus(0.5) x2 and sqrtsoftplus(-1), renormalised, x 1.5 =
        // 0.5843177, 0.5843177, 0.3313646. Expert 3 (slots 3 and 4) is counted twice, on replica 0.
        var tables = HostTables.FromPhy2Log([0, 1, 2, 3, 3], 4);
        var tid2eid = new int[30];
        tid2eid[21] = 3;
        tid2eid[22] = 3;
        tid2eid[23] = 1;
        var options = new RouterOptions { LogicalExperts = 4, TopK = 3, RoutedScalingFactor = 1.5f };
        var outcome = Run(Backend.Cpu, options, [9f, -1f, 9f, 0.5f], tables: tables, tokenIds: [7], tid2eid: tid2eid);
        Assert.That(outcome.Ids, Is.EqualTo(new[] { 3, 3, 1 }));
        Assert.That(outcome.Weights, Is.EqualTo(new[] { 0.5843177201414265f, 0.5843177201414265f, 0.33136455971714707f }).Within(1e-6));
        Assert.That(outcome.Counters, Is.EqualTo(new[] { 0, 1, 0, 2, 0 }));
    }

    [Test]
    public void NanAndInfiniteLogitsNeverGiveNanWeightsOrBadIds()
    {
        var random = TestSupport.NewRandom();
        foreach (var score in new[] { RoutingScore.Sigmoid, RoutingScore.SqrtSoftplus, RoutingScore.Softmax })
        {
            const int n = 96, k = 8, tokens = 64;
            var logits = RandomLogits(random, n * tokens, 4);
            for (var i = 0; i < logits.Length / 3; i++)
                logits[random.Next(logits.Length)] = (i % 4) switch { 0 => float.PositiveInfinity, 1 => float.NegativeInfinity, _ => float.NaN };
            for (var e = 0; e < n; e++) logits[e] = float.NaN;  // row 0: all NaN
            var ids = new int[tokens * k];
            var weights = new float[tokens * k];
            new Router(new RouterOptions { LogicalExperts = n, TopK = k, Score = score, Groups = score == RoutingScore.Softmax ? 1 : 8, TopKGroups = score == RoutingScore.Softmax ? 1 : 3 })
                .Route(logits, ids, weights);
            Assert.That(ids, Is.All.InRange(0, n - 1));
            Assert.That(weights.All(float.IsFinite), Is.True, $"{score}: finite weights");
            Assert.That(weights, Is.All.GreaterThanOrEqualTo(0f));
            Assert.That(ids.Take(k), Is.EqualTo(Enumerable.Range(0, k)), $"{score}: an all-NaN row ties at -inf everywhere");
            Assert.That(weights.Take(k), Is.All.EqualTo(0f));
        }
    }

    [Test]
    public void PaddingRowsAreMinusOneZeroAndUncounted()
    {
        var random = TestSupport.NewRandom();
        var tables = HostTables.Random(random, 64, 80);
        var logits = RandomLogits(random, 64 * 10, 2);
        var outcome = Run(Backend.Cpu, new RouterOptions { LogicalExperts = 64, TopK = 4 }, logits, tables: tables, numUnpadded: 7);
        Assert.That(outcome.Ids.Take(28), Is.All.InRange(0, 79));
        Assert.That(outcome.Ids.Skip(28), Is.All.EqualTo(-1));
        Assert.That(outcome.Weights.Skip(28), Is.All.EqualTo(0f));
        Assert.That(outcome.Counters.Sum(), Is.EqualTo(28));
    }

    [Test, Repeat(10)]
    public void EplbOnIsTheMappingOfTheLogicalRouting()
    {
        var random = TestSupport.NewRandom();
        var n = random.Next(1, 300);
        var k = random.Next(1, Math.Min(n, 9) + 1);
        var tokens = random.Next(0, 200);
        var unpadded = random.Next(0, tokens + 3);
        var score = (RoutingScore)random.Next(3);
        var options = new RouterOptions { LogicalExperts = n, TopK = k, Score = score };
        var tables = HostTables.Random(random, n, n + random.Next(0, 64), random.Next(0, 3));
        var logits = RandomLogits(random, n * tokens, 3);
        var logical = Run(Backend.Cpu, options, logits, numUnpadded: unpadded);
        var physical = Run(Backend.Cpu, options, logits, tables: tables, numUnpadded: unpadded);
        var want = new int[logical.Ids.Length];
        var wantCounters = new int[tables.Slots];
        var host = new HostLayerState
        {
            Log2Phy = tables.Log2Phy, LogCnt = tables.LogCnt, MaxReplicas = tables.MaxReplicas, Slots = tables.Slots, Counters = wantCounters,
        };
        ExpertMapping.MapToPhysical(logical.Ids, k, host, want, numUnpadded: unpadded);
        Assert.That(physical.Ids, Is.EqualTo(want));
        Assert.That(physical.Counters, Is.EqualTo(wantCounters));
        Assert.That(physical.Weights, Is.EqualTo(logical.Weights));
        // Record flag off: same ids, nothing counted.
        var quiet = Run(Backend.Cpu, options, logits, tables: tables, numUnpadded: unpadded, record: false);
        Assert.That(quiet.Ids, Is.EqualTo(want));
        Assert.That(quiet.Counters, Is.All.Zero);
    }

    [Test]
    public void OptionsValidationListsEveryProblem()
    {
        var error = Assert.Throws<ArgumentException>(() => new RouterOptions
        {
            LogicalExperts = 100,
            TopK = 40,
            Groups = 3,
            RoutedScalingFactor = float.NaN,
        }.Validate())!;
        Assert.That(error.Message, Does.Contain("TopK must be in [1, min(LogicalExperts, 32) = 32] (got 40)")
            .And.Contain("Groups = 3 does not divide LogicalExperts = 100")
            .And.Contain("RoutedScalingFactor must be finite"));
        Assert.Throws<ArgumentException>(() => new Router(new RouterOptions { LogicalExperts = 0, TopK = 1 }));
        Assert.Throws<ArgumentException>(() => new Router(new RouterOptions { LogicalExperts = 8, TopK = 1, Score = RoutingScore.Softmax, Groups = 2 }));
        var kept = Assert.Throws<ArgumentException>(() => new Router(new RouterOptions { LogicalExperts = 8, TopK = 3, Groups = 4, TopKGroups = 1 }))!;
        Assert.That(kept.Message, Does.Contain("TopK = 3 exceeds the 2 experts of the 1 kept groups"));
        Assert.DoesNotThrow(() => RouterOptions.DeepSeekV3.Validate());
        Assert.DoesNotThrow(() => new RouterOptions { LogicalExperts = 8, TopK = 1, ScaleInWeights = false, RoutedScalingFactor = float.NaN }.Validate());
    }

    [Test]
    public void BadArgumentsThrowAndWriteNothing()
    {
        var router = new Router(new RouterOptions { LogicalExperts = 4, TopK = 2 });
        var ids = Enumerable.Repeat(12345, 4).ToArray();
        var weights = Enumerable.Repeat(7f, 4).ToArray();
        var logits = new float[8];

        void Untouched()
        {
            Assert.That(ids, Is.All.EqualTo(12345));
            Assert.That(weights, Is.All.EqualTo(7f));
        }

        Assert.Throws<ArgumentException>(() => router.Route(new float[7], ids, weights));
        Assert.Throws<ArgumentException>(() => router.Route(logits, ids.AsSpan(1), weights));
        Assert.Throws<ArgumentException>(() => router.Route(logits, ids, weights.AsSpan(1)));
        Assert.Throws<ArgumentException>(() => router.Route(logits, ids, weights, bias: new float[3]));
        var softmax = new Router(new RouterOptions { LogicalExperts = 4, TopK = 2, Score = RoutingScore.Softmax });
        Assert.That(Assert.Throws<ArgumentException>(() => softmax.Route(logits, ids, weights, bias: new float[4]))!.Message,
            Does.Contain("takes no bias"));
        Assert.Throws<InvalidOperationException>(() => softmax.RouteByHash(logits, [0, 0], [0, 1], ids, weights));
        Assert.Throws<ArgumentException>(() => router.RouteByHash(logits, [0], [0, 1], ids, weights));
        Assert.Throws<ArgumentException>(() => router.RouteByHash(logits, [0, 0], [0, 1, 2], ids, weights));
        Untouched();
        // Out-of-range token ids and table entries are caught natively, naming the value.
        var token = Assert.Throws<ArgumentException>(() => router.RouteByHash(logits, [0, 2], [0, 1, 2, 3], ids, weights))!;
        Assert.That(token.Message, Does.Contain("token_ids[1] = 2 is outside [0, vocab_size = 2)"));
        var entry = Assert.Throws<ArgumentException>(() => router.RouteByHash(logits, [0, 1], [0, 1, 2, 4], ids, weights))!;
        Assert.That(entry.Message, Does.Contain("tid2eid[1][1] = 4"));
        Untouched();
        // A numUnpadded view of more than one element.
        using var cpuLogits = new DeviceBuffer<float>(Backend.Cpu, logits);
        using var cpuIds = new DeviceBuffer<int>(Backend.Cpu, 4);
        using var cpuWeights = new DeviceBuffer<float>(Backend.Cpu, 4);
        using var oneRow = new DeviceBuffer<int>(Backend.Cpu, 2);
        Assert.Throws<ArgumentException>(() => router.Route(ComputeStream.Cpu, cpuLogits, cpuIds, cpuWeights, numUnpadded: oneRow));
    }

    [Test]
    public void LayerStateMustMatchTheRouter()
    {
        using var table = new DeviceBuffer<int>(Backend.Cpu, 8);
        using var counts = new DeviceBuffer<int>(Backend.Cpu, 8);
        using var load = new DeviceBuffer<int>(Backend.Cpu, 8);
        using var flag = new DeviceBuffer<int>(Backend.Cpu, 1);
        var layer = new EplbLayerState(table, counts, load, flag, 8, 1, 8);
        var error = Assert.Throws<ArgumentException>(() => new Router(new RouterOptions { LogicalExperts = 16, TopK = 2 }, layer))!;
        Assert.That(error.Message, Does.Contain("8 logical experts, the router 16"));
        Assert.That(new Router(new RouterOptions { LogicalExperts = 8, TopK = 2 }, layer).ToString(), Does.Contain("EPLB R=8"));
    }

    // ---- CUDA == CPU (GPU machines only). ----

    private static void ExpectSame(Outcome gpu, Outcome cpu, string what)
    {
        Assert.That(gpu.Ids, Is.EqualTo(cpu.Ids), $"{what}: ids");
        for (var i = 0; i < cpu.Weights.Length; i++)
            Assert.That(Math.Abs(gpu.Weights[i] - cpu.Weights[i]), Is.LessThanOrEqualTo(1e-6 * Math.Abs(cpu.Weights[i])),
                $"{what}: weight {i}: CUDA {gpu.Weights[i]}, CPU {cpu.Weights[i]}");
        Assert.That(gpu.Counters, Is.EqualTo(cpu.Counters), $"{what}: counters");
    }

    [Test, Category("GPU")]
    public void CudaMatchesCpuOnRandomRows()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        int[] widths = [1, 7, 32, 33, 100, 256, 384, 1000];
        for (var iteration = 0; iteration < 24; iteration++)
        {
            var n = widths[random.Next(widths.Length)];
            var score = (RoutingScore)random.Next(3);
            var groups = score != RoutingScore.Softmax && n % 8 == 0 && random.Next(2) == 0 ? 8 : 1;
            var topkGroups = groups == 1 ? 1 : random.Next(1, groups + 1);
            var k = random.Next(1, Math.Min(Math.Min(n, 32), topkGroups * (n / groups)) + 1);
            var tokens = iteration == 0 ? 1 : random.Next(0, 3000);
            var options = new RouterOptions { LogicalExperts = n, TopK = k, Score = score, Groups = groups, TopKGroups = topkGroups, RoutedScalingFactor = 2.5f };
            var logits = RandomLogits(random, n * tokens, 3);
            var bias = score == RoutingScore.Softmax ? null : RandomLogits(random, n, 0.3);
            var tables = HostTables.Random(random, n, n + random.Next(0, 64), 1);
            var unpadded = random.Next(0, tokens + 3);
            ExpectSame(Run(Backend.Cuda, options, logits, bias, tables, unpadded), Run(Backend.Cpu, options, logits, bias, tables, unpadded),
                $"iteration {iteration} ({options})");
        }
    }

    [Test, Category("GPU")]
    public void CudaMatchesCpuOnRealLoadsForDeepSeekShapes([Values("decode_in1000out1000", "prefill_in4096")] string file)
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad(file);
        foreach (var layerIndex in new[] { 0, 29, 57 })
        {
            var logits = RealLoadLogits(random, load.Layer(layerIndex), 16384);
            var bias = RandomLogits(random, 256, 0.05);
            var hottest = Enumerable.Range(0, 256).OrderByDescending(e => load[layerIndex, e]).Take(32).ToArray();
            var phy2log = Enumerable.Range(0, 256).Concat(hottest).ToArray();
            random.Shuffle(phy2log);
            var tables = HostTables.FromPhy2Log(phy2log, 256, maxReplicas: 4);
            var v3 = RouterOptions.DeepSeekV3;
            ExpectSame(Run(Backend.Cuda, v3, logits, bias, tables, 16000), Run(Backend.Cpu, v3, logits, bias, tables, 16000), "V3");
            var v4 = new RouterOptions { LogicalExperts = 256, TopK = 6, RoutedScalingFactor = 1.5f };
            ExpectSame(Run(Backend.Cuda, v4, logits, bias, tables, 16000), Run(Backend.Cpu, v4, logits, bias, tables, 16000), "V4");
            var tid2eid = Enumerable.Range(0, 129280 * 6).Select(_ => random.Next(256)).ToArray();
            var tokenIds = Enumerable.Range(0, 16384).Select(_ => (long)random.Next(129280)).ToArray();
            ExpectSame(Run(Backend.Cuda, v4, logits, null, tables, 16000, tokenIds: tokenIds, tid2eid: tid2eid),
                Run(Backend.Cpu, v4, logits, null, tables, 16000, tokenIds: tokenIds, tid2eid: tid2eid), "V4 hash");
        }
    }

    [Test, Category("GPU")]
    public void CudaBadTokenIdThrowsAfterLaunchUnlessTheCheckIsOff()
    {
        TestSupport.RequireCuda();
        var options = new RouterOptions { LogicalExperts = 4, TopK = 2 };
        float[] logits = [1f, 1f, 1f, 1f, 1f, 1f, 1f, 1f];
        var error = Assert.Throws<EplbException>(() => Run(Backend.Cuda, options, logits, tokenIds: [0, 5], tid2eid: [0, 1, 2, 3]))!;
        Assert.That(error.Status, Is.EqualTo(EplbStatus.DeviceInputError));
        Assert.That(error.Message, Does.Contain("bad-token-id"));
        // With the check off the launch returns; the row is voided and the flag waits on the stream.
        var outcome = Run(Backend.Cuda, options, logits, tokenIds: [0, 5], tid2eid: [0, 1, 2, 3], checkDeviceErrors: false);
        Assert.That(outcome.Ids, Is.EqualTo(new[] { 0, 1, -1, -1 }));
        Assert.That(outcome.Weights, Is.EqualTo(new[] { 0.5f, 0.5f, 0f, 0f }));
        Assert.That(outcome.PendingDeviceError, Is.True);
    }
}
