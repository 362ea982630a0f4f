namespace Eplb.Simulation;

/// <summary>
/// Independent routing draws from a recorded load, for tests that need plain multinomial traffic:
/// for each layer, <c>q ~ Dirichlet(A * p)</c> with <c>p</c> the layer's normalised load, then
/// <c>tokens * K</c> independent expert choices from <c>q</c> (repeats allowed within a token), laid
/// out as top-k ids <c>[T][K]</c>; a large A makes <c>q = p</c>. <c>eplb simulate</c> does not use it:
/// its traffic is drawn per request (<see cref="ServingSimulation"/>).
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
        // tokens * K independent draws from q (a multinomial in random order) with Walker's alias
        // method: O(N) to build, O(1) per draw.
        Span<double> scaled = n <= 1024 ? stackalloc double[n] : new double[n];
        Span<int> alias = n <= 1024 ? stackalloc int[n] : new int[n];
        Span<int> small = n <= 1024 ? stackalloc int[n] : new int[n];
        Span<int> large = n <= 1024 ? stackalloc int[n] : new int[n];
        int smallCount = 0, largeCount = 0;
        for (var e = 0; e < n; e++)
        {
            scaled[e] = q[e] / sum * n;
            alias[e] = e;
            if (scaled[e] < 1) small[smallCount++] = e;
            else large[largeCount++] = e;
        }
        while (smallCount > 0 && largeCount > 0)
        {
            var lo = small[--smallCount];
            var hi = large[largeCount - 1];
            alias[lo] = hi;
            scaled[hi] -= 1 - scaled[lo];
            if (scaled[hi] < 1)
            {
                largeCount--;
                small[smallCount++] = hi;
            }
        }
        while (largeCount > 0) scaled[large[--largeCount]] = 1;
        while (smallCount > 0) scaled[small[--smallCount]] = 1;  // rounding leftovers
        for (var i = 0; i < ids.Length; i++)
        {
            var u = _random.NextDouble() * n;
            var column = (int)u;
            if (column >= n) column = n - 1;
            ids[i] = u - column < scaled[column] ? column : alias[column];
        }
    }

    /// <summary>
    /// Draws one layer's router logits <c>[tokens * N]</c>: <c>log q + Gumbel noise</c>, with
    /// <c>q ~ Dirichlet(A p)</c>. Top-k of such a row is a draw of k distinct experts with probabilities
    /// proportional to q (the Gumbel-top-k trick), so a softmax top-k router reproduces the load.
    /// The noise comes from a fixed pool read at a random offset per token (cheap, still independent enough).
    /// </summary>
    public void SampleLogits(ReadOnlySpan<double> load, int tokens, Span<float> logits)
    {
        var n = load.Length;
        if (logits.Length != (long)tokens * n) throw new ArgumentException($"logits has {logits.Length} elements, need {tokens * n}", nameof(logits));
        var total = 0.0;
        foreach (var v in load) total += v;
        if (total <= 0) throw new ArgumentException("the layer has no load to sample from", nameof(load));
        Span<float> logQ = n <= 1024 ? stackalloc float[n] : new float[n];
        var sum = 0.0;
        Span<double> q = n <= 1024 ? stackalloc double[n] : new double[n];
        for (var e = 0; e < n; e++)
        {
            q[e] = load[e] > 0 ? Gamma(Concentration * load[e] / total) : 0;
            sum += q[e];
        }
        for (var e = 0; e < n; e++) logQ[e] = q[e] > 0 ? (float)Math.Log(q[e] / sum) : -1e30f;
        _gumbel ??= GumbelPool();
        for (var t = 0; t < tokens; t++)
        {
            var offset = _random.Next(GumbelPoolSize - n);
            var row = logits.Slice(t * n, n);
            var noise = _gumbel.AsSpan(offset, n);
            for (var e = 0; e < n; e++) row[e] = logQ[e] + noise[e];
        }
    }

    private const int GumbelPoolSize = 1 << 16;
    private float[]? _gumbel;

    private float[] GumbelPool()
    {
        var pool = new float[GumbelPoolSize];
        for (var i = 0; i < pool.Length; i++) pool[i] = (float)-Math.Log(-Math.Log(1e-12 + _random.NextDouble() * (1 - 2e-12)));
        return pool;
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

}
