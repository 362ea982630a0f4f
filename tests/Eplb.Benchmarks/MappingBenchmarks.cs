using BenchmarkDotNet.Attributes;

namespace Eplb.Benchmarks;

/// <summary>The CPU mapping kernel (logical -> physical + load recording) on real-load-shaped ids.</summary>
[MemoryDiagnoser]
public class MappingBenchmarks
{
    private int[] _ids = [];
    private int[] _physical = [];
    private int[] _counters = [];
    private int[] _log2phy = [];
    private int[] _logcnt = [];

    [Params(128, 4096, 16384)]
    public int Tokens { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var random = new Random(1);
        var layer = BenchData.Load("decode_in1000out1000").Layer(10).ToArray();
        var total = layer.Sum();
        _ids = new int[Tokens * 8];
        for (var i = 0; i < _ids.Length; i++)
        {
            var pick = random.NextDouble() * total;
            var e = 0;
            while (e < 255 && (pick -= layer[e]) > 0) e++;
            _ids[i] = e;
        }
        // 256 experts + 32 replicas of the hottest: R = 288, Kmax = 4.
        var hottest = Enumerable.Range(0, 256).OrderByDescending(e => layer[e]).Take(32).ToArray();
        _logcnt = Enumerable.Repeat(1, 256).ToArray();
        _log2phy = Enumerable.Repeat(-1, 256 * 4).ToArray();
        for (var e = 0; e < 256; e++) _log2phy[e * 4] = e;
        for (var i = 0; i < 32; i++) _log2phy[hottest[i] * 4 + _logcnt[hottest[i]]++] = 256 + i;
        _physical = new int[_ids.Length];
        _counters = new int[288];
    }

    [Benchmark]
    public void MapAndRecord() =>
        ExpertMapping.MapToPhysical(_ids, 8, new HostLayerState { Log2Phy = _log2phy, LogCnt = _logcnt, MaxReplicas = 4, Slots = 288, Counters = _counters }, _physical);
}
