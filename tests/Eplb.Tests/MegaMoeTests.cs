using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Mega MoE (docs/design.md §7) through the managed API: CPU reference against a per-token oracle, the unfused path, bad input, and on a GPU the fused kernel.</summary>
public class MegaMoeTests
{
    /// <summary>One layer with host inputs (bf16 as raw bits).</summary>
    private sealed record Layer(MoeLayerShape Shape, int Tokens, BFloat16[] X, int[] Ids, float[] Weights, BFloat16[] W1, BFloat16[] W2);

    // bf16 written out independently of the library: round to nearest even on the raw bits.
    private static ushort ToBf16(float value)
    {
        if (float.IsNaN(value)) return 0x7FC0;
        var bits = BitConverter.SingleToUInt32Bits(value);
        bits += 0x7FFFu + ((bits >> 16) & 1u);
        return (ushort)(bits >> 16);
    }

    private static float FromBf16(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);

    private static float FromBf16(BFloat16 value) => FromBf16(value.Bits);

    private static BFloat16 Bf16(float value) => BFloat16.FromBits(ToBf16(value));

    private static float RoundBf16(double value) => FromBf16(ToBf16((float)value));

    private static BFloat16[] RandomBf16(Random random, long count, double scale) =>
        Enumerable.Range(0, checked((int)count)).Select(_ => Bf16((float)((random.NextDouble() * 2 - 1) * scale))).ToArray();

    private static Layer RandomLayer(Random random, MoeLayerShape shape, int tokens, int[]? ids = null)
    {
        ids ??= Enumerable.Range(0, tokens * shape.TopK).Select(_ => random.Next(-1, shape.Slots)).ToArray();
        return new Layer(shape, tokens,
            RandomBf16(random, (long)tokens * shape.Hidden, 1.0),
            ids,
            Enumerable.Range(0, ids.Length).Select(_ => (float)(0.01 + 0.99 * random.NextDouble())).ToArray(),
            RandomBf16(random, shape.W1Length, 1.7 / Math.Sqrt(shape.Hidden)),
            RandomBf16(random, shape.W2Length, 1.7 / Math.Sqrt(shape.Intermediate)));
    }

    private static MoeLayerShape RandomShape(Random random)
    {
        var experts = random.Next(1, 40);
        var local = random.Next(1, experts + 1);
        float[] limits = [0f, 0.05f, 0.5f, 10f];
        int[] tiles = [0, 32, 128];
        return new MoeLayerShape(64 * random.Next(1, 4), 64 * random.Next(1, 3), random.Next(1, 9), experts, local,
            random.Next(0, experts - local + 1), limits[random.Next(limits.Length)], tiles[random.Next(tiles.Length)]);
    }

    // docs/design.md §7 per token: double dot products, bf16 rounding of the intermediate, of each expert's
    // output row and of the sum; the combine in ascending k in fp32.
    private static ushort[] Oracle(Layer l)
    {
        var s = l.Shape;
        int h = s.Hidden, inter = s.Intermediate;
        var output = new ushort[l.Tokens * h];
        var act = new float[inter];
        var sum = new float[h];
        for (var t = 0; t < l.Tokens; t++)
        {
            Array.Clear(sum);
            for (var k = 0; k < s.TopK; k++)
            {
                var e = l.Ids[t * s.TopK + k] - s.FirstSlot;
                if (e < 0 || e >= s.SlotsPerRank) continue;
                for (var j = 0; j < inter; j++)
                {
                    double gate = 0, up = 0;
                    for (var c = 0; c < h; c++)
                    {
                        double x = FromBf16(l.X[t * h + c]);
                        gate += x * FromBf16(l.W1[((long)e * 2 * inter + j) * h + c]);
                        up += x * FromBf16(l.W1[((long)e * 2 * inter + inter + j) * h + c]);
                    }
                    if (s.SwigluLimit > 0)
                    {
                        gate = Math.Min(gate, s.SwigluLimit);
                        up = Math.Clamp(up, -s.SwigluLimit, s.SwigluLimit);
                    }
                    act[j] = RoundBf16(gate / (1 + Math.Exp(-gate)) * up);
                }
                var w = l.Weights[t * s.TopK + k];
                for (var n = 0; n < h; n++)
                {
                    double y = 0;
                    for (var j = 0; j < inter; j++) y += act[j] * (double)FromBf16(l.W2[((long)e * h + n) * inter + j]);
                    sum[n] += w * RoundBf16(y);
                }
            }
            for (var n = 0; n < h; n++) output[t * h + n] = ToBf16(sum[n]);
        }
        return output;
    }

    // The oracle accumulates in double where libeplb accumulates in fp32 in tile order, so its bf16
    // activations and outputs round apart now and then: it checks the math at twice the tolerance of
    // the same-rounding comparisons (GPU vs CPU reference).
    private const double OracleTolerance = 2e-2;

    // No NaN (the poison), and every element within the tolerance of the reference relative to the
    // larger of |want| and the RMS of the token's reference row (a sum of K rows can cancel far below
    // its terms), or within two bf16 steps of want.
    private static void AssertClose(ushort[] got, ushort[] want, int hidden, string what, double tolerance = 1e-2)
    {
        Assert.That(got, Has.Length.EqualTo(want.Length));
        for (var row = 0; row * hidden < want.Length; row++)
        {
            var rms = Math.Sqrt(Enumerable.Range(0, hidden).Average(n => Math.Pow(FromBf16(want[row * hidden + n]), 2)));
            for (var n = 0; n < hidden; n++)
            {
                var i = row * hidden + n;
                double g = FromBf16(got[i]), w = FromBf16(want[i]);
                Assert.That(double.IsNaN(g), Is.False, $"{what}: element {i} (token {row}) is NaN: not written");
                var step = Math.ScaleB(1.0, Math.ILogB(Math.Max(Math.Abs(w), 1e-30)) - 7);
                if (Math.Abs(g - w) <= 2 * step) continue;
                var scale = Math.Max(Math.Abs(w), rms);
                var error = scale > 0 ? Math.Abs(g - w) / scale : Math.Abs(g - w);
                Assert.That(error, Is.LessThanOrEqualTo(tolerance), $"{what}: element {i}: got {g}, want {w}");
            }
        }
    }

    private static ushort[] RunHost(Layer l, Backend backend = Backend.Cpu, MoeBackend path = MoeBackend.MegaMoe)
    {
        var output = Enumerable.Repeat(BFloat16.FromBits(0xFFFF), l.Tokens * l.Shape.Hidden).ToArray();
        var ran = MegaMoe.Run(l.Shape, Host(l.X, l.Ids, l.Weights, l.W1, l.W2, output), backend, path);
        Assert.That(ran, Is.EqualTo(path));
        return Bits(output);
    }

    private static MoeTensors Tensors(DeviceSlice<BFloat16> x, DeviceSlice<int> ids, DeviceSlice<float> weights, DeviceSlice<BFloat16> w1,
        DeviceSlice<BFloat16> w2, DeviceSlice<BFloat16> output, DeviceSlice<byte> workspace) =>
        new() { X = x, TopkIds = ids, TopkWeights = weights, W1 = w1, W2 = w2, Output = output, Workspace = workspace };

    private static HostMoeTensors Host(ReadOnlySpan<BFloat16> x, ReadOnlySpan<int> ids, ReadOnlySpan<float> weights, ReadOnlySpan<BFloat16> w1,
        ReadOnlySpan<BFloat16> w2, Span<BFloat16> output) =>
        new() { X = x, TopkIds = ids, TopkWeights = weights, W1 = w1, W2 = w2, Output = output };

    private static ushort[] Bits(BFloat16[] values) => values.Select(v => v.Bits).ToArray();

    [Test]
    public void HandComputedLayer()
    {
        // H = I = 64, two local experts, one token x = e0, routed to both with weights 0.5 and 0.25.
        var shape = new MoeLayerShape(64, 64, 2, 2, 2, 0);
        var w1 = new BFloat16[shape.W1Length];
        var w2 = new BFloat16[shape.W2Length];
        // Expert 0: gate 20, up 0.5 -> h0 = silu(20) * 0.5 = 10 (silu(20) is 20 in fp32); y0 = y1 = 10 * 0.25.
        w1[0] = Bf16(20f);
        w1[64 * 64] = Bf16(0.5f);
        w2[0 * 64] = Bf16(0.25f);
        w2[1 * 64] = Bf16(0.25f);
        // Expert 1: gate 20, up -1 -> h0 = -20; y1 = h0.
        w1[2 * 64 * 64] = Bf16(20f);
        w1[3 * 64 * 64] = Bf16(-1f);
        w2[64 * 64 + 1 * 64] = Bf16(1f);
        var x = new BFloat16[64];
        x[0] = Bf16(1f);
        var layer = new Layer(shape, 1, x, [0, 1], [0.5f, 0.25f], w1, w2);
        var want = new float[64];
        want[0] = 1.25f;          // 0.5 * 2.5
        want[1] = 1.25f - 5f;     // 0.5 * 2.5 + 0.25 * -20
        foreach (var path in new[] { MoeBackend.MegaMoe, MoeBackend.Unfused })
            Assert.That(RunHost(layer, Backend.Cpu, path).Select(FromBf16), Is.EqualTo(want), path.ToString());
    }

    [Test, Repeat(8)]
    public void RandomLayersMatchThePerTokenOracle()
    {
        var random = TestSupport.NewRandom();
        var layer = RandomLayer(random, RandomShape(random), random.Next(1, 40));
        var got = RunHost(layer);
        AssertClose(got, Oracle(layer), layer.Shape.Hidden, layer.Shape.ToString(), OracleTolerance);
        // Tokens without a local expert are exactly +0.
        var s = layer.Shape;
        for (var t = 0; t < layer.Tokens; t++)
        {
            var local = Enumerable.Range(0, s.TopK).Any(k => layer.Ids[t * s.TopK + k] - s.FirstSlot is var e && e >= 0 && e < s.SlotsPerRank);
            if (!local) Assert.That(got.Skip(t * s.Hidden).Take(s.Hidden), Is.All.EqualTo((ushort)0), $"token {t}");
        }
    }

    [Test]
    public void FusedAndUnfusedAgreeBitForBitOnTheCpu()
    {
        var random = TestSupport.NewRandom();
        for (var i = 0; i < 5; i++)
        {
            var layer = RandomLayer(random, RandomShape(random), random.Next(1, 30));
            Assert.That(RunHost(layer, Backend.Cpu, MoeBackend.Unfused), Is.EqualTo(RunHost(layer)));
        }
    }

    [Test]
    public void RealLoadIdsOnOneOfEightRanks()
    {
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad("decode_in1000out1000");
        var shape = MoeLayerShape.ForRank(128, 64, 8, 256, ranks: 8, rank: 5, swigluLimit: 10f);
        var ids = TestSupport.SampleTopK(random, load.Layer(25), 40, 8);
        var layer = RandomLayer(random, shape, 40, ids);
        AssertClose(RunHost(layer), Oracle(layer), shape.Hidden, "decode_in1000out1000 layer 25, rank 5 of 8", OracleTolerance);
    }

    [Test]
    public void DeviceSliceFormOnACpuStream()
    {
        var random = TestSupport.NewRandom();
        var layer = RandomLayer(random, new MoeLayerShape(128, 64, 4, 16, 8, 4, 0.5f), 21);
        var stream = ComputeStream.Cpu;
        using var x = new DeviceBuffer<BFloat16>(Backend.Cpu, layer.X);
        using var ids = new DeviceBuffer<int>(Backend.Cpu, layer.Ids);
        using var weights = new DeviceBuffer<float>(Backend.Cpu, layer.Weights);
        using var w1 = new DeviceBuffer<BFloat16>(Backend.Cpu, layer.W1);
        using var w2 = new DeviceBuffer<BFloat16>(Backend.Cpu, layer.W2);
        using var output = new DeviceBuffer<BFloat16>(Backend.Cpu, 21 * 128);
        output.Fill(BFloat16.FromBits(0xFFFF));
        using var workspace = new DeviceBuffer<byte>(Backend.Cpu, MegaMoe.WorkspaceSize(layer.Shape, 21));
        Assert.That(MegaMoe.Run(stream, layer.Shape, Tensors(x, ids, weights, w1, w2, output, workspace)), Is.EqualTo(MoeBackend.MegaMoe));
        Assert.That(Bits(output.ToArray()), Is.EqualTo(RunHost(layer)));
        AssertClose(Bits(output.ToArray()), Oracle(layer), 128, "device-slice form", OracleTolerance);
    }

    [Test]
    public void WorkspaceAndGridQueries()
    {
        var shape = MoeLayerShape.DeepSeekV3(ranks: 8, rank: 3);
        Assert.That((shape.SlotsPerRank, shape.FirstSlot, shape.TopK, shape.Hidden), Is.EqualTo((32, 96, 8, 7168)));
        long previous = 0;
        foreach (var tokens in new[] { 0, 1, 128, 4096 })
        {
            var bytes = MegaMoe.WorkspaceSize(shape, tokens);
            Assert.That(bytes, Is.GreaterThanOrEqualTo((long)tokens * 8 * (7168 + 2048) * 2));
            Assert.That(bytes, Is.GreaterThanOrEqualTo(previous));
            previous = bytes;
        }
        var flash = MoeLayerShape.DeepSeekV4Flash();
        Assert.That(MegaMoe.MaxCooperativeGrid(ComputeStream.Cpu, flash, 128, out var decodeTile), Is.EqualTo(1));
        Assert.That(decodeTile, Is.EqualTo(32));
        MegaMoe.MaxCooperativeGrid(ComputeStream.Cpu, flash, 4096, out var prefillTile);
        Assert.That(prefillTile, Is.EqualTo(128));
        Assert.Throws<ArgumentException>(() => MoeLayerShape.ForRank(4096, 2048, 6, 256, ranks: 3, rank: 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => MoeLayerShape.ForRank(4096, 2048, 6, 256, ranks: 8, rank: 8));
    }

    [Test]
    public void BadInputThrowsAndWritesNothing()
    {
        var random = TestSupport.NewRandom();
        var layer = RandomLayer(random, new MoeLayerShape(64, 64, 2, 8, 4, 2), 5);
        var output = Enumerable.Repeat(BFloat16.FromBits(0xABCD), 5 * 64).ToArray();
        void Untouched() => Assert.That(Bits(output), Is.All.EqualTo((ushort)0xABCD));

        // Sizes the managed layer checks.
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(layer.Shape, Host(layer.X.AsSpan(1), layer.Ids, layer.Weights, layer.W1, layer.W2, output)));
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(layer.Shape, Host(layer.X, layer.Ids.AsSpan(1), layer.Weights, layer.W1, layer.W2, output)));
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(layer.Shape, Host(layer.X, layer.Ids, layer.Weights.AsSpan(2), layer.W1, layer.W2, output)));
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(layer.Shape, Host(layer.X, layer.Ids, layer.Weights, layer.W1.AsSpan(1), layer.W2, output)));
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(layer.Shape, Host(layer.X, layer.Ids, layer.Weights, layer.W1, layer.W2.AsSpan(64), output)));
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(layer.Shape, Host(layer.X, layer.Ids, layer.Weights, layer.W1, layer.W2, output.AsSpan(1))));
        // Shape fields the native layer checks; the message names the field.
        var badLimit = layer.Shape with { SwigluLimit = -1f };
        var e = Assert.Throws<ArgumentException>(() => MegaMoe.Run(badLimit, Host(layer.X, layer.Ids, layer.Weights, layer.W1, layer.W2, output)));
        Assert.That(e!.Message, Does.Contain("swiglu_limit"));
        var badTile = layer.Shape with { BlockM = 64 };
        e = Assert.Throws<ArgumentException>(() => MegaMoe.Run(badTile, Host(layer.X, layer.Ids, layer.Weights, layer.W1, layer.W2, output)));
        Assert.That(e!.Message, Does.Contain("block_m"));
        var outside = layer.Shape with { FirstSlot = 6 };
        Assert.Throws<ArgumentException>(() => MegaMoe.Run(outside, Host(layer.X, layer.Ids, layer.Weights, layer.W1, layer.W2, output)));
        Untouched();

        // Device-slice form: a small workspace and a view on the wrong backend.
        using var x = new DeviceBuffer<BFloat16>(Backend.Cpu, layer.X);
        using var ids = new DeviceBuffer<int>(Backend.Cpu, layer.Ids);
        using var weights = new DeviceBuffer<float>(Backend.Cpu, layer.Weights);
        using var w1 = new DeviceBuffer<BFloat16>(Backend.Cpu, layer.W1);
        using var w2 = new DeviceBuffer<BFloat16>(Backend.Cpu, layer.W2);
        using var outBuffer = new DeviceBuffer<BFloat16>(Backend.Cpu, output);
        using var workspace = new DeviceBuffer<byte>(Backend.Cpu, MegaMoe.WorkspaceSize(layer.Shape, 5));
        e = Assert.Throws<ArgumentException>(() => MegaMoe.Run(ComputeStream.Cpu, layer.Shape, Tensors(x, ids, weights, w1, w2, outBuffer, workspace.Slice(0, workspace.Length - 1))));
        Assert.That(e!.Message, Does.Contain("Workspace"));
        Assert.Throws<ArgumentNullException>(() => MegaMoe.RunUnfused(ComputeStream.Cpu, layer.Shape, Tensors(x, default, weights, w1, w2, outBuffer, workspace)));
        Assert.Throws<ArgumentOutOfRangeException>(() => MegaMoe.RunFused(ComputeStream.Cpu, layer.Shape, Tensors(x, ids, weights, w1, w2, outBuffer, workspace), -1));
        Assert.That(Bits(outBuffer.ToArray()), Is.All.EqualTo((ushort)0xABCD));
        if (EplbRuntime.IsAvailable(Backend.Cuda))
        {
            using var cudaStream = new ComputeStream(Backend.Cuda);
            Assert.Throws<ArgumentException>(() => MegaMoe.Run(cudaStream, layer.Shape, Tensors(x, ids, weights, w1, w2, outBuffer, workspace)));
        }
    }

    // --- GPU ------------------------------------------------------------------------------------

    private static ushort[] RunOnCuda(Layer l, MoeBackend path, int gridBlocks = 0, MoeFallback fallback = MoeFallback.Throw)
    {
        using var stream = new ComputeStream(Backend.Cuda);
        using var x = new DeviceBuffer<BFloat16>(Backend.Cuda, l.X);
        using var ids = new DeviceBuffer<int>(Backend.Cuda, l.Ids);
        using var weights = new DeviceBuffer<float>(Backend.Cuda, l.Weights);
        using var w1 = new DeviceBuffer<BFloat16>(Backend.Cuda, l.W1);
        using var w2 = new DeviceBuffer<BFloat16>(Backend.Cuda, l.W2);
        using var output = new DeviceBuffer<BFloat16>(Backend.Cuda, (long)l.Tokens * l.Shape.Hidden);
        output.Fill(BFloat16.FromBits(0xFFFF));  // bf16 NaN: an unwritten element shows
        using var workspace = new DeviceBuffer<byte>(Backend.Cuda, MegaMoe.WorkspaceSize(l.Shape, l.Tokens));
        if (path == MoeBackend.Unfused)
            MegaMoe.RunUnfused(stream, l.Shape, Tensors(x, ids, weights, w1, w2, output, workspace));
        else
            Assert.That(MegaMoe.Run(stream, l.Shape, Tensors(x, ids, weights, w1, w2, output, workspace), fallback, gridBlocks),
                Is.EqualTo(fallback == MoeFallback.Throw ? MoeBackend.MegaMoe : MoeBackend.Unfused));
        stream.CheckDeviceErrors();
        return Bits(output.ToArray(stream));
    }

    [Test, Category("GPU")]
    public void CudaFusedAndUnfusedMatchTheCpuReference()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        for (var i = 0; i < 12; i++)
        {
            var layer = RandomLayer(random, RandomShape(random), i == 0 ? 1 : random.Next(1, 300));
            var want = RunHost(layer);
            var fused = RunOnCuda(layer, MoeBackend.MegaMoe);
            AssertClose(fused, want, layer.Shape.Hidden, "fused " + layer.Shape);
            var unfused = RunOnCuda(layer, MoeBackend.Unfused);
            Assert.That(unfused, Is.EqualTo(fused), "the two GPU paths share tiles and accumulation order");
            Assert.That(RunOnCuda(layer, MoeBackend.MegaMoe), Is.EqualTo(fused), "bitwise repeatable");
        }
    }

    [Test, Category("GPU")]
    public void CudaRealLoadIdsOnOneOfEightRanks()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var load = TestSupport.RealLoad("prefill_in4096");
        var shape = MoeLayerShape.ForRank(512, 256, 8, 256, ranks: 8, rank: 2, swigluLimit: 10f);
        foreach (var tokens in new[] { 1, 128, 777 })
        {
            var layer = RandomLayer(random, shape, tokens, TestSupport.SampleTopK(random, load.Layer(40), tokens, 8));
            AssertClose(RunOnCuda(layer, MoeBackend.MegaMoe), RunHost(layer), shape.Hidden, $"T={tokens}");
        }
    }

    [Test, Category("GPU")]
    public void OversizedGridFallsBackToTheUnfusedPathOrThrows()
    {
        TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        var layer = RandomLayer(random, new MoeLayerShape(128, 64, 4, 16, 16, 0), 33);
        using var stream = new ComputeStream(Backend.Cuda);
        var max = MegaMoe.MaxCooperativeGrid(stream, layer.Shape, 33, out _);
        Assert.That(max, Is.GreaterThan(0));
        var e = Assert.Throws<EplbException>(() => RunOnCuda(layer, MoeBackend.MegaMoe, max + 1));
        Assert.That(e!.Status, Is.EqualTo(EplbStatus.CooperativeLaunchUnavailable));
        var fallback = RunOnCuda(layer, MoeBackend.MegaMoe, max + 1, MoeFallback.Unfused);
        AssertClose(fallback, Oracle(layer), 128, "unfused fallback", OracleTolerance);
    }
}
