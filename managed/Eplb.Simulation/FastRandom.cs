namespace Eplb.Simulation;

/// <summary>
/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64: a small, fast generator whose
/// streams are fixed by their seed words, so every draw of the simulator depends on the seed and on
/// what is drawn (pass, layer, rank) only, never on thread timing. Not for cryptography.
/// </summary>
internal struct FastRandom
{
    private ulong _s0, _s1, _s2, _s3;

    /// <summary>A stream for the given seed words (e.g. seed, pass, layer, rank).</summary>
    public FastRandom(long seed, long a = 0, long b = 0, long c = 0)
    {
        var x = (ulong)seed;
        x = Mix(x ^ Mix((ulong)a + 0x9E3779B97F4A7C15UL) ^ Mix((ulong)b + 0xD1B54A32D192ED03UL) ^ Mix((ulong)c + 0x8CB92BA72F3D8DD7UL));
        _s0 = SplitMix(ref x);
        _s1 = SplitMix(ref x);
        _s2 = SplitMix(ref x);
        _s3 = SplitMix(ref x);
    }

    /// <summary>64 random bits.</summary>
    public ulong NextULong()
    {
        var result = ulong.RotateLeft(_s1 * 5, 7) * 9;
        var t = _s1 << 17;
        _s2 ^= _s0;
        _s3 ^= _s1;
        _s1 ^= _s2;
        _s0 ^= _s3;
        _s2 ^= t;
        _s3 = ulong.RotateLeft(_s3, 45);
        return result;
    }

    /// <summary>Uniform in [0, 1) with 53 bits.</summary>
    public double NextDouble() => (NextULong() >> 11) * (1.0 / (1UL << 53));

    /// <summary>Uniform in [0, n) (Lemire's multiply-shift; the bias is below 2^-32 for the n used here).</summary>
    public int NextInt(int n) => (int)(((NextULong() >> 32) * (ulong)(uint)n) >> 32);

    /// <summary>A geometric number of trials until the first success, mean <paramref name="mean"/> (at least 1).</summary>
    public int NextGeometric(double mean)
    {
        if (mean <= 1) return 1;
        var u = 1.0 - NextDouble();  // (0, 1]
        var value = Math.Ceiling(Math.Log(u) / Math.Log(1 - 1 / mean));
        return value >= int.MaxValue ? int.MaxValue : Math.Max(1, (int)value);
    }

    private static ulong SplitMix(ref ulong x)
    {
        x += 0x9E3779B97F4A7C15UL;
        return Mix(x);
    }

    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
