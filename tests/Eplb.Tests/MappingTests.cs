using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The logical -> physical mapping op (docs/design.md §4.3) through the managed API.</summary>
public class MappingTests
{
    // docs/design.md §4.3 written out independently: 64-bit arithmetic with an explicit mod 2^32.
    private static (int[] Physical, int[] Counters) Oracle(int[] ids, int topK, HostTables t, long numUnpadded, bool record)
    {
        var tokens = ids.Length / topK;
        var physical = new int[ids.Length];
        var counters = new int[t.Slots];
        for (var row = 0; row < tokens; row++)
        {
            for (var k = 0; k < topK; k++)
            {
                var id = ids[row * topK + k];
                var phys = -1;
                if (row < numUnpadded && id >= 0 && id < t.LogicalExperts)
                {
                    var hashed = (ulong)row * 2654435769UL % 4294967296UL;
                    var replica = (int)(hashed % (ulong)t.LogCnt[id]);
                    phys = t.Log2Phy[id * t.MaxReplicas + replica];
                }
                physical[row * topK + k] = phys;
                if (record && phys >= 0) counters[phys]++;
            }
        }
        return (physical, counters);
    }

    private static (int[] Physical, int[] Counters) Run(Backend backend, int[] ids, int topK, HostTables t, int? numUnpadded, bool record,
        ReplicaSelection selection = ReplicaSelection.TokenHash)
    {
        var physical = Enumerable.Repeat(unchecked((int)0xDEADBEEF), ids.Length).ToArray();  // poisoned
        var counters = new int[t.Slots];
        ExpertMapping.MapToPhysical(ids, topK, Host(t, record ? counters : default, selection: selection), physical, numUnpadded, backend);
        return (physical, counters);
    }

    // The host-span form's view of a layer's tables (counters empty: nothing recorded).
    private static HostLayerState Host(HostTables t, Span<int> counters = default, int? slots = null, ReadOnlySpan<int> log2Phy = default,
        int? maxReplicas = null, ReplicaSelection selection = ReplicaSelection.TokenHash) => new()
    {
        Log2Phy = log2Phy.IsEmpty ? t.Log2Phy : log2Phy,
        LogCnt = t.LogCnt,
        MaxReplicas = maxReplicas ?? t.MaxReplicas,
        Slots = slots ?? t.Slots,
        Counters = counters,
        ReplicaSelection = selection,
    };

    [Test]
    public void TokenHashPicksTheSpecifiedReplicas()
    {
        // Expert 0 in slots {0, 4, 5}, expert 1 in {1, 6}. (row * 2654435769) mod 2^32 for rows 0..7 is
        // 0, 2654435769, 1013904242, 3668340011, 2027808484, 387276957, 3041712726, 1401181199:
        // mod 3 -> 0,0,2,2,1,0,0,2 and mod 2 -> 0,1,0,1,0,1,0,1.
        var t = HostTables.FromPhy2Log([0, 1, 2, 3, 0, 0, 1], 4);
        var ids = Enumerable.Range(0, 8).SelectMany(_ => new[] { 0, 1 }).ToArray();
        var (physical, counters) = Run(Backend.Cpu, ids, 2, t, null, record: true);
        int[] expert0 = [0, 0, 5, 5, 4, 0, 0, 5];
        int[] expert1 = [1, 6, 1, 6, 1, 6, 1, 6];
        for (var row = 0; row < 8; row++)
        {
            Assert.That(physical[row * 2], Is.EqualTo(expert0[row]), $"row {row}, expert 0");
            Assert.That(physical[row * 2 + 1], Is.EqualTo(expert1[row]), $"row {row}, expert 1");
        }
        Assert.That(counters, Is.EqualTo(new[] { 4, 4, 0, 0, 1, 3, 4 }));
    }

    [Test]
    public void InvalidIdsAndPaddingRowsBecomeMinusOneAndAreNotCounted()
    {
        var t = HostTables.FromPhy2Log([0, 1, 2, 0], 3);
        int[] ids = [2, -1, 3, 1_000_000, -7, 1, 0, 1, 2, 2, 2, 2];
        var (physical, counters) = Run(Backend.Cpu, ids, 3, t, numUnpadded: 2, record: true);
        Assert.That(physical, Is.EqualTo(new[] { 2, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1 }));
        Assert.That(counters, Is.EqualTo(new[] { 0, 1, 1, 0 }));
    }

    [Test]
    public void RecordFlagOffLeavesCountersAlone()
    {
        var random = TestSupport.NewRandom();
        var t = HostTables.Random(random, 16, 24);
        var ids = Enumerable.Range(0, 160).Select(_ => random.Next(16)).ToArray();
        using var log2phy = new DeviceBuffer<int>(Backend.Cpu, t.Log2Phy);
        using var logcnt = new DeviceBuffer<int>(Backend.Cpu, t.LogCnt);
        using var counters = new DeviceBuffer<int>(Backend.Cpu, Enumerable.Repeat(5, 24).ToArray());
        using var flag = new DeviceBuffer<int>(Backend.Cpu, [0]);
        using var input = new DeviceBuffer<int>(Backend.Cpu, ids);
        using var physical = new DeviceBuffer<int>(Backend.Cpu, ids.Length);
        var layer = new EplbLayerState(log2phy, logcnt, counters, flag, 16, t.MaxReplicas, 24);
        ExpertMapping.MapToPhysical(ComputeStream.Cpu, input, 4, layer, physical);
        Assert.That(counters.ToArray(), Is.All.EqualTo(5));
        Assert.That(physical.ToArray(), Is.EqualTo(Oracle(ids, 4, t, 40, false).Physical));
        flag.Fill(1);
        ExpertMapping.MapToPhysical(ComputeStream.Cpu, input, 4, layer, physical);
        Assert.That(counters.ToArray(), Is.EqualTo(Oracle(ids, 4, t, 40, true).Counters.Select(c => c + 5)));
    }

    [Test]
    public void CountersAccumulateAcrossCalls()
    {
        var random = TestSupport.NewRandom();
        var t = HostTables.Random(random, 8, 12);
        var ids = Enumerable.Range(0, 64).Select(_ => random.Next(8)).ToArray();
        var counters = new int[12];
        var physical = new int[ids.Length];
        ExpertMapping.MapToPhysical(ids, 4, Host(t, counters), physical);
        ExpertMapping.MapToPhysical(ids, 4, Host(t, counters), physical);
        Assert.That(counters, Is.EqualTo(Oracle(ids, 4, t, 16, true).Counters.Select(c => 2 * c)));
    }

    [Test, Repeat(25)]
    public void RandomInputsMatchTheFormulaAndCountersEqualBincount()
    {
        var random = TestSupport.NewRandom();
        var n = random.Next(1, 300);
        var r = n + random.Next(0, 40);
        var topK = random.Next(1, 10);
        var tokens = random.Next(0, 300);
        var unpadded = random.Next(0, tokens + 5);
        var t = HostTables.Random(random, n, r, random.Next(0, 3));
        var ids = Enumerable.Range(0, tokens * topK).Select(_ => random.Next(-1, n + 2)).ToArray();

        var (physical, counters) = Run(Backend.Cpu, ids, topK, t, unpadded, record: true);
        var (wantPhysical, wantCounters) = Oracle(ids, topK, t, unpadded, true);
        Assert.That(physical, Is.EqualTo(wantPhysical));
        Assert.That(counters, Is.EqualTo(wantCounters));
        var bincount = new int[r];
        foreach (var p in physical.Where(p => p >= 0)) bincount[p]++;
        Assert.That(counters, Is.EqualTo(bincount));
        for (var i = 0; i < ids.Length; i++)
            if (physical[i] >= 0) Assert.That(t.Phy2Log[physical[i]], Is.EqualTo(ids[i]), "a physical slot must hold its logical expert");
    }

    [Test]
    public void RealLoadRowsSpreadOverReplicasInProportion()
    {
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad("decode_in1000out1000");
        var layer = load.Layer(10).ToArray();
        // Give the 32 hottest experts a second replica (R = 288).
        var hottest = Enumerable.Range(0, 256).OrderByDescending(e => layer[e]).Take(32).ToArray();
        var phy2log = Enumerable.Range(0, 256).Concat(hottest).ToArray();
        random.Shuffle(phy2log);
        var t = HostTables.FromPhy2Log(phy2log, 256, maxReplicas: 4);
        var ids = TestSupport.SampleTopK(random, layer, 4096, 8);
        var (physical, counters) = Run(Backend.Cpu, ids, 8, t, null, record: true);
        Assert.That(physical, Is.EqualTo(Oracle(ids, 8, t, 4096, true).Physical));
        Assert.That(counters.Sum(), Is.EqualTo(4096 * 8));
        // A replicated hot expert's tokens split roughly evenly between its two slots (hash of the row).
        var expert = hottest[0];
        var slots = Enumerable.Range(0, 288).Where(s => phy2log[s] == expert).ToArray();
        var a = counters[slots[0]];
        var b = counters[slots[1]];
        Assert.That(Math.Abs(a - b), Is.LessThan(0.2 * (a + b)), $"slots {slots[0]}:{a} and {slots[1]}:{b}");
    }

    [Test]
    public void RoundRobinSelection()
    {
        var t = HostTables.FromPhy2Log([0, 1, 0, 0], 2);  // expert 0 in {0, 2, 3}
        var (physical, _) = Run(Backend.Cpu, [0, 0, 0, 0, 0, 0], 2, t, null, record: false, ReplicaSelection.RoundRobin);
        Assert.That(physical, Is.EqualTo(new[] { 0, 2, 3, 0, 2, 3 }));
    }

    [Test]
    public void DeviceBufferFormOnTheCpuBackendRunsInPlace()
    {
        var random = TestSupport.NewRandom();
        var t = HostTables.Random(random, 32, 40);
        var ids = Enumerable.Range(0, 64 * 8).Select(_ => random.Next(32)).ToArray();
        var stream = ComputeStream.Cpu;
        using var buffer = new DeviceBuffer<int>(Backend.Cpu, ids);
        using var log2phy = new DeviceBuffer<int>(Backend.Cpu, t.Log2Phy);
        using var logcnt = new DeviceBuffer<int>(Backend.Cpu, t.LogCnt);
        using var counters = new DeviceBuffer<int>(Backend.Cpu, 40);
        counters.Fill(0);
        using var flag = new DeviceBuffer<int>(Backend.Cpu, [1]);
        using var unpadded = new DeviceBuffer<int>(Backend.Cpu, [60]);
        var layer = new EplbLayerState(log2phy, logcnt, counters, flag, 32, t.MaxReplicas, 40);
        ExpertMapping.MapToPhysical(stream, buffer, 8, layer, buffer, unpadded);
        var (want, wantCounters) = Oracle(ids, 8, t, 60, true);
        Assert.That(buffer.ToArray(), Is.EqualTo(want));
        Assert.That(counters.ToArray(), Is.EqualTo(wantCounters));
    }

    [Test]
    public void BadInputThrowsAndWritesNothing()
    {
        var t = HostTables.FromPhy2Log([0, 1, 2, 0], 3);
        int[] ids = [0, 1, 2, 0];
        var physical = Enumerable.Repeat(12345, 4).ToArray();
        var counters = Enumerable.Repeat(7, 4).ToArray();

        void Untouched()
        {
            Assert.That(physical, Is.All.EqualTo(12345));
            Assert.That(counters, Is.All.EqualTo(7));
        }

        // Wrong lengths and sizes are caught in managed code.
        Assert.Throws<ArgumentException>(() => ExpertMapping.MapToPhysical(ids, 3, Host(t, counters, 4), physical));
        Assert.Throws<ArgumentException>(() => ExpertMapping.MapToPhysical(ids, 2, Host(t, counters, 4), physical.AsSpan(1)));
        Assert.Throws<ArgumentException>(() => ExpertMapping.MapToPhysical(ids, 2, Host(t, counters, 4, t.Log2Phy.AsSpan(1)), physical));
        Assert.Throws<ArgumentException>(() => ExpertMapping.MapToPhysical(ids, 2, Host(t, counters.AsSpan(1), 4), physical));
        Assert.Throws<ArgumentOutOfRangeException>(() => ExpertMapping.MapToPhysical(ids, 0, Host(t, counters, 4), physical));
        Assert.Throws<ArgumentOutOfRangeException>(() => ExpertMapping.MapToPhysical(ids, 2, Host(t, counters, -4), physical));
        Untouched();

        // Kmax smaller than the largest replica count: the native layer names the entry.
        var narrow = Assert.Throws<ArgumentException>(() =>
            ExpertMapping.MapToPhysical(ids, 2, Host(t, counters, 4, [0, 1, 2], 1), physical))!;
        Assert.That(narrow.Message, Does.Contain("logcnt[0] = 2").And.Contain("max_replicas = 1"));
        // A table entry outside [0, R).
        var broken = (int[])t.Log2Phy.Clone();
        broken[1] = 9;
        var outOfRange = Assert.Throws<ArgumentException>(() =>
            ExpertMapping.MapToPhysical(ids, 2, Host(t, counters, 4, broken), physical))!;
        Assert.That(outOfRange.Message, Does.Contain("log2phy[0][1] = 9"));
        Untouched();
    }

    [Test]
    public void LayerStateNamesMissingOrMisSizedViews()
    {
        using var table = new DeviceBuffer<int>(Backend.Cpu, 8);
        using var counts = new DeviceBuffer<int>(Backend.Cpu, 4);
        using var load = new DeviceBuffer<int>(Backend.Cpu, 6);
        using var flag = new DeviceBuffer<int>(Backend.Cpu, 1);
        var missing = Assert.Throws<ArgumentException>(() => new EplbLayerState(table, default, load, flag, 4, 2, 6))!;
        Assert.That(missing.Message, Does.StartWith("EPLB requires logCnt != null"));
        var sized = Assert.Throws<ArgumentException>(() => new EplbLayerState(table, counts, load, flag, 4, 3, 6))!;
        Assert.That(sized.Message, Does.Contain("log2Phy has 8 elements; the layer needs 12"));
        Assert.That(new EplbLayerState(table, counts, load, flag, 4, 2, 6).Slots, Is.EqualTo(6));
    }

    [Test, Category("GPU")]
    public void CudaMatchesCpuBitForBitOnRandomInputs()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        for (var iteration = 0; iteration < 30; iteration++)
        {
            var n = random.Next(1, 400);
            var r = n + random.Next(0, 130);
            var topK = random.Next(1, 10);
            var tokens = iteration == 0 ? 1 : random.Next(0, 20000);
            var unpadded = random.Next(0, tokens + 3);
            var t = HostTables.Random(random, n, r, random.Next(0, 3));
            var ids = Enumerable.Range(0, tokens * topK).Select(_ => random.Next(-1, n + 1)).ToArray();
            foreach (var selection in new[] { ReplicaSelection.TokenHash, ReplicaSelection.RoundRobin })
            {
                var cpu = Run(Backend.Cpu, ids, topK, t, unpadded, true, selection);
                var gpu = Run(Backend.Cuda, ids, topK, t, unpadded, true, selection);
                Assert.That(gpu.Physical, Is.EqualTo(cpu.Physical));
                Assert.That(gpu.Counters, Is.EqualTo(cpu.Counters));
            }
        }
    }

    [Test, Category("GPU")]
    public void CudaMatchesCpuOnRealLoadRows([Values("decode_in1000out1000", "prefill_in4096")] string file)
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad(file);
        foreach (var layerIndex in new[] { 0, 27, 57 })
        {
            var layer = load.Layer(layerIndex).ToArray();
            var hottest = Enumerable.Range(0, 256).OrderByDescending(e => layer[e]).Take(16).ToArray();
            var phy2log = Enumerable.Range(0, 256).Concat(hottest).Concat(hottest).ToArray();
            random.Shuffle(phy2log);
            var t = HostTables.FromPhy2Log(phy2log, 256, maxReplicas: 8);
            var ids = TestSupport.SampleTopK(random, layer, 16384, 8);
            var cpu = Run(Backend.Cpu, ids, 8, t, 16000, true);
            var gpu = Run(Backend.Cuda, ids, 8, t, 16000, true);
            Assert.That(gpu.Physical, Is.EqualTo(cpu.Physical));
            Assert.That(gpu.Counters, Is.EqualTo(cpu.Counters));
        }
    }
}
