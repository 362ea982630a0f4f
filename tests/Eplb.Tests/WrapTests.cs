using System.Runtime.InteropServices;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// Memory the host owns, wrapped without a copy (<see cref="DeviceBuffer{T}.Wrap(Memory{T})"/>,
/// <c>eplb_buffer_wrap</c>): writes on either side show on the other, every kernel and the migration
/// work on it in place, disposing leaves the memory alone, and bad pointers are refused at wrap time.
/// </summary>
public unsafe class WrapTests
{
    [Test]
    public void WrappingNeverCopiesTheHostsMemory()
    {
        var random = TestSupport.NewRandom();
        var host = Enumerable.Range(0, random.Next(1, 3000)).Select(_ => random.Next()).ToArray();
        using var wrapped = DeviceBuffer<int>.Wrap(host.AsMemory());
        Assert.That(wrapped.IsWrapped, Is.True);
        Assert.That((wrapped.Backend, wrapped.Device, wrapped.Length), Is.EqualTo((Backend.Cpu, -1, (long)host.Length)));
        fixed (int* first = host) Assert.That((nint)wrapped.Data, Is.EqualTo((nint)first), "the buffer is the array's memory");

        // The host writes, Eplb reads.
        var index = random.Next(host.Length);
        host[index] = 123456789;
        Assert.That(wrapped.ToArray()[index], Is.EqualTo(123456789));
        // Eplb writes, the host reads.
        wrapped.Fill(-5, 0, 1);
        Assert.That(host[0], Is.EqualTo(-5));
        var values = Enumerable.Range(0, host.Length).Select(_ => random.Next()).ToArray();
        wrapped.CopyFrom(values);
        Assert.That(host, Is.EqualTo(values));
        using var owned = new DeviceBuffer<int>(Backend.Cpu, host.Length);
        owned.Fill(77);
        wrapped.CopyFrom(owned, 0, 0, host.Length);
        Assert.That(host, Is.All.EqualTo(77));

        // A slice of an array and another element type's view reach the same bytes.
        using var middle = DeviceBuffer<int>.Wrap(host.AsMemory(host.Length / 2));
        middle.Fill(9);
        Assert.That(host[(host.Length / 2)..], Is.All.EqualTo(9));
        wrapped.AsBytes().Fill(0xFF, 0, 4);
        Assert.That(host[0], Is.EqualTo(-1));
    }

    [Test]
    public void NativeMemoryWrappedByPointerStaysTheCallersAfterDispose()
    {
        const int count = 257;
        var memory = (float*)NativeMemory.AlignedAlloc(count * sizeof(float), 64);
        try
        {
            var owner = new object();
            var buffer = DeviceBuffer<float>.Wrap(Backend.Cpu, -1, memory, count, owner);
            buffer.Fill(2.5f);
            Assert.That(new ReadOnlySpan<float>(memory, count).ToArray(), Is.All.EqualTo(2.5f));
            memory[100] = -1f;
            Assert.That(buffer.AsSlice().Slice(100, 1).ToArray(), Is.EqualTo(new[] { -1f }));
            Assert.That(buffer.ToString(), Does.Contain("wrapped"));
            buffer.Dispose();
            // Disposed: the buffer refuses use, the memory is still there and still the caller's.
            Assert.Throws<ObjectDisposedException>(() => buffer.Fill(0f));
            memory[0] = 7f;
            Assert.That(memory[0], Is.EqualTo(7f));
            Assert.That(memory[1], Is.EqualTo(2.5f));
        }
        finally
        {
            NativeMemory.AlignedFree(memory);
        }
    }

    [Test]
    public void WrappedArraysStayPinnedWhileTheBufferLives()
    {
        // A buffer over an array that nothing else references: the pin keeps the array alive and in
        // place through collections, so kernels keep writing where the host reads.
        var (buffer, reference) = WrapUnreferencedArray(4096);
        using (buffer)
        {
            var before = (nint)buffer.Data;
            for (var i = 0; i < 3; i++) GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
            Assert.That(reference.TryGetTarget(out var array), Is.True, "the pin keeps the array reachable");
            fixed (int* first = array) Assert.That((nint)first, Is.EqualTo(before), "the array has not moved");
            buffer.Fill(31);
            Assert.That(array, Is.All.EqualTo(31));
        }
    }

    private static (DeviceBuffer<int>, WeakReference<int[]>) WrapUnreferencedArray(int length)
    {
        var array = new int[length];
        return (DeviceBuffer<int>.Wrap(array.AsMemory()), new WeakReference<int[]>(array));
    }

    [Test]
    public void BadPointersAreRefusedAtWrapTime()
    {
        var memory = (byte*)NativeMemory.AlignedAlloc(64, 16);
        try
        {
            Assert.Throws<ArgumentNullException>(() => DeviceBuffer<int>.Wrap(Backend.Cpu, -1, null, 4));
            var misaligned = Assert.Throws<ArgumentException>(() => DeviceBuffer<int>.Wrap(Backend.Cpu, -1, (int*)(memory + 2), 4))!;
            Assert.That(misaligned.Message, Does.Contain($"0x{(nuint)(memory + 2):x}").And.Contain("4 bytes").And.Contain("Int32"));
            Assert.Throws<ArgumentException>(() => DeviceBuffer<long>.Wrap(Backend.Cpu, -1, (long*)(memory + 4), 2));
            Assert.Throws<ArgumentOutOfRangeException>(() => DeviceBuffer<int>.Wrap(Backend.Cpu, -1, (int*)memory, -1));
            // Host memory names no device; the native layer says so.
            var device = Assert.Throws<ArgumentException>(() => DeviceBuffer<int>.Wrap(Backend.Cpu, 0, (int*)memory, 4))!;
            Assert.That(device.Message, Does.Contain("eplb_buffer_wrap").And.Contain("device"));
            Assert.Throws<ArgumentException>(() => DeviceBuffer<int>.Wrap(Memory<int>.Empty));
            // Bytes have no alignment to keep; an empty range is a valid buffer.
            using var bytes = DeviceBuffer<byte>.Wrap(Backend.Cpu, -1, memory + 3, 5);
            using var empty = DeviceBuffer<int>.Wrap(Backend.Cpu, -1, (int*)memory, 0);
            Assert.That(empty.ToArray(), Is.Empty);
            if (!EplbRuntime.IsAvailable(Backend.Cuda))
                Assert.Throws<EplbException>(() => DeviceBuffer<int>.Wrap(Backend.Cuda, 0, (int*)memory, 4), "CUDA unavailable");
        }
        finally
        {
            NativeMemory.AlignedFree(memory);
        }
    }

    [Test]
    public void EveryKernelRunsOnWrappedMemory()
    {
        var random = TestSupport.NewRandom();
        const int n = 32, slots = 40, topK = 4, tokens = 37;
        var tables = HostTables.Random(random, n, slots);

        // Router with the EPLB epilogue: tables, counters and outputs are the host's arrays.
        var options = new RouterOptions { LogicalExperts = n, TopK = topK, Score = RoutingScore.Sigmoid, Groups = 4, TopKGroups = 2 };
        var logits = Enumerable.Range(0, tokens * n).Select(_ => (float)(random.NextDouble() * 4 - 2)).ToArray();
        var (ids, weights, counters) = (new int[tokens * topK], new float[tokens * topK], new int[slots]);
        using (var layer = new WrappedLayer(tables, counters))
        using (var logitView = DeviceBuffer<float>.Wrap(logits.AsMemory()))
        using (var idView = DeviceBuffer<int>.Wrap(ids.AsMemory()))
        using (var weightView = DeviceBuffer<float>.Wrap(weights.AsMemory()))
            new Router(options, layer.State).Route(ComputeStream.Cpu, logitView, idView, weightView);
        var (wantIds, wantWeights, wantCounters) = (new int[ids.Length], new float[ids.Length], new int[slots]);
        using (var owned = new OwnedLayer(tables))
        {
            new Router(options, owned.State).Route(logits, wantIds, wantWeights);
            owned.Counters.CopyTo(wantCounters);
        }
        Assert.That(ids, Is.EqualTo(wantIds));
        Assert.That(weights, Is.EqualTo(wantWeights));
        Assert.That(counters, Is.EqualTo(wantCounters));
        Assert.That(counters.Sum(), Is.EqualTo(tokens * topK), "the router counted into the host's array");

        // Mapping, in place on the host's ids.
        var logical = Enumerable.Range(0, tokens * topK).Select(_ => random.Next(n)).ToArray();
        var mapped = (int[])logical.Clone();
        Array.Clear(counters);
        using (var layer = new WrappedLayer(tables, counters))
        using (var view = DeviceBuffer<int>.Wrap(mapped.AsMemory()))
            ExpertMapping.MapToPhysical(ComputeStream.Cpu, view, topK, layer.State, view);
        var wantMapped = new int[mapped.Length];
        var wantMapCounters = new int[slots];
        ExpertMapping.MapToPhysical(logical, topK,
            new HostLayerState { Log2Phy = tables.Log2Phy, LogCnt = tables.LogCnt, MaxReplicas = tables.MaxReplicas, Slots = slots, Counters = wantMapCounters },
            wantMapped);
        Assert.That(mapped, Is.EqualTo(wantMapped));
        Assert.That(counters, Is.EqualTo(wantMapCounters));

        // Dispatch: align into a layout over the host's arrays, permute and combine rows of host memory.
        const int hidden = 24, firstSlot = 8, perRank = 10, blockSize = 4;
        var capacity = (int)ExpertDispatch.AlignCapacity(mapped.Length, perRank, blockSize);
        int[] expertCounts = new int[perRank], expertOffsets = new int[perRank + 1], sorted = new int[capacity], blocks = new int[capacity / blockSize],
            positions = new int[mapped.Length];
        using (var physical = DeviceBuffer<int>.Wrap(mapped.AsMemory()))
        using (var c = DeviceBuffer<int>.Wrap(expertCounts.AsMemory()))
        using (var o = DeviceBuffer<int>.Wrap(expertOffsets.AsMemory()))
        using (var s = DeviceBuffer<int>.Wrap(sorted.AsMemory()))
        using (var b = DeviceBuffer<int>.Wrap(blocks.AsMemory()))
        using (var p = DeviceBuffer<int>.Wrap(positions.AsMemory()))
        using (var layout = new ExpertLayout(tokens, topK, firstSlot, perRank, blockSize, c, o, s, b, p))
            ExpertDispatch.Align(ComputeStream.Cpu, physical, layout);
        int[] hostCounts = new int[perRank], hostOffsets = new int[perRank + 1], hostSorted = new int[capacity], hostBlocks = new int[capacity / blockSize],
            hostPositions = new int[mapped.Length];
        ExpertDispatch.Align(mapped, new HostExpertLayout
        {
            TopK = topK, FirstSlot = firstSlot, SlotsPerRank = perRank, BlockSize = blockSize, ExpertCounts = hostCounts,
            ExpertOffsets = hostOffsets, SortedPairIds = hostSorted, BlockExperts = hostBlocks, PairPositions = hostPositions,
        });
        Assert.That(expertCounts, Is.EqualTo(hostCounts));
        Assert.That(expertOffsets, Is.EqualTo(hostOffsets));
        Assert.That(sorted, Is.EqualTo(hostSorted));
        Assert.That(blocks, Is.EqualTo(hostBlocks));
        Assert.That(positions, Is.EqualTo(hostPositions));

        var x = Enumerable.Range(0, tokens * hidden).Select(_ => (float)random.NextDouble()).ToArray();
        var rows = new float[capacity * hidden];
        var combined = new float[tokens * hidden];
        using (var xView = DeviceBuffer<float>.Wrap(x.AsMemory()))
        using (var rowView = DeviceBuffer<float>.Wrap(rows.AsMemory()))
        using (var sortedView = DeviceBuffer<int>.Wrap(sorted.AsMemory()))
        using (var total = new DeviceBuffer<int>(Backend.Cpu, [expertOffsets[perRank]]))
        using (var positionView = DeviceBuffer<int>.Wrap(positions.AsMemory()))
        using (var weightView = DeviceBuffer<float>.Wrap(weights.AsMemory()))
        using (var outView = DeviceBuffer<float>.Wrap(combined.AsMemory()))
        {
            ExpertDispatch.Permute<float>(ComputeStream.Cpu, xView, hidden, topK, sortedView, total, rowView);
            ExpertDispatch.Combine<float, float>(ComputeStream.Cpu, rowView, hidden, positionView, topK, weightView, outView);
        }
        var wantRows = new float[rows.Length];
        var wantCombined = new float[combined.Length];
        ExpertDispatch.Permute<float>(x, hidden, topK, sorted, expertOffsets[perRank], wantRows);
        ExpertDispatch.Combine<float, float>(wantRows, hidden, positions, topK, weights, wantCombined);
        Assert.That(rows, Is.EqualTo(wantRows));
        Assert.That(combined, Is.EqualTo(wantCombined));

        // The load window: the pass's counters move into the host's ring and sums.
        var window = new int[3 * slots];
        var sums = new long[slots];
        var passCounters = (int[])counters.Clone();
        using (var counterView = DeviceBuffer<int>.Wrap(passCounters.AsMemory()))
        using (var windowView = DeviceBuffer<int>.Wrap(window.AsMemory()))
        using (var sumView = DeviceBuffer<long>.Wrap(sums.AsMemory()))
            LoadWindow.Push(ComputeStream.Cpu, counterView, windowView, sumView, 3, 1);
        Assert.That(passCounters, Is.All.Zero);
        Assert.That(window[slots..(2 * slots)], Is.EqualTo(counters));
        Assert.That(sums, Is.EqualTo(counters.Select(v => (long)v)));
    }

    [Test]
    public void MegaMoeReadsAndWritesWrappedTensors()
    {
        var random = TestSupport.NewRandom();
        var shape = new MoeLayerShape(64, 64, 2, 8, 4, 4, 0.75f);
        const int tokens = 9;
        BFloat16[] Random(long count) => Enumerable.Range(0, (int)count).Select(_ => (BFloat16)(random.NextDouble() - 0.5)).ToArray();
        var x = Random(tokens * 64);
        var w1 = Random(shape.W1Length);
        var w2 = Random(shape.W2Length);
        var ids = Enumerable.Range(0, tokens * 2).Select(_ => random.Next(-1, 8)).ToArray();
        var weights = Enumerable.Range(0, tokens * 2).Select(_ => (float)random.NextDouble()).ToArray();
        var output = new BFloat16[tokens * 64];
        var workspace = new byte[MegaMoe.WorkspaceSize(shape, tokens)];
        using (var xv = DeviceBuffer<BFloat16>.Wrap(x.AsMemory()))
        using (var iv = DeviceBuffer<int>.Wrap(ids.AsMemory()))
        using (var wv = DeviceBuffer<float>.Wrap(weights.AsMemory()))
        using (var w1v = DeviceBuffer<BFloat16>.Wrap(w1.AsMemory()))
        using (var w2v = DeviceBuffer<BFloat16>.Wrap(w2.AsMemory()))
        using (var ov = DeviceBuffer<BFloat16>.Wrap(output.AsMemory()))
        using (var sv = DeviceBuffer<byte>.Wrap(workspace.AsMemory()))
            Assert.That(MegaMoe.Run(ComputeStream.Cpu, shape, new MoeTensors { X = xv, TopkIds = iv, TopkWeights = wv, W1 = w1v, W2 = w2v, Output = ov, Workspace = sv }),
                Is.EqualTo(MoeBackend.MegaMoe));
        var want = new BFloat16[output.Length];
        MegaMoe.Run(shape, new HostMoeTensors { X = x, TopkIds = ids, TopkWeights = weights, W1 = w1, W2 = w2, Output = want });
        Assert.That(output.Select(v => v.Bits), Is.EqualTo(want.Select(v => v.Bits)));
        Assert.That(output.Any(v => v.Bits != 0), Is.True, "the kernel wrote the host's output");
    }

    [Test]
    public void ExpertTensorsMoveExpertsBetweenWrappedMemories()
    {
        var random = TestSupport.NewRandom();
        const int slotsPerRank = 3, perExpert = 11;
        var a = Enumerable.Range(0, slotsPerRank * perExpert).Select(_ => (float)random.NextDouble()).ToArray();
        var b = new float[slotsPerRank * perExpert];
        var expected = (float[])a.Clone();
        using var av = DeviceBuffer<float>.Wrap(a.AsMemory());
        using var bv = DeviceBuffer<float>.Wrap(b.AsMemory());
        var from = ExpertTensor.Create("w13", av.AsSlice(), slotsPerRank);
        var to = ExpertTensor.Create("w13", bv.AsSlice(), slotsPerRank);
        to.CopySlotFrom(from, 2, 0);
        to.CopySlotFrom(from, 0, 2);
        Assert.That(b[..perExpert], Is.EqualTo(expected[(2 * perExpert)..]));
        Assert.That(b[(2 * perExpert)..], Is.EqualTo(expected[..perExpert]));
        Assert.That(b[perExpert..(2 * perExpert)], Is.All.Zero);
        a[2 * perExpert] = -3f;  // the host's write shows in what the tensor reads
        Assert.That(BitConverter.ToSingle(from.ReadSlot(2), 0), Is.EqualTo(-3f));
    }

    [Test, Category("GPU")]
    public void CudaMemoryWrappedByPointerIsTheSameMemory()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var values = Enumerable.Range(0, 1000).Select(_ => random.Next()).ToArray();
        using var device = new DeviceBuffer<int>(Backend.Cuda, values);
        using var wrapped = DeviceBuffer<int>.Wrap(Backend.Cuda, device.Device, device.Data, device.Length, device);
        Assert.That((wrapped.Backend, wrapped.Device, wrapped.IsWrapped), Is.EqualTo((Backend.Cuda, device.Device, true)));
        Assert.That(wrapped.ToArray(), Is.EqualTo(values));
        wrapped.Fill(5, 10, 20);
        Assert.That(device.ToArray()[10..30], Is.All.EqualTo(5));
        // Pageable host memory is not memory a CUDA kernel can use: refused with the address named.
        var host = (int*)NativeMemory.Alloc(16 * sizeof(int));
        try
        {
            Assert.Throws<ArgumentException>(() => DeviceBuffer<int>.Wrap(Backend.Cuda, device.Device, host, 16));
        }
        finally
        {
            NativeMemory.Free(host);
        }
    }

    // One layer's EPLB views over host arrays (tables copied into arrays this object holds).
    private sealed class WrappedLayer : IDisposable
    {
        private readonly DeviceBuffer<int>[] _buffers;

        public WrappedLayer(HostTables tables, int[] counters)
        {
            _buffers =
            [
                DeviceBuffer<int>.Wrap(((int[])tables.Log2Phy.Clone()).AsMemory()), DeviceBuffer<int>.Wrap(((int[])tables.LogCnt.Clone()).AsMemory()),
                DeviceBuffer<int>.Wrap(counters.AsMemory()), DeviceBuffer<int>.Wrap(new[] { 1 }.AsMemory()),
            ];
            State = new EplbLayerState(_buffers[0], _buffers[1], _buffers[2], _buffers[3], tables.LogicalExperts, tables.MaxReplicas, tables.Slots);
        }

        public EplbLayerState State { get; }

        public void Dispose()
        {
            foreach (var buffer in _buffers) buffer.Dispose();
        }
    }

    // The same views in buffers libeplb owns.
    private sealed class OwnedLayer : IDisposable
    {
        private readonly DeviceBuffer<int>[] _buffers;

        public OwnedLayer(HostTables tables)
        {
            _buffers =
            [
                new DeviceBuffer<int>(Backend.Cpu, tables.Log2Phy), new DeviceBuffer<int>(Backend.Cpu, tables.LogCnt),
                new DeviceBuffer<int>(Backend.Cpu, new int[tables.Slots]), new DeviceBuffer<int>(Backend.Cpu, [1]),
            ];
            State = new EplbLayerState(_buffers[0], _buffers[1], _buffers[2], _buffers[3], tables.LogicalExperts, tables.MaxReplicas, tables.Slots);
        }

        public EplbLayerState State { get; }

        public int[] Counters => _buffers[2].ToArray();

        public void Dispose()
        {
            foreach (var buffer in _buffers) buffer.Dispose();
        }
    }
}
