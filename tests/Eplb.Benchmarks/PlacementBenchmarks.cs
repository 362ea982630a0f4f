using BenchmarkDotNet.Attributes;

namespace Eplb.Benchmarks;

/// <summary>
/// The placement policies on a real DeepSeek-V3 dump: 58 layers x 256 experts. Layouts of issue 3:
/// R = 288 on 32 GPUs in 4 nodes (hierarchical), 40 GPUs (global; R = 320, since 288 is not a
/// multiple of 40) and 72 GPUs (global). One thread unless <see cref="Threads"/> says otherwise.
/// Incremental starts from the locality plan of another dump (decode_in2000out100).
/// Run: <c>./build.sh bench --filter '*PlacementBenchmarks*'</c>.
/// </summary>
[MemoryDiagnoser]
public class PlacementBenchmarks
{
    private ExpertLoad _load = null!;
    private PlacementRequest _request = null!;
    private ExpertPlacement _current = null!;

    /// <summary>R / G / nodes.</summary>
    [Params("288/32/4", "320/40/5", "288/72/9")]
    public string Layout { get; set; } = "";

    /// <summary>Threads across layers (1 = one core).</summary>
    [Params(1, 2)]
    public int Threads { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var parts = Layout.Split('/').Select(int.Parse).ToArray();
        _request = new PlacementRequest(parts[0], 8, parts[2], parts[1]) { MaxDegreeOfParallelism = Threads };
        _load = BenchData.Load("decode_in1000out1000");
        _current = PlacementPolicies.Locality.Plan(BenchData.Load("decode_in2000out100"), _request);
    }

    [Benchmark(Baseline = true)]
    public ExpertPlacement DeepSeek() => PlacementPolicies.DeepSeek.Plan(_load, _request);

    [Benchmark]
    public ExpertPlacement Locality() => PlacementPolicies.Locality.Plan(_load, _request);

    [Benchmark]
    public ExpertPlacement Incremental() => PlacementPolicies.Incremental.Plan(_load, _request, _current);
}
