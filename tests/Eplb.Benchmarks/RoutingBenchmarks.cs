using BenchmarkDotNet.Attributes;

namespace Eplb.Benchmarks;

/// <summary>
/// The CPU routing kernels through <see cref="Router"/> (host-span form, EPLB off), on logits shaped
/// by a real load file: DeepSeek-V3 grouped sigmoid, V4 biased sqrtsoftplus, V4 hash, softmax.
/// </summary>
[MemoryDiagnoser]
public class RoutingBenchmarks
{
    private float[] _logits = [];
    private float[] _bias = [];
    private long[] _tokenIds = [];
    private int[] _tid2eid = [];
    private int[] _ids = [];
    private float[] _weights = [];
    private Router _v3 = null!;
    private Router _v4 = null!;
    private Router _softmax = null!;

    [Params(128, 4096)]
    public int Tokens { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var random = new Random(1);
        var layer = BenchData.Load("decode_in1000out1000").Layer(10).ToArray();
        var total = layer.Sum() + layer.Length;
        // log(load share) + Gumbel noise: top-k follows the recorded popularity.
        _logits = new float[Tokens * 256];
        for (var i = 0; i < _logits.Length; i++)
            _logits[i] = (float)(Math.Log((layer[i % 256] + 1) / total) - Math.Log(-Math.Log(1 - random.NextDouble())));
        _bias = Enumerable.Range(0, 256).Select(_ => (float)(0.01 * random.NextDouble())).ToArray();
        _tokenIds = Enumerable.Range(0, Tokens).Select(_ => (long)random.Next(129280)).ToArray();
        _tid2eid = Enumerable.Range(0, 129280 * 6).Select(_ => random.Next(256)).ToArray();
        _ids = new int[Tokens * 8];
        _weights = new float[Tokens * 8];
        _v3 = new Router(RouterOptions.DeepSeekV3);
        _v4 = new Router(new RouterOptions { LogicalExperts = 256, TopK = 6, RoutedScalingFactor = 1.5f });
        _softmax = new Router(new RouterOptions { LogicalExperts = 256, TopK = 8, Score = RoutingScore.Softmax });
    }

    [Benchmark]
    public void GroupedSigmoidV3() => _v3.Route(_logits, _ids, _weights, _bias);

    [Benchmark]
    public void BiasedSqrtSoftplusV4() => _v4.Route(_logits, _ids.AsSpan(0, Tokens * 6), _weights.AsSpan(0, Tokens * 6), _bias);

    [Benchmark]
    public void HashV4() => _v4.RouteByHash(_logits, _tokenIds, _tid2eid, _ids.AsSpan(0, Tokens * 6), _weights.AsSpan(0, Tokens * 6));

    [Benchmark]
    public void Softmax() => _softmax.Route(_logits, _ids, _weights);
}
