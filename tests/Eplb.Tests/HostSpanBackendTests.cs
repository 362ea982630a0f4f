using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// Host-span forms take a backend everywhere (issue 16 §7): the router's, like the other ops', run
/// on CUDA through a device round trip with the CPU reference's bits, and refuse an EPLB state that
/// lives on another backend than the one asked for.
/// </summary>
public class HostSpanBackendTests
{
    // Routes on the backend with an EPLB state there; returns ids, weights and the recorded counters.
    private static (int[] Ids, float[] Weights, int[] Counters) Route(Backend backend, RouterOptions options, HostTables tables, float[] logits,
        long[]? tokenIds = null, int[]? tid2eid = null, int? numUnpadded = null)
    {
        using var log2phy = new DeviceBuffer<int>(backend, tables.Log2Phy);
        using var logcnt = new DeviceBuffer<int>(backend, tables.LogCnt);
        using var counters = new DeviceBuffer<int>(backend, new int[tables.Slots]);
        using var flag = new DeviceBuffer<int>(backend, [1]);
        var router = new Router(options, new EplbLayerState(log2phy, logcnt, counters, flag, tables.LogicalExperts, tables.MaxReplicas, tables.Slots));
        var ids = new int[logits.Length / options.LogicalExperts * options.TopK];
        var weights = new float[ids.Length];
        if (tokenIds is null) router.Route(logits, ids, weights, numUnpadded: numUnpadded, backend: backend);
        else router.RouteByHash(logits, tokenIds, tid2eid, ids, weights, numUnpadded, backend);
        return (ids, weights, counters.ToArray());
    }

    [Test]
    public void AnEplbStateOnAnotherBackendIsRefusedAndNothingIsWritten()
    {
        var random = TestSupport.NewRandom();
        var tables = HostTables.Random(random, 8, 12);
        using var log2phy = new DeviceBuffer<int>(Backend.Cpu, tables.Log2Phy);
        using var logcnt = new DeviceBuffer<int>(Backend.Cpu, tables.LogCnt);
        using var counters = new DeviceBuffer<int>(Backend.Cpu, new int[12]);
        using var flag = new DeviceBuffer<int>(Backend.Cpu, [1]);
        var router = new Router(new RouterOptions { LogicalExperts = 8, TopK = 2 }, new EplbLayerState(log2phy, logcnt, counters, flag, 8, tables.MaxReplicas, 12));
        var ids = Enumerable.Repeat(-7, 6).ToArray();
        var weights = new float[6];
        var e = Assert.Throws<ArgumentException>(() => router.Route(new float[24], ids, weights, backend: Backend.Cuda))!;
        Assert.That(e.Message, Does.Contain("lives on Cpu but the call runs on Cuda"));
        Assert.Throws<ArgumentException>(() => router.RouteByHash(new float[24], [0, 1, 2], [0, 1, 2, 3], ids, weights, backend: Backend.Cuda));
        Assert.That(ids, Is.All.EqualTo(-7));
        Assert.That(counters.ToArray(), Is.All.Zero);
        // The CPU form with the CPU state records the three tokens.
        router.Route(new float[24], ids, weights);
        Assert.That(counters.ToArray().Sum(), Is.EqualTo(6));
    }

    [Test, Category("GPU")]
    public void RouterHostSpansOnCudaGiveTheCpuBits()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var tables = HostTables.Random(random, 64, 80);
        var logits = Enumerable.Range(0, 300 * 64).Select(_ => (float)(random.NextDouble() * 6 - 3)).ToArray();
        var options = new RouterOptions { LogicalExperts = 64, TopK = 6, Score = RoutingScore.Sigmoid, Groups = 8, TopKGroups = 3 };
        var cpu = Route(Backend.Cpu, options, tables, logits, numUnpadded: 250);
        var cuda = Route(Backend.Cuda, options, tables, logits, numUnpadded: 250);
        Assert.That(cuda.Ids, Is.EqualTo(cpu.Ids));
        Assert.That(cuda.Weights, Is.EqualTo(cpu.Weights));
        Assert.That(cuda.Counters, Is.EqualTo(cpu.Counters));

        var hash = new RouterOptions { LogicalExperts = 64, TopK = 6 };
        var table = Enumerable.Range(0, 1000 * 6).Select(_ => random.Next(64)).ToArray();
        var tokens = Enumerable.Range(0, 300).Select(_ => (long)random.Next(1000)).ToArray();
        var cpuHash = Route(Backend.Cpu, hash, tables, logits, tokens, table);
        var cudaHash = Route(Backend.Cuda, hash, tables, logits, tokens, table);
        Assert.That(cudaHash.Ids, Is.EqualTo(cpuHash.Ids));
        Assert.That(cudaHash.Weights, Is.EqualTo(cpuHash.Weights));
        Assert.That(cudaHash.Counters, Is.EqualTo(cpuHash.Counters));
    }
}
