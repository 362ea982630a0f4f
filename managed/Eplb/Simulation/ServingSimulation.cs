using Eplb.Kernels;

namespace Eplb.Simulation;

/// <summary>Settings of a <see cref="ServingSimulation"/>.</summary>
public sealed record SimulationOptions
{
    /// <summary>Load dumps to draw routing from, switched through over time (prefill/decode drift).</summary>
    public required IReadOnlyList<ExpertLoad> Loads { get; init; }

    /// <summary>G, expert-parallel ranks.</summary>
    public int Gpus { get; init; } = 32;

    /// <summary>R, physical slots per layer (N + redundant).</summary>
    public int Replicas { get; init; } = 288;

    /// <summary>Forward passes to simulate.</summary>
    public int Steps { get; init; } = 200;

    /// <summary>Tokens per forward pass (over all ranks).</summary>
    public int Tokens { get; init; } = 2048;

    /// <summary>K, experts per token.</summary>
    public int TopK { get; init; } = 8;

    /// <summary>Backend of the routing kernels.</summary>
    public Backend Backend { get; init; } = Backend.Cpu;

    /// <summary>Seed of the routing sampler.</summary>
    public int Seed { get; init; } = 1;
}

/// <summary>What a simulation measured.</summary>
public sealed record SimulationResult(Backend Backend, int Steps, double SecondsPerStep, double Balancedness, double[] BalancednessPerStep);

/// <summary>
/// Expert-parallel serving simulation: every step draws routing for every MoE layer from the real
/// loads and runs it through the mapping kernel on the chosen backend with the load recorded; the
/// recorded per-slot counts give each GPU's load and the balancedness (SPEC 1).
/// </summary>
public sealed class ServingSimulation(SimulationOptions options)
{
    /// <summary>Runs the simulation; <paramref name="progress"/> is called after every step.</summary>
    public SimulationResult Run(Action<int>? progress = null)
    {
        var loads = options.Loads;
        if (loads.Count == 0) throw new ArgumentException("no load to simulate");
        var layers = loads[0].Layers;
        var experts = loads[0].Experts;
        if (loads.Any(l => l.Layers != layers || l.Experts != experts))
            throw new ArgumentException("all loads must have the same layers x experts");
        if (options.Replicas < experts || options.Replicas % options.Gpus != 0)
            throw new ArgumentException($"replicas ({options.Replicas}) must be >= experts ({experts}) and a multiple of gpus ({options.Gpus})");

        // Initial placement: slot s holds logical s % N (SPEC 1).
        var r = options.Replicas;
        var kmax = (r + experts - 1) / experts;
        var logcnt = new int[experts];
        var log2phy = Enumerable.Repeat(-1, experts * kmax).ToArray();
        for (var s = 0; s < r; s++) log2phy[(s % experts) * kmax + logcnt[s % experts]++] = s;

        var backend = options.Backend;
        using var stream = new ComputeStream(backend);
        using var table = new DeviceBuffer<int>(backend, log2phy);
        using var counts = new DeviceBuffer<int>(backend, logcnt);
        using var counters = new DeviceBuffer<int>(backend, r);
        using var flag = new DeviceBuffer<int>(backend, [1]);
        using var ids = new DeviceBuffer<int>(backend, (long)options.Tokens * options.TopK);
        using var physical = new DeviceBuffer<int>(backend, (long)options.Tokens * options.TopK);
        var layer = new EplbLayerState(table, counts, counters, flag, experts, kmax, r);

        var sampler = new RoutingSampler(options.Seed);
        var hostIds = new int[options.Tokens * options.TopK];
        var slotCounts = new int[r];
        var slotsPerGpu = r / options.Gpus;
        var gpuLoad = new double[options.Gpus];
        double sumMean = 0, sumMax = 0;
        var perStep = new double[options.Steps];
        var started = System.Diagnostics.Stopwatch.StartNew();
        for (var step = 0; step < options.Steps; step++)
        {
            // Drift: walk through the dumps, a few steps each.
            var load = loads[step * loads.Count / Math.Max(1, options.Steps)];
            double stepMean = 0, stepMax = 0;
            for (var l = 0; l < layers; l++)
            {
                sampler.Sample(load.Layer(l), options.Tokens, options.TopK, hostIds);
                ids.CopyFrom(hostIds, 0, stream);
                counters.Fill(0, stream: stream);
                ExpertMapping.MapToPhysical(stream, ids, options.TopK, layer, physical);
                counters.CopyTo(slotCounts, 0, stream);
                Array.Clear(gpuLoad);
                for (var s = 0; s < r; s++) gpuLoad[s / slotsPerGpu] += slotCounts[s];
                stepMean += gpuLoad.Average();
                stepMax += gpuLoad.Max();
            }
            sumMean += stepMean;
            sumMax += stepMax;
            perStep[step] = stepMax > 0 ? stepMean / stepMax : 0;
            progress?.Invoke(step + 1);
        }
        if (backend == Backend.Cuda) stream.CheckDeviceErrors();
        return new SimulationResult(backend, options.Steps, started.Elapsed.TotalSeconds / Math.Max(1, options.Steps),
            sumMax > 0 ? sumMean / sumMax : 0, perStep);
    }
}
