using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace Eplb.TorchSharp.Tests;

/// <summary>Random inputs with a printed seed (replay with EPLB_TEST_SEED), and tensors made from them.</summary>
internal static class TestSupport
{
    public static Random NewRandom()
    {
        var seed = Environment.GetEnvironmentVariable("EPLB_TEST_SEED") is { Length: > 0 } fixedSeed ? int.Parse(fixedSeed) : Random.Shared.Next();
        TestContext.Out.WriteLine($"EPLB_TEST_SEED={seed}");
        return new Random(seed);
    }

    /// <summary>A float32 tensor of the shape, uniform in [-scale, scale).</summary>
    public static Tensor Uniform(Random random, float scale, params long[] shape)
    {
        var count = shape.Aggregate(1L, (a, b) => a * b);
        var values = new float[count];
        for (var i = 0; i < values.Length; i++) values[i] = (float)((random.NextDouble() * 2 - 1) * scale);
        return tensor(values).reshape(shape);
    }

    /// <summary>The tensor's bytes (for bit-for-bit comparisons of any element type).</summary>
    public static byte[] Bytes(Tensor tensor)
    {
        using var bytes = TensorMemory.WrapBytes(tensor.contiguous());
        return bytes.ToArray();
    }
}
