using BenchmarkDotNet.Attributes;

namespace Eplb.Benchmarks;

/// <summary>
/// The CPU reference of Mega MoE through the managed host-span API (the fused and the unfused
/// composition) on a scaled-down DeepSeek-V3 layer: hidden 1024, intermediate 256, top-8 of 256
/// experts drawn from a real layer, rank 0 of 8 (32 local experts). The GPU numbers are in
/// native/bench/bench_moe.cpp; this tracks the managed overhead and the reference's speed, which
/// bounds how large the GPU tests' CPU comparisons can be.
/// </summary>
[MemoryDiagnoser]
public class MegaMoeBenchmarks
{
    private static readonly MoeLayerShape Shape = MoeLayerShape.ForRank(1024, 256, 8, 256, ranks: 8, rank: 0);

    private int[] _ids = [];
    private float[] _weights = [];
    private BFloat16[] _x = [], _w1 = [], _w2 = [], _output = [];

    [Params(16, 128)]
    public int Tokens { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var random = new Random(1);
        var layer = BenchData.Load("decode_in1000out1000").Layer(10).ToArray();
        _ids = new int[Tokens * Shape.TopK];
        for (var t = 0; t < Tokens; t++)
        {
            var weights = (double[])layer.Clone();
            for (var k = 0; k < Shape.TopK; k++)
            {
                var pick = random.NextDouble() * weights.Sum();
                var e = 0;
                while (e < 255 && (pick -= weights[e]) > 0) e++;
                _ids[t * Shape.TopK + k] = e;
                weights[e] = 0;
            }
        }
        _weights = Enumerable.Repeat(1f / Shape.TopK, _ids.Length).ToArray();
        _x = Enumerable.Range(0, Tokens * Shape.Hidden).Select(i => (BFloat16)(float)Math.Sin(i)).ToArray();
        _w1 = Enumerable.Range(0, (int)Shape.W1Length).Select(i => (BFloat16)(0.03f * (float)Math.Cos(i))).ToArray();
        _w2 = Enumerable.Range(0, (int)Shape.W2Length).Select(i => (BFloat16)(0.06f * (float)Math.Sin(0.7 * i))).ToArray();
        _output = new BFloat16[Tokens * Shape.Hidden];
    }

    [Benchmark(Baseline = true)]
    public MoeBackend Fused() => MegaMoe.Run(Shape, Tensors);

    [Benchmark]
    public MoeBackend Unfused() => MegaMoe.Run(Shape, Tensors, moeBackend: MoeBackend.Unfused);

    private HostMoeTensors Tensors => new() { X = _x, TopkIds = _ids, TopkWeights = _weights, W1 = _w1, W2 = _w2, Output = _output };
}
