using BenchmarkDotNet.Attributes;

namespace Eplb.Benchmarks;

/// <summary>
/// The runtime's per-step and per-rearrangement hot paths at DeepSeek-V3 scale (58 layers, 256
/// experts, R = 288, 32 ranks): the window push every pass does (CPU kernel), and the migration
/// planning of a whole model.
/// </summary>
[MemoryDiagnoser]
public class RuntimeBenchmarks
{
    private const int Layers = 58, Slots = 288, Ranks = 32, Window = 1000;
    private DeviceBuffer<int> _pass = null!;
    private DeviceBuffer<int> _window = null!;
    private DeviceBuffer<long> _sums = null!;
    private int[][] _old = [];
    private int[][] _new = [];
    private int _slot;

    [GlobalSetup]
    public void Setup()
    {
        _pass = new DeviceBuffer<int>(Backend.Cpu, Layers * Slots);
        _pass.Fill(3);
        _window = new DeviceBuffer<int>(Backend.Cpu, (long)Window * Layers * Slots);
        _window.Fill(0);
        _sums = new DeviceBuffer<long>(Backend.Cpu, Layers * Slots);
        _sums.Fill(0);
        var random = new Random(5);
        int[] Random256()
        {
            var p = Enumerable.Range(0, Slots).Select(s => s < 256 ? s : random.Next(256)).ToArray();
            random.Shuffle(p);
            return p;
        }
        _old = Enumerable.Range(0, Layers).Select(_ => Random256()).ToArray();
        // A realistic rearrangement changes a minority of slots: swap 20% of them.
        _new = _old.Select(p =>
        {
            var q = (int[])p.Clone();
            for (var i = 0; i < Slots / 10; i++)
            {
                var a = random.Next(Slots);
                var b = random.Next(Slots);
                (q[a], q[b]) = (q[b], q[a]);
            }
            return q;
        }).ToArray();
    }

    /// <summary>One pass of counters into the window ring (58 x 288 slots, 64-bit sums), CPU kernel.</summary>
    [Benchmark]
    public void WindowPush()
    {
        LoadWindow.Push(ComputeStream.Cpu, _pass, _window, _sums, Window, _slot);
        _slot = (_slot + 1) % Window;
    }

    /// <summary>Migration plans for all 58 layers (32 ranks, batched).</summary>
    [Benchmark]
    public int PlanModelMigration()
    {
        var transfers = 0;
        for (var l = 0; l < Layers; l++) transfers += MigrationPlanner.PlanLayer(_old[l], _new[l], Ranks).Transfers.Count;
        return transfers;
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _pass.Dispose();
        _window.Dispose();
        _sums.Dispose();
    }
}
