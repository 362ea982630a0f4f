using BenchmarkDotNet.Attributes;

namespace Eplb.Benchmarks;

/// <summary>
/// The CPU dispatch kernels through the managed host-span API at DeepSeek-V3 shapes: top-8 of 256
/// experts drawn from a real layer, rank 0 of 8 (32 local experts), hidden 7168 bf16, block 128.
/// </summary>
[MemoryDiagnoser]
public class DispatchBenchmarks
{
    private const int TopK = 8;
    private const int Hidden = 7168;
    private const int LocalExperts = 32;
    private const int BlockSize = 128;

    private int[] _ids = [];
    private int[] _counts = [], _offsets = [], _sorted = [], _blocks = [], _positions = [];
    private BFloat16[] _x = [], _rows = [], _output = [];
    private float[] _weights = [];

    [Params(128, 4096)]
    public int Tokens { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var random = new Random(1);
        var layer = BenchData.Load("decode_in1000out1000").Layer(10).ToArray();
        _ids = new int[Tokens * TopK];
        for (var t = 0; t < Tokens; t++)
        {
            var weights = (double[])layer.Clone();
            for (var k = 0; k < TopK; k++)
            {
                var pick = random.NextDouble() * weights.Sum();
                var e = 0;
                while (e < 255 && (pick -= weights[e]) > 0) e++;
                _ids[t * TopK + k] = e;
                weights[e] = 0;
            }
        }
        var capacity = ExpertDispatch.AlignCapacity(_ids.Length, LocalExperts, BlockSize);
        _counts = new int[LocalExperts];
        _offsets = new int[LocalExperts + 1];
        _sorted = new int[capacity];
        _blocks = new int[capacity / BlockSize];
        _positions = new int[_ids.Length];
        _x = Enumerable.Range(0, Tokens * Hidden).Select(i => (BFloat16)(float)Math.Sin(i)).ToArray();
        _rows = new BFloat16[capacity * Hidden];
        _output = new BFloat16[Tokens * Hidden];
        _weights = Enumerable.Repeat(1f / TopK, _ids.Length).ToArray();
        Align();
        Permute();
    }

    [Benchmark]
    public void Align() =>
        ExpertDispatch.Align(_ids, new HostExpertLayout
        {
            TopK = TopK, FirstSlot = 0, SlotsPerRank = LocalExperts, BlockSize = BlockSize, ExpertCounts = _counts, ExpertOffsets = _offsets,
            SortedPairIds = _sorted, BlockExperts = _blocks, PairPositions = _positions,
        });

    [Benchmark]
    public void Permute() => ExpertDispatch.Permute<BFloat16>(_x, Hidden, TopK, _sorted, _offsets[LocalExperts], _rows);

    [Benchmark]
    public void Combine() => ExpertDispatch.Combine<BFloat16, BFloat16>(_rows, Hidden, _positions, TopK, _weights, _output);
}
