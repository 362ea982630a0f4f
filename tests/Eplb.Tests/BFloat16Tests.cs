using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The managed bfloat16 type: round-to-nearest-even from float, exact widening, IEEE comparisons.</summary>
public class BFloat16Tests
{
    // The nearer of the two bf16 neighbours, ties to the even one, compared in double; past the
    // largest finite value the upper neighbour counts as 2^128 (IEEE overflow).
    private static ushort Nearest(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        var down = (ushort)(bits >> 16);
        if ((bits & 0xFFFF) == 0) return down;
        var up = (ushort)(down + 1);
        var upValue = float.IsInfinity((float)BFloat16.FromBits(up)) ? Math.CopySign(Math.Pow(2, 128), value) : (double)BFloat16.FromBits(up);
        var below = Math.Abs(value - (double)BFloat16.FromBits(down));
        var above = Math.Abs(value - upValue);
        if (below != above) return below < above ? down : up;
        return (down & 1) == 0 ? down : up;
    }

    [TestCase(1.0f, (ushort)0x3F80)]
    [TestCase(-1.5f, (ushort)0xBFC0)]
    [TestCase(0.0f, (ushort)0x0000)]
    [TestCase(-0.0f, (ushort)0x8000)]
    [TestCase(1.00390625f, (ushort)0x3F80)]         // 1 + 2^-8: halfway, ties to even (down)
    [TestCase(1.01171875f, (ushort)0x3F82)]         // 1 + 3 * 2^-8: halfway, ties to even (up)
    [TestCase(1.0039072f, (ushort)0x3F81)]          // just above 1 + 2^-8: up
    [TestCase(3.3961776e38f, (ushort)0x7F80)]       // halfway between the largest finite (odd) and infinity
    [TestCase(float.MaxValue, (ushort)0x7F80)]
    [TestCase(float.PositiveInfinity, (ushort)0x7F80)]
    [TestCase(float.NegativeInfinity, (ushort)0xFF80)]
    [TestCase(9.18355e-41f, (ushort)0x0001)]        // 2^-133, the smallest subnormal bf16
    public void RoundsToNearestEven(float value, ushort bits)
    {
        Assert.That(((BFloat16)value).Bits, Is.EqualTo(bits), $"{value:R}");
        Assert.That(Nearest(value), Is.EqualTo(bits), "the oracle agrees");
    }

    [Test]
    public void NaNStaysQuietNaNWithItsSign()
    {
        Assert.That(BFloat16.IsNaN((BFloat16)float.NaN));
        // A NaN whose payload lives only in the low bits must not round into infinity.
        var lowPayload = BitConverter.UInt32BitsToSingle(0x7F800001u);
        Assert.That(((BFloat16)lowPayload).Bits, Is.EqualTo(0x7FC0));
        Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0xFF800001u)).Bits, Is.EqualTo(0xFFC0));
        Assert.That(BFloat16.NaN == BFloat16.NaN, Is.False);
        Assert.That(BFloat16.NaN.Equals(BFloat16.NaN), Is.True);
    }

    [Test]
    public void EveryBf16SurvivesTheRoundTrip()
    {
        for (var bits = 0; bits <= ushort.MaxValue; bits++)
        {
            var value = BFloat16.FromBits((ushort)bits);
            if (BFloat16.IsNaN(value)) continue;
            Assert.That(((BFloat16)(float)value).Bits, Is.EqualTo((ushort)bits));
        }
    }

    [Test]
    public void RandomFloatsRoundToTheNearestNeighbour()
    {
        var random = TestSupport.NewRandom();
        for (var i = 0; i < 200_000; i++)
        {
            var value = BitConverter.UInt32BitsToSingle((uint)random.NextInt64(0, 1L << 32));
            if (float.IsNaN(value)) continue;
            Assert.That(((BFloat16)value).Bits, Is.EqualTo(Nearest(value)), $"{value:R}");
        }
    }

    [Test]
    public void ComparisonsFollowIeee()
    {
        Assert.That(BFloat16.FromBits(0x8000) == BFloat16.Zero, Is.True);
        Assert.That(BFloat16.One > BFloat16.Zero && BFloat16.MinValue < BFloat16.MaxValue, Is.True);
        Assert.That((float)BFloat16.MaxValue, Is.EqualTo(3.3895314e38f));
        Assert.That(BFloat16.IsFinite(BFloat16.MaxValue) && !BFloat16.IsFinite(BFloat16.PositiveInfinity), Is.True);
        Assert.That(((BFloat16)2.5f).ToString(), Is.EqualTo("2.5"));
        Assert.That(System.Runtime.CompilerServices.Unsafe.SizeOf<BFloat16>(), Is.EqualTo(2));
    }
}
