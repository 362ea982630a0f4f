using Eplb.Kernels;
using Eplb.Runtime;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace Eplb.TorchSharp.Tests;

/// <summary>Routing ops that take and return tensors (issue 16 §3): the same bits as the host-span forms.</summary>
public class TorchRoutingTests
{
    [Test]
    public void RoutingTensorsGivesTheHostSpanResultsAndRecordsTheLoad()
    {
        var random = TestSupport.NewRandom();
        const int n = 16, slots = 20, tokens = 45;
        var options = new RouterOptions { LogicalExperts = n, TopK = 3, Score = RoutingScore.Sigmoid, Groups = 4, TopKGroups = 2 };
        var phy2log = Enumerable.Range(0, slots).Select(s => s < n ? s : random.Next(n)).ToArray();
        var (log2phy, logcnt, kmax) = Tables(phy2log, n);
        using var log2phyTensorView = new DeviceBuffer<int>(Backend.Cpu, log2phy);
        using var logcntView = new DeviceBuffer<int>(Backend.Cpu, logcnt);
        using var counters = new DeviceBuffer<int>(Backend.Cpu, new int[slots]);
        using var flag = new DeviceBuffer<int>(Backend.Cpu, [1]);
        var layer = new EplbLayerState(log2phyTensorView, logcntView, counters, flag, n, kmax, slots);
        var router = new Router(options, layer);

        var logits = TestSupport.Uniform(random, 3f, tokens, n);
        var bias = TestSupport.Uniform(random, 0.5f, n);
        var (ids, weights) = router.Route(logits, bias);
        Assert.That(ids.shape, Is.EqualTo(new long[] { tokens, 3 }));
        Assert.That((ids.dtype, weights.dtype), Is.EqualTo((ScalarType.Int32, ScalarType.Float32)));

        var wantIds = new int[tokens * 3];
        var wantWeights = new float[tokens * 3];
        var wantCounters = new int[slots];
        new Router(options).Route(logits.data<float>().ToArray(), wantIds, wantWeights, bias.data<float>().ToArray());
        var logical = (int[])wantIds.Clone();
        ExpertMapping.MapToPhysical(logical, 3,
            new HostLayerState { Log2Phy = log2phy, LogCnt = logcnt, MaxReplicas = kmax, Slots = slots, Counters = wantCounters }, wantIds);
        Assert.That(ids.data<int>().ToArray(), Is.EqualTo(wantIds));
        Assert.That(weights.data<float>().ToArray(), Is.EqualTo(wantWeights));
        Assert.That(counters.ToArray(), Is.EqualTo(wantCounters));

        // The stand-alone mapping on tensors: logical ids in, the same physical slots out (and counted again).
        var mapped = TorchRouting.MapToPhysical(tensor(logical).reshape(tokens, 3), layer);
        Assert.That(mapped.data<int>().ToArray(), Is.EqualTo(wantIds));
        Assert.That(counters.ToArray(), Is.EqualTo(wantCounters.Select(c => 2 * c)));

        // Padding rows from a one-element tensor.
        var (padded, _) = router.Route(logits, bias, tensor(new[] { 10 }));
        Assert.That(padded[10..].data<int>().ToArray(), Is.All.EqualTo(-1));
        Assert.That(padded[..10].data<int>().ToArray(), Is.EqualTo(wantIds[..30]));
    }

    [Test]
    public void HashRoutingTensors()
    {
        var random = TestSupport.NewRandom();
        const int n = 12, vocab = 50, tokens = 33, k = 4;
        var router = new Router(new RouterOptions { LogicalExperts = n, TopK = k, Score = RoutingScore.SqrtSoftplus, RoutedScalingFactor = 1.5f });
        var table = Enumerable.Range(0, vocab * k).Select(_ => random.Next(n)).ToArray();
        var tokenIds = Enumerable.Range(0, tokens).Select(_ => (long)random.Next(vocab)).ToArray();
        var logits = TestSupport.Uniform(random, 2f, tokens, n);
        var (ids, weights) = router.RouteByHash(logits, tensor(tokenIds), tensor(table).reshape(vocab, k));
        var wantIds = new int[tokens * k];
        var wantWeights = new float[tokens * k];
        router.RouteByHash(logits.data<float>().ToArray(), tokenIds, table, wantIds, wantWeights);
        Assert.That(ids.data<int>().ToArray(), Is.EqualTo(wantIds));
        Assert.That(weights.data<float>().ToArray(), Is.EqualTo(wantWeights));

        // A token id outside the table: an exception naming it, nothing returned.
        tokenIds[3] = vocab;
        Assert.Throws<ArgumentException>(() => router.RouteByHash(logits, tensor(tokenIds), tensor(table).reshape(vocab, k)));
    }

    [Test]
    public void BadTensorsAreRefused()
    {
        var router = new Router(new RouterOptions { LogicalExperts = 8, TopK = 2 });
        Assert.Throws<ArgumentException>(() => router.Route(zeros(4, 7)), "N = 8");
        Assert.Throws<ArgumentException>(() => router.Route(zeros(4, 8, dtype: ScalarType.Float64)), "float32 logits");
        Assert.Throws<ArgumentException>(() => router.Route(zeros(8, 4).t()), "contiguous");
        Assert.Throws<ArgumentException>(() => router.Route(zeros(4, 8), numUnpadded: zeros(1)), "int32 scalar");
        using var cpu = new ComputeStream(Backend.Cpu);
        var (ids, _) = router.Route(zeros(4, 8), stream: cpu);
        Assert.That(ids.shape, Is.EqualTo(new long[] { 4, 2 }));
    }

    private static (int[] Log2Phy, int[] LogCnt, int MaxReplicas) Tables(int[] phy2log, int n)
    {
        var logcnt = new int[n];
        foreach (var e in phy2log) logcnt[e]++;
        var kmax = logcnt.Max();
        var log2phy = Enumerable.Repeat(-1, n * kmax).ToArray();
        var filled = new int[n];
        for (var s = 0; s < phy2log.Length; s++) log2phy[phy2log[s] * kmax + filled[phy2log[s]]++] = s;
        return (log2phy, logcnt, kmax);
    }
}
