using System.Globalization;
using System.Runtime.InteropServices;

namespace Eplb;

/// <summary>
/// A bfloat16 value: the upper 16 bits of an IEEE 754 single (1 sign, 8 exponent, 7 fraction
/// bits), the activation type of DeepSeek-class models. .NET 10 has no bfloat16 type, so this
/// is the element type of bf16 device buffers and kernels; its layout is the raw 16 bits
/// (<c>uint16_t</c> on the C ABI). Conversions from <see cref="float"/> round to nearest, ties to
/// even, as libeplb's kernels and torch do.
/// </summary>
[StructLayout(LayoutKind.Sequential, Size = 2)]
public readonly struct BFloat16 : IEquatable<BFloat16>, IComparable<BFloat16>, IFormattable
{
    private readonly ushort _bits;

    private BFloat16(ushort bits) => _bits = bits;

    /// <summary>Converts a single, rounding to nearest even (NaN stays NaN, overflow becomes infinity).</summary>
    public BFloat16(float value) => _bits = Round(value);

    /// <summary>The raw 16 bits.</summary>
    public ushort Bits => _bits;

    /// <summary>The value whose raw bits are <paramref name="bits"/>.</summary>
    public static BFloat16 FromBits(ushort bits) => new(bits);

    /// <summary>Positive zero.</summary>
    public static BFloat16 Zero => new(0x0000);

    /// <summary>One.</summary>
    public static BFloat16 One => new(0x3F80);

    /// <summary>A quiet NaN.</summary>
    public static BFloat16 NaN => new(0x7FC0);

    /// <summary>Positive infinity.</summary>
    public static BFloat16 PositiveInfinity => new(0x7F80);

    /// <summary>Negative infinity.</summary>
    public static BFloat16 NegativeInfinity => new(0xFF80);

    /// <summary>The largest finite value, about 3.39e38.</summary>
    public static BFloat16 MaxValue => new(0x7F7F);

    /// <summary>The most negative finite value.</summary>
    public static BFloat16 MinValue => new(0xFF7F);

    /// <summary>The smallest positive (subnormal) value, 2^-133.</summary>
    public static BFloat16 Epsilon => new(0x0001);

    /// <summary>Whether the value is NaN.</summary>
    public static bool IsNaN(BFloat16 value) => (value._bits & 0x7FFF) > 0x7F80;

    /// <summary>Whether the value is neither infinite nor NaN.</summary>
    public static bool IsFinite(BFloat16 value) => (value._bits & 0x7F80) != 0x7F80;

    /// <summary>Rounds a single to the nearest bfloat16 (ties to even).</summary>
    public static explicit operator BFloat16(float value) => new(value);

    /// <summary>Rounds a double to the nearest bfloat16 through a single (ties to even at each step).</summary>
    public static explicit operator BFloat16(double value) => new((float)value);

    /// <summary>Widens to a single; exact.</summary>
    public static implicit operator float(BFloat16 value) => BitConverter.UInt32BitsToSingle((uint)value._bits << 16);

    /// <summary>Widens to a double; exact.</summary>
    public static implicit operator double(BFloat16 value) => (float)value;

    /// <summary>IEEE equality: NaN equals nothing, +0 equals -0.</summary>
    public static bool operator ==(BFloat16 left, BFloat16 right) => (float)left == (float)right;

    /// <summary>IEEE inequality.</summary>
    public static bool operator !=(BFloat16 left, BFloat16 right) => (float)left != (float)right;

    /// <summary>IEEE ordering.</summary>
    public static bool operator <(BFloat16 left, BFloat16 right) => (float)left < (float)right;

    /// <summary>IEEE ordering.</summary>
    public static bool operator >(BFloat16 left, BFloat16 right) => (float)left > (float)right;

    /// <summary>IEEE ordering.</summary>
    public static bool operator <=(BFloat16 left, BFloat16 right) => (float)left <= (float)right;

    /// <summary>IEEE ordering.</summary>
    public static bool operator >=(BFloat16 left, BFloat16 right) => (float)left >= (float)right;

    /// <summary>Equality as <see cref="float.Equals(float)"/>: NaN equals NaN, +0 equals -0.</summary>
    public bool Equals(BFloat16 other) => ((float)this).Equals((float)other);

    /// <inheritdoc/>
    public override bool Equals(object? obj) => obj is BFloat16 other && Equals(other);

    /// <inheritdoc/>
    public override int GetHashCode() => ((float)this).GetHashCode();

    /// <summary>Orders as <see cref="float.CompareTo(float)"/> (NaN first).</summary>
    public int CompareTo(BFloat16 other) => ((float)this).CompareTo((float)other);

    /// <inheritdoc/>
    public override string ToString() => ((float)this).ToString(CultureInfo.InvariantCulture);

    /// <inheritdoc/>
    public string ToString(string? format, IFormatProvider? formatProvider) => ((float)this).ToString(format, formatProvider);

    // Add 0x7FFF plus the lowest kept bit, then truncate: round to nearest, ties to even; a
    // carry out of the fraction bumps the exponent, and past the largest finite value gives
    // infinity. NaN keeps its sign and becomes the quiet NaN (no payload can round to infinity).
    private static ushort Round(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (ushort)(((bits >> 16) & 0x8000u) | 0x7FC0u);
        var rounding = 0x7FFFu + ((bits >> 16) & 1u);
        return (ushort)((bits + rounding) >> 16);
    }
}
