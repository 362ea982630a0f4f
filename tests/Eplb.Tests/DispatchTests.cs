using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The dispatch ops (docs/design.md §6) through the managed API: align/sort, EP bucketing, permute, combine.</summary>
public class DispatchTests
{
    private const int Pad = ExpertDispatch.Padding;

    private sealed record Aligned(int[] Counts, int[] Offsets, int[] Sorted, int[] Blocks, int[] Positions);

    private static Aligned Align(Backend backend, int[] ids, int topK, int firstSlot, int experts, int blockSize, long capacity = -1)
    {
        if (capacity < 0) capacity = ExpertDispatch.AlignCapacity(ids.Length, experts, blockSize);
        // Poisoned outputs, so unwritten elements show.
        var a = new Aligned(Poisoned(experts), Poisoned(experts + 1), Poisoned(capacity), Poisoned(capacity / blockSize), Poisoned(ids.Length));
        ExpertDispatch.Align(ids, HostLayout(topK, firstSlot, experts, blockSize, a.Counts, a.Offsets, a.Sorted, a.Blocks, a.Positions), backend);
        return a;
    }

    private static HostExpertLayout HostLayout(int topK, int firstSlot, int slotsPerRank, int blockSize, Span<int> counts, Span<int> offsets,
        Span<int> sorted, Span<int> blocks, Span<int> positions) => new()
    {
        TopK = topK,
        FirstSlot = firstSlot,
        SlotsPerRank = slotsPerRank,
        BlockSize = blockSize,
        ExpertCounts = counts,
        ExpertOffsets = offsets,
        SortedPairIds = sorted,
        BlockExperts = blocks,
        PairPositions = positions,
    };

    private static HostRankBuckets HostBuckets(int topK, int slots, int ranks, Span<int> counts, Span<int> offsets, Span<int> send,
        Span<int> positions) => new()
    {
        TopK = topK,
        Slots = slots,
        Ranks = ranks,
        RankCounts = counts,
        RankOffsets = offsets,
        SendPairIds = send,
        PairPositions = positions,
    };

    private static int[] Poisoned(long length) => Enumerable.Repeat(unchecked((int)0xDEADBEEF), checked((int)length)).ToArray();

    // Everything Align promises, checked against the definition element by element.
    private static void AssertValidAlignment(Aligned a, int[] ids, int firstSlot, int experts, int blockSize)
    {
        int ExpertOf(int slot) => slot >= firstSlot && slot < firstSlot + experts ? slot - firstSlot : -1;
        var counts = new int[experts];
        foreach (var slot in ids)
            if (ExpertOf(slot) >= 0) counts[ExpertOf(slot)]++;
        Assert.That(a.Counts, Is.EqualTo(counts));
        Assert.That(a.Offsets[0], Is.Zero);
        for (var e = 0; e < experts; e++)
            Assert.That(a.Offsets[e + 1] - a.Offsets[e], Is.EqualTo((counts[e] + blockSize - 1) / blockSize * blockSize), $"expert {e}");
        var total = a.Offsets[experts];
        for (var e = 0; e < experts; e++)
        {
            for (var row = a.Offsets[e]; row < a.Offsets[e + 1]; row++)
            {
                var pair = a.Sorted[row];
                if (row >= a.Offsets[e] + counts[e])
                {
                    Assert.That(pair, Is.EqualTo(Pad), $"padding row {row}");
                    continue;
                }
                Assert.That(ExpertOf(ids[pair]), Is.EqualTo(e), $"row {row}");
                Assert.That(a.Positions[pair], Is.EqualTo(row));
                if (row > a.Offsets[e]) Assert.That(pair, Is.GreaterThan(a.Sorted[row - 1]), "ascending pair order inside an expert");
            }
        }
        Assert.That(a.Sorted[total..], Is.All.EqualTo(Pad));
        for (var pair = 0; pair < ids.Length; pair++)
            if (ExpertOf(ids[pair]) < 0) Assert.That(a.Positions[pair], Is.EqualTo(Pad));
        for (var b = 0; b < a.Blocks.Length; b++)
        {
            var row = (long)b * blockSize;
            if (row >= total)
            {
                Assert.That(a.Blocks[b], Is.EqualTo(Pad));
                continue;
            }
            var e = a.Blocks[b];
            Assert.That(row, Is.GreaterThanOrEqualTo(a.Offsets[e]).And.LessThan(a.Offsets[e + 1]), $"block {b}");
        }
    }

    private static int[] RandomSlots(Random random, int count, int lo, int hi) =>
        Enumerable.Range(0, count).Select(_ => random.Next(lo, hi + 1)).ToArray();

    private static float[] RandomFloats(Random random, int count) =>
        Enumerable.Range(0, count).Select(_ => (float)(random.NextDouble() * 8 - 4)).ToArray();

    private static BFloat16[] RandomBf16(Random random, int count) => RandomFloats(random, count).Select(v => (BFloat16)v).ToArray();

    // Routing weights [tokens][topK] in [0.05, 1], rows normalised to sum 1.
    private static float[] RandomWeights(Random random, int tokens, int topK)
    {
        var w = new float[tokens * topK];
        for (var t = 0; t < tokens; t++)
        {
            var sum = 0f;
            for (var k = 0; k < topK; k++) sum += w[t * topK + k] = (float)(0.05 + 0.95 * random.NextDouble());
            for (var k = 0; k < topK; k++) w[t * topK + k] /= sum;
        }
        return w;
    }

    private static TOut[] Combine<TIn, TOut>(Backend backend, TIn[] y, int hidden, int[] positions, int topK, float[] weights, int tokens)
        where TIn : unmanaged where TOut : unmanaged
    {
        var output = new TOut[tokens * hidden];
        ExpertDispatch.Combine<TIn, TOut>(y, hidden, positions, topK, weights, output, backend);
        return output;
    }

    private static T[] Permute<T>(Backend backend, T[] x, int hidden, int topK, int[] rowIds, int numRows, T poison) where T : unmanaged
    {
        var output = Enumerable.Repeat(poison, rowIds.Length * hidden).ToArray();
        ExpertDispatch.Permute<T>(x, hidden, topK, rowIds, numRows, output, backend);
        return output;
    }

    // ---------------------------------------------------------------------------------------------
    // Align

    [Test]
    public void AlignGolden()
    {
        // Slots 1..4 are local (experts 0..3); slot 5 is another rank's, -1 not routed.
        // pairs: 0:3->e2 1:1->e0 2:1->e0 3:-1 4:5 5:3->e2 6:1->e0 7:2->e1
        int[] ids = [3, 1, 1, -1, 5, 3, 1, 2];
        var a = Align(Backend.Cpu, ids, 2, 1, 4, 4);
        Assert.That(a.Counts, Is.EqualTo(new[] { 3, 1, 2, 0 }));
        Assert.That(a.Offsets, Is.EqualTo(new[] { 0, 4, 8, 12, 12 }));
        Assert.That(a.Sorted, Is.EqualTo(new[] { 1, 2, 6, Pad, 7, Pad, Pad, Pad, 0, 5, Pad, Pad, Pad, Pad, Pad, Pad, Pad, Pad, Pad, Pad }));
        Assert.That(a.Blocks, Is.EqualTo(new[] { 0, 1, 2, Pad, Pad }));
        Assert.That(a.Positions, Is.EqualTo(new[] { 8, 0, 1, Pad, Pad, 9, 2, 4 }));
    }

    [TestCase(1), TestCase(16), TestCase(64), TestCase(128)]
    public void AlignAllTokensOnOneExpert(int blockSize)
    {
        var ids = Enumerable.Range(0, 37).SelectMany(_ => new[] { 5, -1 }).ToArray();
        var a = Align(Backend.Cpu, ids, 2, 0, 8, blockSize);
        Assert.That(a.Counts, Is.EqualTo(new[] { 0, 0, 0, 0, 0, 37, 0, 0 }));
        var padded = (37 + blockSize - 1) / blockSize * blockSize;
        Assert.That(a.Offsets, Is.EqualTo(new[] { 0, 0, 0, 0, 0, 0, padded, padded, padded }));
        Assert.That(a.Sorted[..37], Is.EqualTo(Enumerable.Range(0, 37).Select(t => 2 * t)));
        Assert.That(a.Sorted[37..], Is.All.EqualTo(Pad));
        Assert.That(a.Blocks, Is.EqualTo(Enumerable.Range(0, a.Blocks.Length).Select(b => b * blockSize < 37 ? 5 : Pad)));
    }

    [Test]
    public void AlignWithNoTokensOnThisRank()
    {
        var random = TestSupport.NewRandom();
        var ids = RandomSlots(random, 50 * 8, -1, 31);  // this rank holds slots 32..63
        var a = Align(Backend.Cpu, ids, 8, 32, 32, 16);
        Assert.That(a.Counts.Concat(a.Offsets), Is.All.Zero);
        Assert.That(a.Sorted.Concat(a.Blocks).Concat(a.Positions), Is.All.EqualTo(Pad));
    }

    [Test]
    public void AlignSingleToken()
    {
        int[] ids = [4, 0, 9, 3, 2, -1, 5, 6];  // local slots 2..5
        var a = Align(Backend.Cpu, ids, 8, 2, 4, 16);
        Assert.That(a.Offsets, Is.EqualTo(new[] { 0, 16, 32, 48, 64 }));
        Assert.That(a.Positions, Is.EqualTo(new[] { 32, Pad, Pad, 16, 0, Pad, 48, Pad }));
    }

    [Test, Repeat(20)]
    public void AlignRandomInputsSatisfyTheLayoutContract()
    {
        var random = TestSupport.NewRandom();
        var topK = random.Next(1, 10);
        var tokens = random.Next(0, 600);
        var experts = random.Next(1, 300);
        var first = random.Next(0, 64);
        var blockSize = new[] { 1, 3, 16, 64, 128 }[random.Next(5)];
        var ids = RandomSlots(random, tokens * topK, -1, first + experts + 20);
        AssertValidAlignment(Align(Backend.Cpu, ids, topK, first, experts, blockSize), ids, first, experts, blockSize);
    }

    [Test]
    public void AlignRealLoadsOverEightRanksHoldsEveryPairOnce([Values("decode_in1000out1000", "prefill_in4096")] string file)
    {
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad(file);
        foreach (var layer in new[] { 0, 29, 57 })
        {
            var ids = TestSupport.SampleTopK(random, load.Layer(layer), 1024, 8);
            var held = 0;
            for (var rank = 0; rank < 8; rank++)
            {
                var a = Align(Backend.Cpu, ids, 8, rank * 32, 32, 64);
                AssertValidAlignment(a, ids, rank * 32, 32, 64);
                held += a.Counts.Sum();
            }
            Assert.That(held, Is.EqualTo(ids.Length));
        }
    }

    // ---------------------------------------------------------------------------------------------
    // EP bucketing

    [Test]
    public void BucketByRankGolden()
    {
        // R = 8 over 4 ranks. pairs: 0:5->r2 1:0->r0 2:-1 3:7->r3 4:4->r2 5:1->r0
        int[] ids = [5, 0, -1, 7, 4, 1];
        int[] counts = new int[4], offsets = new int[5], send = new int[6], positions = new int[6];
        ExpertDispatch.BucketByRank(ids, HostBuckets(2, 8, 4, counts, offsets, send, positions));
        Assert.That(counts, Is.EqualTo(new[] { 2, 0, 2, 1 }));
        Assert.That(offsets, Is.EqualTo(new[] { 0, 2, 2, 4, 5 }));
        Assert.That(send, Is.EqualTo(new[] { 1, 5, 0, 4, 3, Pad }));
        Assert.That(positions, Is.EqualTo(new[] { 2, 0, Pad, 4, 3, 1 }));
    }

    [Test]
    public void BucketByRankOnRealLoadsGroupsEveryRoutedPair()
    {
        var random = TestSupport.NewRandom();
        var ids = TestSupport.SampleTopK(random, TestSupport.RealLoad("prefill_in1024").Layer(20), 2048, 8);
        for (var i = 0; i < ids.Length; i += 13) ids[i] = -1;  // some pairs not routed
        int[] counts = new int[8], offsets = new int[9], send = new int[ids.Length], positions = new int[ids.Length];
        ExpertDispatch.BucketByRank(ids, HostBuckets(8, 256, 8, counts, offsets, send, positions));
        Assert.That(counts, Is.EqualTo(Enumerable.Range(0, 8).Select(g => ids.Count(s => s >= 0 && s / 32 == g))));
        for (var g = 0; g < 8; g++)
        {
            for (var row = offsets[g]; row < offsets[g + 1]; row++)
            {
                Assert.That(ids[send[row]] / 32, Is.EqualTo(g));
                Assert.That(positions[send[row]], Is.EqualTo(row));
                if (row > offsets[g]) Assert.That(send[row], Is.GreaterThan(send[row - 1]));
            }
        }
        Assert.That(send[offsets[8]..], Is.All.EqualTo(Pad));
        Assert.That(Enumerable.Range(0, ids.Length).Where(p => ids[p] < 0).Select(p => positions[p]), Is.All.EqualTo(Pad));
    }

    // ---------------------------------------------------------------------------------------------
    // Permute and combine

    [Test]
    public void PermuteGatherRowsAndLeavesPaddingAlone()
    {
        var x = Enumerable.Range(0, 3).SelectMany(t => new[] { 10f * t, 10f * t + 1, 10f * t + 2 }).ToArray();
        var output = Permute(Backend.Cpu, x, 3, 2, [5, 0, Pad, 3, Pad, Pad], 4, -7f);
        Assert.That(output, Is.EqualTo(new[] { 20f, 21, 22, 0, 1, 2, -7, -7, -7, 10, 11, 12, -7, -7, -7, -7, -7, -7 }));
        var xb = x.Select(v => (BFloat16)v).ToArray();
        var outputb = Permute(Backend.Cpu, xb, 3, 2, [5, 0, Pad, 3, Pad, Pad], 4, BFloat16.NaN);
        Assert.That(outputb.Select(v => v.Bits), Is.EqualTo(output.Select(v => float.IsNaN(v) || v == -7 ? BFloat16.NaN.Bits : ((BFloat16)v).Bits)));
    }

    [Test]
    public void CombineGolden()
    {
        // y rows: 0:[1, 2] 1:[4, 8] 2:[0.5, -1] 3:[100, 100]; token 0 uses rows 1 and 0, token 1 row 2 twice.
        float[] y = [1, 2, 4, 8, 0.5f, -1, 100, 100];
        int[] positions = [1, Pad, 0, 2, 2, Pad];
        float[] weights = [0.5f, 9, 0.25f, 1, 2, 9];
        Assert.That(Combine<float, float>(Backend.Cpu, y, 2, positions, 3, weights, 2), Is.EqualTo(new[] { 2.25f, 4.5f, 1.5f, -3f }));
        Assert.That(Combine<float, float>(Backend.Cpu, y, 2, positions, 3, [], 2), Is.EqualTo(new[] { 5f, 10f, 1f, -2f }));
        // bf16 output rounds once to nearest even: 1 + 3 * 2^-9 -> 1 + 2^-7 (rounding each partial sum would keep 1.0).
        BFloat16[] yb = [BFloat16.One, BFloat16.FromBits(0x3B00), BFloat16.FromBits(0x3B00), BFloat16.FromBits(0x3B00)];
        Assert.That(Combine<BFloat16, BFloat16>(Backend.Cpu, yb, 1, [0, 1, 2, 3], 4, [], 1)[0].Bits, Is.EqualTo(0x3F81));
        Assert.That(Combine<BFloat16, float>(Backend.Cpu, yb, 1, [0, 1, 2, 3], 4, [], 1)[0], Is.EqualTo(1f + 3 * MathF.Pow(2, -9)));
    }

    [Test, Repeat(5)]
    public void RoundTripThroughAnIdentityExpertGivesXBack()
    {
        var random = TestSupport.NewRandom();
        var topK = random.Next(1, 9);
        var tokens = random.Next(1, 300);
        var hidden = random.Next(1, 40) * 8;
        var experts = random.Next(topK, 64);
        var ids = new int[tokens * topK];
        for (var t = 0; t < tokens; t++)
            for (var k = 0; k < topK; k++) ids[t * topK + k] = (t + 3 * k) % experts;
        var a = Align(Backend.Cpu, ids, topK, 0, experts, 16);
        var weights = RandomWeights(random, tokens, topK);

        var xb = RandomBf16(random, tokens * hidden);
        var rows = Permute(Backend.Cpu, xb, hidden, topK, a.Sorted, a.Offsets[experts], BFloat16.Zero);
        var back = Combine<BFloat16, BFloat16>(Backend.Cpu, rows, hidden, a.Positions, topK, weights, tokens);
        Assert.That(back.Select(v => v.Bits), Is.EqualTo(xb.Select(v => v.Bits)), "bf16: the fp32 sum is far inside half a bf16 ulp of x");

        var x = RandomFloats(random, tokens * hidden);
        var backf = Combine<float, float>(Backend.Cpu, Permute(Backend.Cpu, x, hidden, topK, a.Sorted, a.Offsets[experts], 0f), hidden,
            a.Positions, topK, weights, tokens);
        for (var i = 0; i < x.Length; i++)
            Assert.That(backf[i], Is.EqualTo(x[i]).Within(8 * topK * float.Epsilon + 8 * topK * 1.2e-7f * Math.Abs(x[i])));
    }

    [Test]
    public void DeviceFormsOnTheCpuBackendMatchTheHostForms()
    {
        var random = TestSupport.NewRandom();
        const int tokens = 333, topK = 8, hidden = 64, experts = 32, first = 64, blockSize = 32;
        var ids = TestSupport.SampleTopK(random, TestSupport.RealLoad("decode_in500out1500").Layer(40), tokens, topK);
        var x = RandomBf16(random, tokens * hidden);
        var weights = RandomWeights(random, tokens, topK);
        var stream = ComputeStream.Cpu;

        using var layout = ExpertLayout.Allocate(Backend.Cpu, tokens, topK, first, experts, blockSize);
        using var dIds = new DeviceBuffer<int>(Backend.Cpu, ids);
        using var dX = new DeviceBuffer<BFloat16>(Backend.Cpu, x);
        using var rows = new DeviceBuffer<BFloat16>(Backend.Cpu, layout.Capacity * hidden);
        rows.Fill(BFloat16.Zero);
        using var dWeights = new DeviceBuffer<float>(Backend.Cpu, weights);
        using var output = new DeviceBuffer<BFloat16>(Backend.Cpu, tokens * hidden);
        ExpertDispatch.Align(stream, dIds, layout);
        ExpertDispatch.Permute<BFloat16>(stream, dX, hidden, layout, rows);
        ExpertDispatch.Combine<BFloat16, BFloat16>(stream, rows, hidden, layout, dWeights, output);

        var a = Align(Backend.Cpu, ids, topK, first, experts, blockSize);
        Assert.That(layout.ExpertCounts.ToArray(), Is.EqualTo(a.Counts));
        Assert.That(layout.ExpertOffsets.ToArray(), Is.EqualTo(a.Offsets));
        Assert.That(layout.NumRows.ToArray(), Is.EqualTo(new[] { a.Offsets[experts] }));
        Assert.That(layout.SortedPairIds.ToArray(), Is.EqualTo(a.Sorted));
        Assert.That(layout.BlockExperts.ToArray(), Is.EqualTo(a.Blocks));
        Assert.That(layout.PairPositions.ToArray(), Is.EqualTo(a.Positions));
        var wantRows = Permute(Backend.Cpu, x, hidden, topK, a.Sorted, a.Offsets[experts], BFloat16.Zero);
        Assert.That(rows.ToArray().Select(v => v.Bits), Is.EqualTo(wantRows.Select(v => v.Bits)));
        var want = Combine<BFloat16, BFloat16>(Backend.Cpu, wantRows, hidden, a.Positions, topK, weights, tokens);
        Assert.That(output.ToArray().Select(v => v.Bits), Is.EqualTo(want.Select(v => v.Bits)));
    }

    // Expert parallelism over simulated ranks equals the single-rank result bit for bit.
    [Test]
    public void ExpertParallelRoundTripEqualsSingleRank()
    {
        var random = TestSupport.NewRandom();
        const int ranks = 8, physical = 256, perRank = physical / ranks, topK = 8, tokens = 512, hidden = 32;
        var ids = TestSupport.SampleTopK(random, TestSupport.RealLoad("prefill_in2048").Layer(12), tokens, topK);
        var x = RandomFloats(random, tokens * hidden);
        var weights = RandomWeights(random, tokens, topK);
        // Expert s scales by 2^(s % 5 - 2): exact, so every path sees the same products.
        float[] Expert(float[] rows, int[] sorted, int[] slotOfPair)
        {
            var result = new float[rows.Length];
            for (var r = 0; r < sorted.Length; r++)
                if (sorted[r] >= 0)
                    for (var h = 0; h < hidden; h++) result[r * hidden + h] = MathF.ScaleB(rows[r * hidden + h], slotOfPair[sorted[r]] % 5 - 2);
            return result;
        }

        var whole = Align(Backend.Cpu, ids, topK, 0, physical, 8);
        var wholeRows = Permute(Backend.Cpu, x, hidden, topK, whole.Sorted, whole.Offsets[physical], 0f);
        var expected = Combine<float, float>(Backend.Cpu, Expert(wholeRows, whole.Sorted, ids), hidden, whole.Positions, topK, weights, tokens);

        var stream = ComputeStream.Cpu;
        using var buckets = RankBuckets.Allocate(Backend.Cpu, tokens, topK, physical, ranks);
        using var dIds = new DeviceBuffer<int>(Backend.Cpu, ids);
        using var dX = new DeviceBuffer<float>(Backend.Cpu, x);
        using var send = new DeviceBuffer<float>(Backend.Cpu, (long)tokens * topK * hidden);
        send.Fill(0f);
        ExpertDispatch.BucketByRank(stream, dIds, buckets);
        ExpertDispatch.Permute<float>(stream, dX, hidden, buckets, send);
        var offsets = buckets.RankOffsets.ToArray();
        var sendIds = buckets.SendPairIds.ToArray();
        var sendRows = send.ToArray();
        var returned = new float[sendRows.Length];
        for (var g = 0; g < ranks; g++)
        {
            var count = offsets[g + 1] - offsets[g];
            var recvSlots = Enumerable.Range(offsets[g], count).Select(row => ids[sendIds[row]]).ToArray();
            var recv = sendRows[(offsets[g] * hidden)..(offsets[g + 1] * hidden)];
            var a = Align(Backend.Cpu, recvSlots, 1, g * perRank, perRank, 8);
            var rows = Permute(Backend.Cpu, recv, hidden, 1, a.Sorted, a.Offsets[perRank], 0f);
            var partial = Combine<float, float>(Backend.Cpu, Expert(rows, a.Sorted, recvSlots), hidden, a.Positions, 1, [], count);
            partial.CopyTo(returned, offsets[g] * hidden);
        }
        using var dReturned = new DeviceBuffer<float>(Backend.Cpu, returned);
        using var dWeights = new DeviceBuffer<float>(Backend.Cpu, weights);
        using var output = new DeviceBuffer<float>(Backend.Cpu, tokens * hidden);
        ExpertDispatch.Combine<float, float>(stream, dReturned, hidden, buckets, dWeights, output);
        Assert.That(output.ToArray(), Is.EqualTo(expected));
    }

    // ---------------------------------------------------------------------------------------------
    // Bad input

    [Test]
    public void BadInputThrowsAndWritesNothing()
    {
        int[] ids = [0, 1, 2, 3, 1, 0];
        int[] counts = Poisoned(4), offsets = Poisoned(5), sorted = Poisoned(18), blocks = Poisoned(4), positions = Poisoned(6);
        void Untouched() => Assert.That(counts.Concat(offsets).Concat(sorted).Concat(blocks).Concat(positions), Is.All.EqualTo(unchecked((int)0xDEADBEEF)));

        // Shapes the managed layer knows.
        Assert.Throws<ArgumentException>(() => ExpertDispatch.Align(ids, HostLayout(4, 0, 4, 4, counts, offsets, sorted, blocks, positions)));
        Assert.Throws<ArgumentException>(() => ExpertDispatch.Align(ids, HostLayout(2, 0, 4, 4, counts.AsSpan(1), offsets, sorted, blocks, positions)));
        Assert.Throws<ArgumentException>(() => ExpertDispatch.Align(ids, HostLayout(2, 0, 4, 4, counts, offsets, sorted, blocks.AsSpan(1), positions)));
        Assert.Throws<ArgumentOutOfRangeException>(() => ExpertDispatch.Align(ids, HostLayout(2, 0, 4, 0, counts, offsets, sorted, blocks, positions)));
        // What only the native layer checks: the capacity (18 = 6 + 4 * 3 needed) and the slot range.
        var capacity = Assert.Throws<ArgumentException>(() =>
            ExpertDispatch.Align(ids, HostLayout(2, 0, 4, 4, counts, offsets, sorted.AsSpan(1), blocks, positions)))!;
        Assert.That(capacity.Message, Does.Contain("capacity must be in [18"));
        var slot = Assert.Throws<ArgumentException>(() =>
            ExpertDispatch.BucketByRank([0, 1, 9, 3, 1, 0], HostBuckets(2, 8, 4, counts, offsets, sorted.AsSpan(0, 6), positions)))!;
        Assert.That(slot.Message, Does.Contain("physical_ids[1][0] = 9"));
        Untouched();

        float[] y = [1, 2, 3, 4], output = [7, 7];
        var position = Assert.Throws<ArgumentException>(() =>
            ExpertDispatch.Combine<float, float>(y, 2, [0, 2], 2, [], output))!;
        Assert.That(position.Message, Does.Contain("pair_positions[0][1] = 2"));
        var rows = Assert.Throws<ArgumentException>(() => ExpertDispatch.Permute<float>(y, 2, 1, [1, 0], 3, output.Concat(output).ToArray()))!;
        Assert.That(rows.Message, Does.Contain("*num_rows"));
        Assert.Throws<ArgumentException>(() => ExpertDispatch.Combine<float, float>(y, 2, [0, 1], 2, [1f], output));
        Assert.Throws<NotSupportedException>(() => ExpertDispatch.Combine<double, float>([1.0, 2.0], 2, [0], 1, [], output));
        Assert.That(output, Is.All.EqualTo(7f));
    }

    [Test]
    public void LayoutViewsAreCheckedAgainstTheShape()
    {
        using var counts = new DeviceBuffer<int>(Backend.Cpu, 4);
        using var offsets = new DeviceBuffer<int>(Backend.Cpu, 5);
        using var sorted = new DeviceBuffer<int>(Backend.Cpu, 18);
        using var blocks = new DeviceBuffer<int>(Backend.Cpu, 4);
        using var positions = new DeviceBuffer<int>(Backend.Cpu, 6);
        var layout = new ExpertLayout(3, 2, 0, 4, 4, counts, offsets, sorted, blocks, positions);
        Assert.That(layout.Capacity, Is.EqualTo(18));
        var small = Assert.Throws<ArgumentException>(() => new ExpertLayout(3, 2, 0, 4, 4, counts, offsets, sorted.Slice(0, 17), blocks, positions))!;
        Assert.That(small.Message, Does.Contain("sortedPairIds has 17 elements").And.Contain("need 18"));
        var missing = Assert.Throws<ArgumentException>(() => new ExpertLayout(3, 2, 0, 4, 4, counts, default, sorted, blocks, positions))!;
        Assert.That(missing.Message, Does.Contain("expertOffsets is required"));
        Assert.Throws<ArgumentException>(() => new RankBuckets(3, 2, 9, 4, counts, offsets, positions, positions));
        using var wrongStream = new DeviceBuffer<int>(Backend.Cpu, 7);
        Assert.Throws<ArgumentException>(() => ExpertDispatch.Align(ComputeStream.Cpu, wrongStream, layout));
    }

    // ---------------------------------------------------------------------------------------------
    // CUDA == CPU, bit for bit (poisoned outputs on both sides)

    [Test, Category("GPU")]
    public void CudaAlignAndBucketingMatchCpu()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        for (var iteration = 0; iteration < 20; iteration++)
        {
            var topK = random.Next(1, 10);
            var tokens = iteration == 0 ? 1 : random.Next(0, 20000);
            var experts = random.Next(1, 600);
            var first = random.Next(0, 64);
            var blockSize = 1 << random.Next(8);
            var ids = RandomSlots(random, tokens * topK, -1, first + experts + 40);
            var cpu = Align(Backend.Cpu, ids, topK, first, experts, blockSize);
            var gpu = Align(Backend.Cuda, ids, topK, first, experts, blockSize);
            Assert.That(gpu.Counts, Is.EqualTo(cpu.Counts));
            Assert.That(gpu.Offsets, Is.EqualTo(cpu.Offsets));
            Assert.That(gpu.Sorted, Is.EqualTo(cpu.Sorted));
            Assert.That(gpu.Blocks, Is.EqualTo(cpu.Blocks));
            Assert.That(gpu.Positions, Is.EqualTo(cpu.Positions));

            var ranks = random.Next(1, 33);
            var physical = ranks * random.Next(1, 40);
            var slots = RandomSlots(random, tokens * topK, -1, physical - 1);
            int[] Bucket(Backend backend)
            {
                int[] c = Poisoned(ranks), o = Poisoned(ranks + 1), s = Poisoned(slots.Length), p = Poisoned(slots.Length);
                ExpertDispatch.BucketByRank(slots, HostBuckets(topK, physical, ranks, c, o, s, p), backend);
                return [.. c, .. o, .. s, .. p];
            }
            Assert.That(Bucket(Backend.Cuda), Is.EqualTo(Bucket(Backend.Cpu)));
        }
    }

    [Test, Category("GPU")]
    public void CudaPipelineMatchesCpuOnRealLoads([Values("decode_in1000out1000", "prefill_in4096")] string file)
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        const int tokens = 4096, topK = 8, hidden = 7168;
        var ids = TestSupport.SampleTopK(random, TestSupport.RealLoad(file).Layer(30), tokens, topK);
        var x = RandomBf16(random, tokens * hidden);
        var weights = RandomWeights(random, tokens, topK);
        foreach (var (first, experts) in new[] { (0, 256), (224, 32) })
        {
            var a = Align(Backend.Cpu, ids, topK, first, experts, 128);
            var gpuAligned = Align(Backend.Cuda, ids, topK, first, experts, 128);
            Assert.That(gpuAligned.Sorted, Is.EqualTo(a.Sorted));
            Assert.That(gpuAligned.Positions, Is.EqualTo(a.Positions));
            var rows = Permute(Backend.Cpu, x, hidden, topK, a.Sorted, a.Offsets[experts], BFloat16.NaN);
            var gpuRows = Permute(Backend.Cuda, x, hidden, topK, a.Sorted, a.Offsets[experts], BFloat16.NaN);
            Assert.That(gpuRows.Select(v => v.Bits), Is.EqualTo(rows.Select(v => v.Bits)));
            var y = rows.Select(v => BFloat16.IsNaN(v) ? BFloat16.Zero : v).ToArray();
            Assert.That(Combine<BFloat16, BFloat16>(Backend.Cuda, y, hidden, a.Positions, topK, weights, tokens).Select(v => v.Bits),
                Is.EqualTo(Combine<BFloat16, BFloat16>(Backend.Cpu, y, hidden, a.Positions, topK, weights, tokens).Select(v => v.Bits)));
            Assert.That(Combine<BFloat16, float>(Backend.Cuda, y, hidden, a.Positions, topK, [], tokens),
                Is.EqualTo(Combine<BFloat16, float>(Backend.Cpu, y, hidden, a.Positions, topK, [], tokens)));
        }
    }

    [Test, Category("GPU")]
    public void CudaPermuteAndCombineMatchCpuOnAwkwardSizes([Values(1, 13, 100, 2050, 8192)] int hidden)
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var topK = random.Next(1, 9);
        var tokens = random.Next(1, 300);
        var ids = RandomSlots(random, tokens * topK, -1, 40);
        var a = Align(Backend.Cpu, ids, topK, 0, 32, 16);
        var x = RandomFloats(random, tokens * hidden);
        Assert.That(Permute(Backend.Cuda, x, hidden, topK, a.Sorted, a.Offsets[32], -7f),
            Is.EqualTo(Permute(Backend.Cpu, x, hidden, topK, a.Sorted, a.Offsets[32], -7f)));
        var y = RandomFloats(random, a.Sorted.Length * hidden);
        var weights = RandomWeights(random, tokens, topK);
        Assert.That(Combine<float, BFloat16>(Backend.Cuda, y, hidden, a.Positions, topK, weights, tokens).Select(v => v.Bits),
            Is.EqualTo(Combine<float, BFloat16>(Backend.Cpu, y, hidden, a.Positions, topK, weights, tokens).Select(v => v.Bits)));
        Assert.That(Combine<float, float>(Backend.Cuda, y, hidden, a.Positions, topK, weights, tokens),
            Is.EqualTo(Combine<float, float>(Backend.Cpu, y, hidden, a.Positions, topK, weights, tokens)));
    }

    [Test, Category("GPU")]
    public void CudaDeviceFormsMatchCpu()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        const int tokens = 1000, topK = 8, hidden = 256, experts = 32, first = 32, blockSize = 64;
        var ids = TestSupport.SampleTopK(random, TestSupport.RealLoad("prefill_in512").Layer(5), tokens, topK);
        var x = RandomBf16(random, tokens * hidden);
        var weights = RandomWeights(random, tokens, topK);
        using var stream = new ComputeStream(Backend.Cuda);
        using var layout = ExpertLayout.Allocate(Backend.Cuda, tokens, topK, first, experts, blockSize);
        using var dIds = new DeviceBuffer<int>(Backend.Cuda, ids);
        using var dX = new DeviceBuffer<BFloat16>(Backend.Cuda, x);
        using var rows = new DeviceBuffer<BFloat16>(Backend.Cuda, layout.Capacity * hidden);
        rows.Fill(BFloat16.Zero);
        using var dWeights = new DeviceBuffer<float>(Backend.Cuda, weights);
        using var output = new DeviceBuffer<BFloat16>(Backend.Cuda, tokens * hidden);
        ExpertDispatch.Align(stream, dIds, layout);
        ExpertDispatch.Permute<BFloat16>(stream, dX, hidden, layout, rows);
        ExpertDispatch.Combine<BFloat16, BFloat16>(stream, rows, hidden, layout, dWeights, output);
        stream.CheckDeviceErrors();

        var a = Align(Backend.Cpu, ids, topK, first, experts, blockSize);
        Assert.That(layout.SortedPairIds.ToArray(stream), Is.EqualTo(a.Sorted));
        Assert.That(layout.PairPositions.ToArray(stream), Is.EqualTo(a.Positions));
        var wantRows = Permute(Backend.Cpu, x, hidden, topK, a.Sorted, a.Offsets[experts], BFloat16.Zero);
        Assert.That(rows.ToArray(stream).Select(v => v.Bits), Is.EqualTo(wantRows.Select(v => v.Bits)));
        var want = Combine<BFloat16, BFloat16>(Backend.Cpu, wantRows, hidden, a.Positions, topK, weights, tokens);
        Assert.That(output.ToArray(stream).Select(v => v.Bits), Is.EqualTo(want.Select(v => v.Bits)));
    }
}
