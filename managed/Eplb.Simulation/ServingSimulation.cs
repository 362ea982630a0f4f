using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Load;
using Eplb.Migration;
using Eplb.Placement;
using Eplb.Runtime;
using Microsoft.Extensions.Logging;

namespace Eplb.Simulation;

/// <summary>Which routing kernel the simulated ranks run.</summary>
public enum SimulationRouting
{
    /// <summary>
    /// DeepSeek-V4 hash routing: each pass, each rank's tokens get a <c>tid2eid</c> row of K experts
    /// drawn from the load, and the hash top-k kernel routes them (cheap on the CPU).
    /// </summary>
    Hash = 0,
    /// <summary>
    /// Softmax top-k over logits <c>log q + Gumbel noise</c> (an exact draw of k distinct experts in
    /// proportion to q); every logit is scored, so it costs N times more per token.
    /// </summary>
    Softmax = 1,
}

/// <summary>Settings of a <see cref="ServingSimulation"/>.</summary>
public sealed record SimulationOptions
{
    /// <summary>Load dumps to draw routing from, one phase each in turn (the drift between them is what EPLB must follow).</summary>
    public required IReadOnlyList<ExpertLoad> Loads { get; init; }

    /// <summary>G, expert-parallel ranks (each routes its share of the tokens).</summary>
    public int Ranks { get; init; } = 32;

    /// <summary>Nodes the ranks span.</summary>
    public int Nodes { get; init; } = 4;

    /// <summary>R, physical slots per layer with EPLB (N + redundant).</summary>
    public int Slots { get; init; } = 288;

    /// <summary>Expert groups (DeepSeek-V3: 8).</summary>
    public int Groups { get; init; } = 8;

    /// <summary>Forward passes per run.</summary>
    public int Steps { get; init; } = 256;

    /// <summary>Tokens per forward pass over all ranks.</summary>
    public int Tokens { get; init; } = 512;

    /// <summary>K, experts per token.</summary>
    public int TopK { get; init; } = 8;

    /// <summary>Which routing kernel runs (both fuse the EPLB mapping and load recording).</summary>
    public SimulationRouting Routing { get; init; } = SimulationRouting.Hash;

    /// <summary>Backend of the kernels and buffers.</summary>
    public Backend Backend { get; init; } = Backend.Cpu;

    /// <summary>Seed of the routing draws (every run sees the same routing).</summary>
    public int Seed { get; init; } = 1;

    /// <summary>The policies to compare against no EPLB.</summary>
    public IReadOnlyList<string> Policies { get; init; } = ["deepseek", "locality", "incremental"];

    /// <summary>EPLB window (passes).</summary>
    public int WindowSize { get; init; } = 48;

    /// <summary>EPLB interval (passes); the first rearrangement comes after a quarter of it.</summary>
    public int StepInterval { get; init; } = 96;

    /// <summary>Async rearrangement (one layer committed per pass).</summary>
    public bool UseAsync { get; init; } = true;

    /// <summary>Dirichlet concentration A of the per-pass routing noise.</summary>
    public double Concentration { get; init; } = 192;

    /// <summary>Floats per expert of the scaled-down weights the simulated ranks migrate.</summary>
    public int ExpertFloats { get; init; } = 64;

    /// <summary>Runs advanced in parallel within a pass (each is single-threaded apart from its EPLB worker).</summary>
    public int MaxParallelRuns { get; init; } = Environment.ProcessorCount;

    /// <summary>Bytes of one real expert, for the full-scale transfer figure (DeepSeek-V3 FP8 by default).</summary>
    public long FullScaleExpertBytes { get; init; } = MigrationPlanner.DeepSeekV3ExpertBytes;
}

/// <summary>One run's figures: no EPLB or one policy.</summary>
/// <param name="Name">"no EPLB" or the policy name.</param>
/// <param name="Balancedness">Aggregate balancedness of the routed tokens over every pass and layer (docs/design.md §1).</param>
/// <param name="NodeLocalFraction">Share of routed tokens served on their group's home node.</param>
/// <param name="Rearrangements">Rearrangements completed.</param>
/// <param name="SlotsMoved">Slots whose expert changed.</param>
/// <param name="BytesMoved">Bytes the simulated ranks actually moved (scaled-down weights).</param>
/// <param name="FullScaleBytesMoved">The same transfers at the real expert size.</param>
/// <param name="SecondsPerStep">Wall time per pass (routing, recording, EPLB step).</param>
/// <param name="BalancednessPerStep">Balancedness of each pass.</param>
/// <param name="RankLoad">Tokens per rank per pass, averaged over the passes after the first rearrangement (all passes without EPLB).</param>
public sealed record SimulationRun(string Name, double Balancedness, double NodeLocalFraction, int Rearrangements, long SlotsMoved,
    long BytesMoved, long FullScaleBytesMoved, double SecondsPerStep, double[] BalancednessPerStep, double[] RankLoad);

/// <summary>What a simulation measured.</summary>
public sealed record SimulationResult(Backend Backend, int Steps, IReadOnlyList<SimulationRun> Runs)
{
    /// <summary>The run without EPLB.</summary>
    public SimulationRun NoEplb => Runs[0];
}

/// <summary>
/// Expert-parallel serving simulation over the real pipeline: every pass draws routing for every
/// MoE layer from the real loads (Dirichlet noise, drifting between dumps), each simulated rank
/// routes its share through a routing kernel (hash or softmax top-k) fused with its EPLB layer state
/// (replica choice, padding mask, load recording), and <see cref="EplbState"/> rearranges with async
/// in-process migration of the ranks' (scaled-down) expert weights. The baseline is the same routing
/// on N slots without EPLB. All runs advance in lockstep on the same draws.
/// </summary>
public sealed class ServingSimulation(SimulationOptions options, ILoggerFactory? loggers = null)
{
    /// <summary>Runs no EPLB and every policy; <paramref name="progress"/> gets (run, step) after every pass.</summary>
    public SimulationResult Run(Action<int, int>? progress = null)
    {
        Validate();
        var names = new string?[] { null }.Concat(options.Policies).ToArray();
        var runs = new List<PolicyRun>();
        try
        {
            foreach (var name in names) runs.Add(new PolicyRun(options, name, loggers));
            var layers = options.Loads[0].Layers;
            var experts = options.Loads[0].LogicalExperts;
            var tokens = options.Tokens / options.Ranks * options.Ranks;
            var sampler = new RoutingSampler(options.Seed, options.Concentration);
            var ids = new int[tokens * options.TopK];
            var logits = options.Routing == SimulationRouting.Softmax ? new float[tokens * experts] : [];
            var parallel = new ParallelOptions { MaxDegreeOfParallelism = options.MaxParallelRuns };
            for (var step = 0; step < options.Steps; step++)
            {
                var load = options.Loads[(int)((long)step * options.Loads.Count / options.Steps)];
                for (var layer = 0; layer < layers; layer++)
                {
                    // One draw per layer and pass, routed by every run.
                    if (options.Routing == SimulationRouting.Hash) sampler.Sample(load.Layer(layer), tokens, options.TopK, ids);
                    else sampler.SampleLogits(load.Layer(layer), tokens, logits);
                    Parallel.ForEach(runs, parallel, run => run.Route(layer, ids, logits));
                }
                Parallel.ForEach(runs, parallel, run => run.EndPass(step));
                for (var i = 0; i < runs.Count; i++) progress?.Invoke(i, step + 1);
            }
            return new SimulationResult(options.Backend, options.Steps, runs.Select(r => r.Result()).ToArray());
        }
        finally
        {
            foreach (var run in runs) run.Dispose();
        }
    }

    private void Validate()
    {
        if (options.Loads.Count == 0) throw new ArgumentException("no load to simulate");
        var first = options.Loads[0];
        if (options.Loads.Any(l => l.Layers != first.Layers || l.LogicalExperts != first.LogicalExperts))
            throw new ArgumentException("all loads must have the same layers x experts");
        _ = new ExpertTopology(first.Layers, first.LogicalExperts, options.Slots, options.Ranks, options.Nodes, options.Groups);
        if (options.Tokens < options.Ranks) throw new ArgumentException($"tokens ({options.Tokens}) must be >= ranks (G = {options.Ranks}): every rank routes its share");
        if (options.Steps < 1) throw new ArgumentException($"steps ({options.Steps}) must be >= 1");
        if (options.TopK < 1 || options.TopK > first.LogicalExperts) throw new ArgumentException($"top-k ({options.TopK}) must be in [1, {first.LogicalExperts}]");
        foreach (var policy in options.Policies) PlacementPolicies.Get(policy);
    }

    /// <summary>One configuration (no EPLB or a policy): its ranks, EPLB state, routers and figures.</summary>
    private sealed class PolicyRun : IDisposable
    {
        private readonly SimulationOptions _options;
        private readonly string _name;
        private readonly SimulatedRank[] _ranks;
        private readonly InProcessTransport _transport;
        private readonly EplbState _state;
        private readonly EplbModel _model;
        private readonly Router[][] _routers;
        private readonly RankBuffers[] _buffers;
        private readonly int _perRank;
        private readonly double[] _rankLoad;
        private readonly double[] _rankLoadSum;
        private readonly double[] _perStep;
        private readonly System.Diagnostics.Stopwatch _busy = new();
        private Balancedness _balancedness;
        private double _localTokens, _allTokens;
        private int _measured;

        public PolicyRun(SimulationOptions options, string? policy, ILoggerFactory? loggers)
        {
            _options = options;
            _name = policy ?? "no EPLB";
            var load = options.Loads[0];
            var layers = load.Layers;
            var experts = load.LogicalExperts;
            var ranks = options.Ranks;
            // Without EPLB a model has exactly N experts spread evenly (when N splits over G).
            var slots = policy is null && experts % ranks == 0 ? experts : options.Slots;
            var eplb = new EplbOptions
            {
                WindowSize = policy is null ? 1 : options.WindowSize,
                StepInterval = policy is null ? int.MaxValue : options.StepInterval,
                RedundantExperts = slots - experts,
                Policy = policy ?? "deepseek",
                UseAsync = options.UseAsync,
                Groups = options.Groups,
                Nodes = options.Nodes,
            };
            int[] sizes = [options.ExpertFloats, Math.Max(1, options.ExpertFloats / 16)];  // weights and their scales
            _ranks = Enumerable.Range(0, ranks).Select(r => new SimulatedRank(r, ranks, layers, experts, slots, sizes, options.Backend)).ToArray();
            _transport = new InProcessTransport(ranks);
            _state = new EplbState(eplb, _transport, loggers?.CreateLogger<EplbState>());
            _model = _state.AddModel("simulated", _ranks);
            var routerOptions = new RouterOptions
            {
                LogicalExperts = experts,
                TopK = options.TopK,
                Score = options.Routing == SimulationRouting.Hash ? RoutingScore.SqrtSoftplus : RoutingScore.Softmax,
                Renormalize = true,
            };
            // One router per (rank, layer) holding that rank's EPLB view; device errors checked once per pass.
            _routers = _ranks.Select(r => r.LayerStates!.Select(state => new Router(routerOptions, state) { CheckDeviceErrors = false }).ToArray()).ToArray();
            _perRank = options.Tokens / ranks;
            _buffers = _ranks.Select(r => new RankBuffers(r.Backend, _perRank, options.TopK, experts)).ToArray();
            _rankLoad = new double[ranks];
            _rankLoadSum = new double[ranks];
            _perStep = new double[options.Steps];
        }

        /// <summary>Every rank routes its share of one layer's tokens (ids for hash routing, logits for softmax).</summary>
        public void Route(int layer, int[] ids, float[] logits)
        {
            _busy.Start();
            var topK = _options.TopK;
            var experts = _model.LogicalExperts;
            for (var r = 0; r < _ranks.Length; r++)
            {
                var rank = _ranks[r];
                var b = _buffers[r];
                if (_options.Routing == SimulationRouting.Hash)
                {
                    // Token t of the pass is row t of this pass's table: the hash kernel routes it.
                    b.Table.CopyFrom(ids.AsSpan(r * _perRank * topK, _perRank * topK), 0, rank.Stream);
                    _routers[r][layer].RouteByHash(rank.Stream, b.Logits, b.TokenIds, b.Table, b.TopkIds, b.Weights);
                }
                else
                {
                    b.Logits.CopyFrom(logits.AsSpan(r * _perRank * experts, _perRank * experts), 0, rank.Stream);
                    _routers[r][layer].Route(rank.Stream, b.Logits, b.TopkIds, b.Weights);
                }
            }
            _busy.Stop();
        }

        /// <summary>Measures the pass from the recorded counters, then runs the EPLB step.</summary>
        public void EndPass(int step)
        {
            _busy.Start();
            foreach (var rank in _ranks) rank.Stream.CheckDeviceErrors();
            var pass = _model.PassPhysicalLoad();
            var passBalancedness = new Balancedness();
            Array.Clear(_rankLoad);
            foreach (var layerLoad in _model.RankLoads(pass))
            {
                passBalancedness.Add(layerLoad);
                for (var g = 0; g < layerLoad.Length; g++) _rankLoad[g] += layerLoad[g];
            }
            _balancedness.Add(passBalancedness);
            _perStep[step] = passBalancedness.Value;
            var logical = _model.ToLogical(pass);
            var tokens = 0.0;
            foreach (var v in logical.Values) tokens += v;
            _localTokens += _model.Placement.NodeLocalFraction(logical, _options.Groups) * tokens;
            _allTokens += tokens;
            if (_state.CompletedRearrangements > 0 || _name == "no EPLB")
            {
                for (var g = 0; g < _rankLoad.Length; g++) _rankLoadSum[g] += _rankLoad[g] / _model.Layers;
                _measured++;
            }
            _state.Step();
            _busy.Stop();
        }

        public SimulationRun Result()
        {
            return new SimulationRun(_name, _balancedness.Value, _allTokens > 0 ? _localTokens / _allTokens : 1,
                _state.CompletedRearrangements, _state.SlotsMoved, _state.BytesMoved, _state.ExpertsMoved * _options.FullScaleExpertBytes,
                _busy.Elapsed.TotalSeconds / _options.Steps, _perStep, _rankLoadSum.Select(v => _measured > 0 ? v / _measured : 0).ToArray());
        }

        public void Dispose()
        {
            _state.Dispose();
            _transport.Dispose();
            foreach (var b in _buffers) b.Dispose();
            foreach (var rank in _ranks) rank.Dispose();
        }
    }

    /// <summary>One rank's routing inputs and outputs, allocated once per run.</summary>
    private sealed class RankBuffers : IDisposable
    {
        public RankBuffers(Backend backend, int tokens, int topK, int experts)
        {
            TopkIds = new DeviceBuffer<int>(backend, (long)tokens * topK);
            Weights = new DeviceBuffer<float>(backend, (long)tokens * topK);
            Logits = new DeviceBuffer<float>(backend, (long)tokens * experts);
            Logits.Fill(0f);  // hash routing reads only the K chosen logits: all zero, equal weights
            TokenIds = new DeviceBuffer<long>(backend, Enumerable.Range(0, tokens).Select(t => (long)t).ToArray());
            Table = new DeviceBuffer<int>(backend, (long)tokens * topK);
        }

        public DeviceBuffer<int> TopkIds { get; }
        public DeviceBuffer<float> Weights { get; }
        public DeviceBuffer<float> Logits { get; }
        public DeviceBuffer<long> TokenIds { get; }
        public DeviceBuffer<int> Table { get; }

        public void Dispose()
        {
            TopkIds.Dispose();
            Weights.Dispose();
            Logits.Dispose();
            TokenIds.Dispose();
            Table.Dispose();
        }
    }
}
