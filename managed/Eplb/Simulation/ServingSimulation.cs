using Eplb.Kernels;
using Eplb.Migration;
using Microsoft.Extensions.Logging;

namespace Eplb.Simulation;

/// <summary>Settings of a <see cref="ServingSimulation"/>.</summary>
public sealed record SimulationOptions
{
    /// <summary>Load dumps to draw routing from, one phase each in turn (the drift between them is what EPLB must follow).</summary>
    public required IReadOnlyList<ExpertLoad> Loads { get; init; }

    /// <summary>G, expert-parallel ranks (each routes its share of the tokens).</summary>
    public int Gpus { get; init; } = 32;

    /// <summary>Nodes the ranks span.</summary>
    public int Nodes { get; init; } = 4;

    /// <summary>R, physical slots per layer with EPLB (N + redundant).</summary>
    public int Replicas { get; init; } = 288;

    /// <summary>Expert groups (DeepSeek-V3: 8).</summary>
    public int Groups { get; init; } = 8;

    /// <summary>Forward passes per run.</summary>
    public int Steps { get; init; } = 320;

    /// <summary>Tokens per forward pass over all ranks.</summary>
    public int Tokens { get; init; } = 512;

    /// <summary>K, experts per token.</summary>
    public int TopK { get; init; } = 8;

    /// <summary>Backend of the kernels and buffers.</summary>
    public Backend Backend { get; init; } = Backend.Cpu;

    /// <summary>Seed of the routing draws (every run sees the same routing).</summary>
    public int Seed { get; init; } = 1;

    /// <summary>The policies to compare against no EPLB.</summary>
    public IReadOnlyList<string> Policies { get; init; } = ["deepseek", "locality", "incremental"];

    /// <summary>EPLB window (passes).</summary>
    public int WindowSize { get; init; } = 64;

    /// <summary>EPLB interval (passes); the first rearrangement comes after a quarter of it.</summary>
    public int StepInterval { get; init; } = 128;

    /// <summary>Async rearrangement (one layer committed per pass).</summary>
    public bool UseAsync { get; init; } = true;

    /// <summary>Dirichlet concentration A of the per-pass routing noise.</summary>
    public double Concentration { get; init; } = 192;

    /// <summary>Floats per expert of the scaled-down weights the simulated ranks migrate.</summary>
    public int ExpertFloats { get; init; } = 64;

    /// <summary>Runs simulated at the same time (each is single-threaded apart from its EPLB worker).</summary>
    public int MaxParallelRuns { get; init; } = Environment.ProcessorCount;

    /// <summary>Bytes of one real expert, for the full-scale transfer figure (DeepSeek-V3 FP8 by default).</summary>
    public long FullScaleExpertBytes { get; init; } = Placement.DeepSeekV3ExpertBytes;
}

/// <summary>One run's figures: no EPLB or one policy.</summary>
/// <param name="Name">"no EPLB" or the policy name.</param>
/// <param name="Balancedness">Aggregate balancedness of the routed tokens over every pass and layer (SPEC 1).</param>
/// <param name="NodeLocalFraction">Share of routed tokens served on their group's home node.</param>
/// <param name="Rearrangements">Rearrangements completed.</param>
/// <param name="SlotsMoved">Slots whose expert changed.</param>
/// <param name="BytesMoved">Bytes the simulated ranks actually moved (scaled-down weights).</param>
/// <param name="FullScaleBytesMoved">The same transfers at the real expert size.</param>
/// <param name="SecondsPerStep">Wall time per pass (routing, recording, EPLB step).</param>
/// <param name="BalancednessPerStep">Balancedness of each pass.</param>
/// <param name="GpuLoad">Tokens per GPU per pass, averaged over the passes after the first rearrangement (all passes without EPLB).</param>
public sealed record SimulationRun(string Name, double Balancedness, double NodeLocalFraction, int Rearrangements, long SlotsMoved,
    long BytesMoved, long FullScaleBytesMoved, double SecondsPerStep, double[] BalancednessPerStep, double[] GpuLoad);

/// <summary>What a simulation measured.</summary>
public sealed record SimulationResult(Backend Backend, int Steps, IReadOnlyList<SimulationRun> Runs)
{
    /// <summary>The run without EPLB.</summary>
    public SimulationRun NoEplb => Runs[0];
}

/// <summary>
/// Expert-parallel serving simulation over the real pipeline: every pass draws routing for every
/// MoE layer from the real loads (Dirichlet noise, drifting between dumps), each simulated rank
/// routes its share through the mapping kernel with its EPLB layer state (replica choice, padding
/// mask, load recording), and <see cref="EplbState"/> rearranges with async in-process migration of
/// the ranks' (scaled-down) expert weights. The baseline is the same routing on N slots without EPLB.
/// </summary>
public sealed class ServingSimulation(SimulationOptions options, ILoggerFactory? loggers = null)
{
    /// <summary>Runs no EPLB, then every policy; <paramref name="progress"/> gets (run, step) after every pass.</summary>
    public SimulationResult Run(Action<int, int>? progress = null)
    {
        Validate();
        // The runs are independent (same routing draws, own ranks and EPLB state): run them side by side.
        var names = new string?[] { null }.Concat(options.Policies).ToArray();
        var runs = new SimulationRun[names.Length];
        Parallel.For(0, names.Length, new ParallelOptions { MaxDegreeOfParallelism = options.MaxParallelRuns },
            i => runs[i] = RunOne(names[i], step => progress?.Invoke(i, step)));
        return new SimulationResult(options.Backend, options.Steps, runs);
    }

    private void Validate()
    {
        if (options.Loads.Count == 0) throw new ArgumentException("no load to simulate");
        var first = options.Loads[0];
        if (options.Loads.Any(l => l.Layers != first.Layers || l.Experts != first.Experts))
            throw new ArgumentException("all loads must have the same layers x experts");
        if (options.Gpus < 1) throw new ArgumentException($"gpus ({options.Gpus}) must be >= 1");
        if (options.Replicas < first.Experts || options.Replicas % options.Gpus != 0)
            throw new ArgumentException($"replicas ({options.Replicas}) must be >= experts ({first.Experts}) and a multiple of gpus ({options.Gpus})");
        if (options.Gpus % options.Nodes != 0) throw new ArgumentException($"gpus ({options.Gpus}) must be a multiple of nodes ({options.Nodes})");
        if (options.Tokens < options.Gpus) throw new ArgumentException($"tokens ({options.Tokens}) must be >= gpus ({options.Gpus}): every rank routes its share");
        if (options.Steps < 1) throw new ArgumentException($"steps ({options.Steps}) must be >= 1");
        foreach (var policy in options.Policies) PlacementPolicies.Get(policy);
    }

    private SimulationRun RunOne(string? policy, Action<int> progress)
    {
        var load0 = options.Loads[0];
        var layers = load0.Layers;
        var experts = load0.Experts;
        var gpus = options.Gpus;
        // Without EPLB a model has exactly N experts spread evenly (when N splits over G).
        var slots = policy is null && experts % gpus == 0 ? experts : options.Replicas;
        var eplb = new EplbOptions
        {
            WindowSize = policy is null ? 1 : options.WindowSize,
            StepInterval = policy is null ? int.MaxValue : options.StepInterval,
            NumRedundantExperts = slots - experts,
            Policy = policy ?? "deepseek",
            UseAsync = options.UseAsync,
            NumGroups = options.Groups,
            NumNodes = options.Nodes,
        };
        int[] sizes = [options.ExpertFloats, Math.Max(1, options.ExpertFloats / 16)];  // weights and their scales
        var ranks = Enumerable.Range(0, gpus).Select(r => new SimulatedRank(r, gpus, layers, experts, slots, sizes, options.Backend)).ToArray();
        using var transport = new InProcessTransport(gpus);
        using var state = new EplbState(eplb, transport, loggers?.CreateLogger<EplbState>());
        var model = state.AddModel("simulated", ranks);
        try
        {
            return Drive(policy ?? "no EPLB", ranks, state, model, progress);
        }
        finally
        {
            state.Dispose();
            foreach (var rank in ranks) rank.Dispose();
        }
    }

    private SimulationRun Drive(string name, SimulatedRank[] ranks, EplbState state, EplbModel model, Action<int> progress)
    {
        var layers = model.Layers;
        var gpus = model.Gpus;
        var topK = options.TopK;
        var perRank = options.Tokens / gpus;
        var sampler = new RoutingSampler(options.Seed, options.Concentration);
        var ids = new int[perRank * gpus * topK];
        var idBuffers = ranks.Select(r => new DeviceBuffer<int>(r.Backend, (long)perRank * topK)).ToArray();
        var physical = ranks.Select(r => new DeviceBuffer<int>(r.Backend, (long)perRank * topK)).ToArray();
        var gpuLoad = new double[gpus];
        var gpuLoadSum = new double[gpus];
        var perStep = new double[options.Steps];
        double sumMean = 0, sumMax = 0, localTokens = 0, allTokens = 0;
        var measured = 0;
        var started = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            for (var step = 0; step < options.Steps; step++)
            {
                var load = options.Loads[(int)((long)step * options.Loads.Count / options.Steps)];
                // Route: the same draw for every run (same seed, same order), split over the ranks.
                for (var layer = 0; layer < layers; layer++)
                {
                    sampler.Sample(load.Layer(layer), perRank * gpus, topK, ids);
                    for (var r = 0; r < gpus; r++)
                    {
                        var rank = ranks[r];
                        idBuffers[r].CopyFrom(ids.AsSpan(r * perRank * topK, perRank * topK), 0, rank.Stream);
                        ExpertMapping.MapToPhysical(rank.Stream, idBuffers[r], topK, rank.LayerStates![layer], physical[r]);
                    }
                }
                // Measure this pass from the recorded counters, before the EPLB step consumes them.
                var pass = model.PassPhysicalLoad();
                double stepMean = 0, stepMax = 0;
                Array.Clear(gpuLoad);
                for (var layer = 0; layer < layers; layer++)
                {
                    var layerLoad = new double[gpus];
                    for (var s = 0; s < model.Slots; s++) layerLoad[s / model.SlotsPerRank] += pass[layer * model.Slots + s];
                    stepMean += layerLoad.Average();
                    stepMax += layerLoad.Max();
                    for (var g = 0; g < gpus; g++) gpuLoad[g] += layerLoad[g];
                }
                sumMean += stepMean;
                sumMax += stepMax;
                perStep[step] = stepMax > 0 ? stepMean / stepMax : 0;
                var logical = model.ToLogical(pass);
                var tokens = logical.Values.ToArray().Sum();
                localTokens += model.Placement.NodeLocalFraction(logical, options.Groups) * tokens;
                allTokens += tokens;
                if (state.CompletedRearrangements > 0 || name == "no EPLB")
                {
                    for (var g = 0; g < gpus; g++) gpuLoadSum[g] += gpuLoad[g] / layers;
                    measured++;
                }
                state.Step();
                progress(step + 1);
            }
            foreach (var rank in ranks) rank.Stream.CheckDeviceErrors();
        }
        finally
        {
            foreach (var b in idBuffers) b.Dispose();
            foreach (var b in physical) b.Dispose();
        }
        var seconds = started.Elapsed.TotalSeconds / options.Steps;
        var bytesPerExpert = ranks[0].TensorSizes.Sum() * sizeof(float);
        var transfers = state.BytesMoved / Math.Max(1, bytesPerExpert);
        return new SimulationRun(name, sumMax > 0 ? sumMean / sumMax : 0, allTokens > 0 ? localTokens / allTokens : 1,
            state.CompletedRearrangements, state.SlotsMoved, state.BytesMoved, transfers * options.FullScaleExpertBytes, seconds, perStep,
            gpuLoadSum.Select(v => measured > 0 ? v / measured : 0).ToArray());
    }
}
