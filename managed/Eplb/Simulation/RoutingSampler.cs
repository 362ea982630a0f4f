namespace Eplb.Simulation;

/// <summary>
/// Per-iteration routing drawn from a recorded load (the simulator's input, issue "eplb simulate"):
/// for each layer, <c>q ~ Dirichlet(A * p)</c> with <c>p</c> the layer's normalised load, then a
/// multinomial draw of <c>tokens * K</c> expert choices from <c>q</c>, laid out as top-k ids
/// <c>[T][K]</c> in random order. Real per-batch loads are far noisier than the run-long aggregates
/// in the dumps (TensorRT-LLM: ~11.9x mean at 256 tokens/rank vs 5-8x aggregated); the Dirichlet
/// concentration A sets that noise.
/// </summary>
public sealed class RoutingSampler
{
    private readonly Random _random;

    /// <summary>Creates a sampler with its own seeded generator.</summary>
    public RoutingSampler(int seed, double concentration = 192)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(concentration);
        _random = new Random(seed);
        Concentration = concentration;
    }

    /// <summary>A, the Dirichlet concentration (128-256 matches per-batch noise).</summary>
    public double Concentration { get; }

    /// <summary>Draws one layer's top-k ids <c>[tokens * topK]</c> from its load row.</summary>
    public void Sample(ReadOnlySpan<double> load, int tokens, int topK, Span<int> ids)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        if (ids.Length != tokens * topK) throw new ArgumentException($"ids has {ids.Length} elements, need {tokens * topK}", nameof(ids));
        var n = load.Length;
        var total = 0.0;
        foreach (var v in load) total += v;
        if (total <= 0) throw new ArgumentException("the layer has no load to sample from", nameof(load));

        // q ~ Dirichlet(A p): independent Gamma(A p_e, 1) draws, normalised.
        Span<double> q = n <= 1024 ? stackalloc double[n] : new double[n];
        var sum = 0.0;
        for (var e = 0; e < n; e++)
        {
            q[e] = load[e] > 0 ? Gamma(Concentration * load[e] / total) : 0;
            sum += q[e];
        }
        // Multinomial(tokens * K, q) by sequential binomials, written out as ids.
        var remaining = ids.Length;
        var mass = sum;
        var position = 0;
        for (var e = 0; e < n && remaining > 0; e++)
        {
            var count = e == n - 1 || mass <= 0 ? remaining : Binomial(remaining, Math.Clamp(q[e] / mass, 0, 1));
            ids.Slice(position, count).Fill(e);
            position += count;
            remaining -= count;
            mass -= q[e];
        }
        ids[position..].Fill(n - 1);
        _random.Shuffle(ids);
    }

    // Marsaglia-Tsang for shape >= 1, with the shape < 1 boost.
    private double Gamma(double shape)
    {
        if (shape < 1) return Gamma(shape + 1) * Math.Pow(_random.NextDouble(), 1 / shape);
        var d = shape - 1.0 / 3;
        var c = 1 / Math.Sqrt(9 * d);
        while (true)
        {
            double x, v;
            do
            {
                x = Normal();
                v = 1 + c * x;
            } while (v <= 0);
            v = v * v * v;
            var u = _random.NextDouble();
            if (u < 1 - 0.0331 * x * x * x * x || Math.Log(u) < 0.5 * x * x + d * (1 - v + Math.Log(v))) return d * v;
        }
    }

    private double Normal()
    {
        var u1 = 1.0 - _random.NextDouble();
        var u2 = _random.NextDouble();
        return Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
    }

    // Exact for small n*p (inversion), normal approximation with continuity correction otherwise.
    private int Binomial(int n, double p)
    {
        if (n == 0 || p <= 0) return 0;
        if (p >= 1) return n;
        var mean = n * p;
        if (mean < 30)
        {
            var q = 1 - p;
            var probability = Math.Pow(q, n);
            var cumulative = probability;
            var u = _random.NextDouble();
            var k = 0;
            while (u > cumulative && k < n)
            {
                probability *= (double)(n - k) / (k + 1) * p / q;
                cumulative += probability;
                k++;
            }
            return k;
        }
        var draw = (int)Math.Round(mean + Math.Sqrt(mean * (1 - p)) * Normal());
        return Math.Clamp(draw, 0, n);
    }
}
