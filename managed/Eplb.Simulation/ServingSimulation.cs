using System.Numerics;
using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Load;
using Eplb.Migration;
using Eplb.Runtime;
using Microsoft.Extensions.Logging;

namespace Eplb.Simulation;

/// <summary>
/// Expert-parallel serving over the real pipeline. Every pass, each rank originates its own tokens
/// (<see cref="RequestTraffic"/>: per-request routing drawn from the phase's recorded load, group
/// limited) and maps them through libeplb's EPLB epilogue with its own layer state (replica choice,
/// load recording; <see cref="SimulationOptions.Kernel"/>: the mapping op, or the DeepSeek-V4 hash
/// routing kernel around it); <see cref="EplbState"/> rearranges with in-process migration of the
/// ranks' scaled-down weights; <see cref="CostModel"/> turns each pass's routed load, traffic and
/// migration into seconds. Runs, in lockstep on the same routing: <c>no EPLB</c> (N slots, never
/// moves), <c>static</c> (R slots in the initial layout, never moves), each policy, and the
/// node-local variants. Async rearrangements commit one layer per pass, deterministically
/// (<see cref="EplbOptions.AsyncCommitPasses"/> = 1: each staged layer commits the pass after its
/// staging began, the step waiting for it), so commit points depend on pass counts, not on thread timing.
/// </summary>
public sealed class ServingSimulation(SimulationOptions options, ILoggerFactory? loggers = null)
{
    /// <summary>Runs every run; <paramref name="progress"/> gets (passes done, passes in all) after every pass.</summary>
    /// <exception cref="ArgumentException">The options are inconsistent (<see cref="SimulationOptions.Validate"/>).</exception>
    public SimulationResult Run(Action<long, long>? progress = null, CancellationToken cancel = default)
    {
        options.Validate();
        var first = options.Phases[0].Load;
        var layers = first.Layers;
        var experts = first.LogicalExperts;
        var ranks = options.Ranks;
        var k = options.TopK;
        var maxTokens = Math.Max(options.DecodeTokens, options.PrefillTokens);
        var total = options.TotalPasses;
        var runs = new List<PolicyRun>();
        var shared = new SharedInputs(options.Backend, options.Kernel, maxTokens, experts, (long)ranks * layers * maxTokens * k);
        try
        {
            var names = options.RunNames;
            for (var i = 0; i < names.Count; i++)
            {
                var (policy, selection, slots) = i switch
                {
                    0 => ((string?)null, ReplicaSelection.TokenHash, options.NoEplbSlots),
                    1 => (null, ReplicaSelection.TokenHash, options.Slots),
                    _ when i < 2 + options.Policies.Count => (options.Policies[i - 2], ReplicaSelection.TokenHash, options.Slots),
                    _ => (options.NodeLocalPolicies[i - 2 - options.Policies.Count], ReplicaSelection.NodeLocal, options.Slots),
                };
                runs.Add(new PolicyRun(options, names[i], policy, slots, selection, total, shared, loggers));
            }
            // The routing of pass p + 1 is drawn while the runs route pass p (two buffers); the draws
            // depend on (seed, pass, rank, layer) only, so the overlap changes nothing in the result.
            var traffic = new RequestTraffic(options);
            var schedule = new List<(int Phase, long Pass)>();
            for (var p = 0; p < options.Phases.Count; p++)
                for (var i = 0; i < options.Phases[p].Passes; i++) schedule.Add((p, schedule.Count));
            var phaseStarts = new List<long>();
            for (var p = 0; p < options.Phases.Count; p++) phaseStarts.Add(schedule.FindIndex(s => s.Phase == p));
            var buffers = new[] { new int[(long)ranks * layers * maxTokens * k], new int[(long)ranks * layers * maxTokens * k] };
            void Draw(int index)
            {
                var (phase, pass) = schedule[index];
                if (phaseStarts[phase] == pass) traffic.StartPhase(options.Phases[phase], phase);
                traffic.Fill(pass, buffers[index % 2]);
            }
            var parallel = new ParallelOptions { MaxDegreeOfParallelism = options.MaxParallelRuns, CancellationToken = cancel };
            var next = Task.Run(() => Draw(0), cancel);
            for (var index = 0; index < schedule.Count; index++)
            {
                next.GetAwaiter().GetResult();
                var (phaseIndex, pass) = schedule[index];
                var phase = options.Phases[phaseIndex];
                var tokens = traffic.TokensPerRank(phase);
                var ids = buffers[index % 2];
                shared.Upload(ids, (long)ranks * layers * tokens * k);
                if (index + 1 < schedule.Count)
                {
                    var following = index + 1;
                    next = Task.Run(() => Draw(following), cancel);
                }
                Parallel.ForEach(runs, parallel, run => run.Pass(pass, phase, tokens, ids));
                progress?.Invoke(pass + 1, total);
            }
            return Summarize(runs, phaseStarts, traffic.RequestsStarted);
        }
        finally
        {
            foreach (var run in runs) run.Dispose();
            shared.Dispose();
        }
    }

    private SimulationResult Summarize(List<PolicyRun> runs, List<long> phaseStarts, long requests)
    {
        // Steady: after every policy run's first completed rearrangement (the same passes for all runs).
        var starts = runs.Where(r => r.Policy != null).Select(r => r.FirstCompletion).Where(p => p.HasValue).Select(p => p!.Value + 1).ToList();
        long? steady = starts.Count > 0 && starts.Max() < runs[0].Passes ? starts.Max() : null;
        var decodePasses = new bool[runs[0].Passes];
        for (var p = 0; p < options.Phases.Count; p++)
        {
            var end = p + 1 < phaseStarts.Count ? phaseStarts[p + 1] : decodePasses.Length;
            for (var i = phaseStarts[p]; i < end; i++) decodePasses[i] = options.Phases[p].Kind == PhaseKind.Decode;
        }
        if (!decodePasses.Contains(true)) Array.Fill(decodePasses, true);
        var phases = options.Phases.Select((phase, p) => (phase.Name, From: phaseStarts[p],
            To: p + 1 < phaseStarts.Count ? phaseStarts[p + 1] : decodePasses.Length)).ToArray();
        var baseline = runs[0].Figures(steady, decodePasses, phases, null);
        var results = new List<SimulationRun> { baseline };
        results.AddRange(runs.Skip(1).Select(r => r.Figures(steady, decodePasses, phases, baseline)));
        return new SimulationResult(options.Backend, results, phaseStarts, steady, requests);
    }

    /// <summary>Read-only inputs every run routes from: the pass's drawn ids, zero logits and token ids.</summary>
    private sealed class SharedInputs : IDisposable
    {
        public SharedInputs(Backend backend, SimulationKernel kernel, int maxTokens, int experts, long idsLength)
        {
            Kernel = kernel;
            if (kernel == SimulationKernel.Hash)
            {
                HostLogits = new float[(long)maxTokens * experts];  // hash routing weighs the K chosen logits: all zero, equal weights
                HostTokenIds = Enumerable.Range(0, maxTokens).Select(t => (long)t).ToArray();
                if (backend == Backend.Cpu) return;  // the host form of the hash kernel reads the pass's ids in place
                Logits = new DeviceBuffer<float>(backend, HostLogits);
                TokenIds = new DeviceBuffer<long>(backend, HostTokenIds);
            }
            Ids = new DeviceBuffer<int>(backend, idsLength);
        }

        public SimulationKernel Kernel { get; }
        public float[] HostLogits { get; } = [];
        public long[] HostTokenIds { get; } = [];
        public DeviceBuffer<float>? Logits { get; }
        public DeviceBuffer<long>? TokenIds { get; }
        public DeviceBuffer<int>? Ids { get; }

        public void Upload(int[] ids, long length) => Ids?.CopyFrom(ids.AsSpan(0, checked((int)length)));

        public void Dispose()
        {
            Logits?.Dispose();
            TokenIds?.Dispose();
            Ids?.Dispose();
        }
    }

    /// <summary>One run: its ranks, EPLB state, routers, and what each pass cost.</summary>
    private sealed class PolicyRun : IDisposable
    {
        private readonly SimulationOptions _options;
        private readonly CostModel _cost;
        private readonly SimulatedRank[] _ranks;
        private readonly InProcessTransport _transport;
        private readonly EplbState _state;
        private readonly EplbModel _model;
        private readonly Router[][] _routers;
        private readonly SharedInputs _shared;
        private readonly int _layers, _slots, _slotsPerRank, _k, _nodes;
        private readonly int[] _rankOfSlot, _nodeOfSlot, _nodeOfRank;
        private readonly ulong[] _nodeBitOfSlot;
        private readonly int[][] _counters;
        private readonly DeviceBuffer<int>[] _counterBuffers;
        private readonly int[] _physical;
        private readonly float[] _weights;
        private readonly DeviceBuffer<int> _deviceIds;
        private readonly DeviceBuffer<float> _deviceWeights;
        private readonly int[][] _phy2Log;
        // Per layer scratch of the cost model.
        private readonly long[] _slotLoad, _rankPairs, _intraSent, _intraReceived, _crossSent, _crossReceived;
        private readonly int[] _activeSlots;
        // Per pass.
        private readonly double[] _stepSeconds, _sumOfMeans, _sumOfMaxima, _migrationSeconds;
        private readonly long[] _tokens, _pairs, _crossPairs, _remoteNodes;
        private readonly List<RearrangementRecord> _rearrangements = [];
        private Streak? _streak;

        public PolicyRun(SimulationOptions options, string name, string? policy, int slots, ReplicaSelection selection, long passes,
            SharedInputs shared, ILoggerFactory? loggers)
        {
            _options = options;
            _cost = options.Cost;
            _shared = shared;
            Name = name;
            Policy = policy;
            var load = options.Phases[0].Load;
            _layers = load.Layers;
            var experts = load.LogicalExperts;
            var ranks = options.Ranks;
            _slots = slots;
            _k = options.TopK;
            _nodes = options.Nodes;
            var eplb = new EplbOptions
            {
                // The baselines never rearrange: a one-pass window and an interval no run reaches.
                WindowSize = policy is null ? 1 : options.WindowSize,
                StepInterval = policy is null ? int.MaxValue : options.StepInterval,
                RedundantExperts = slots - experts,
                Policy = policy ?? "deepseek",
                UseAsync = options.UseAsync,
                AsyncCommitPasses = options.UseAsync ? 1 : 0,
                Groups = options.Groups,
                Nodes = options.Nodes,
                ReplicaSelection = selection,
            };
            int[] sizes = [options.ExpertFloats, Math.Max(1, options.ExpertFloats / 16)];  // weights and their scales
            _ranks = Enumerable.Range(0, ranks).Select(r => new SimulatedRank(r, ranks, _layers, experts, slots, sizes, options.Backend)).ToArray();
            _transport = new InProcessTransport(ranks);
            _state = new EplbState(eplb, _transport, loggers?.CreateLogger<EplbState>());
            _model = _state.AddModel("simulated", _ranks);
            var topology = _model.Topology;
            _slotsPerRank = topology.SlotsPerRank;
            _rankOfSlot = Enumerable.Range(0, slots).Select(topology.RankOfSlot).ToArray();
            _nodeOfRank = Enumerable.Range(0, ranks).Select(topology.NodeOfRank).ToArray();
            _nodeOfSlot = _rankOfSlot.Select(r => _nodeOfRank[r]).ToArray();
            _nodeBitOfSlot = _nodeOfSlot.Select(n => n < 64 ? 1UL << n : 0).ToArray();
            var routerOptions = new RouterOptions { LogicalExperts = experts, TopK = _k, Score = RoutingScore.SqrtSoftplus, Renormalize = true };
            // Hash kernel: one router per (rank, layer) holding that rank's EPLB view; device errors are checked once per pass.
            _routers = options.Kernel != SimulationKernel.Hash ? [] : _ranks.Select(r => r.LayerStates!.Select(s => new Router(routerOptions, s) { CheckDeviceErrors = false }).ToArray()).ToArray();
            _counterBuffers = _ranks.Select(r => r.LayerStates![0].Counters.Buffer!).ToArray();
            _counters = _ranks.Select(_ => new int[(long)_layers * slots]).ToArray();
            var maxTokens = Math.Max(options.DecodeTokens, options.PrefillTokens);
            _physical = new int[maxTokens * _k];
            _weights = new float[maxTokens * _k];
            _deviceIds = new DeviceBuffer<int>(options.Backend, _physical.Length);
            _deviceWeights = new DeviceBuffer<float>(options.Backend, _weights.Length);
            _phy2Log = Enumerable.Range(0, _layers).Select(l => _model.Placement.Phy2Log(l).ToArray()).ToArray();
            _slotLoad = new long[slots];
            _rankPairs = new long[ranks];
            _intraSent = new long[ranks];
            _intraReceived = new long[ranks];
            _crossSent = new long[ranks];
            _crossReceived = new long[ranks];
            _activeSlots = new int[ranks];
            _stepSeconds = new double[passes];
            _sumOfMeans = new double[passes];
            _sumOfMaxima = new double[passes];
            _migrationSeconds = new double[passes];
            _tokens = new long[passes];
            _pairs = new long[passes];
            _crossPairs = new long[passes];
            _remoteNodes = new long[passes];
        }

        public string Name { get; }
        public string? Policy { get; }
        public int Passes => _stepSeconds.Length;

        /// <summary>The pass that committed the last layer of the first completed rearrangement.</summary>
        public long? FirstCompletion => _rearrangements.FirstOrDefault(r => r.Completed)?.LastPass;

        /// <summary>Routes every rank's tokens of every layer, prices the pass, then runs the EPLB step.</summary>
        public void Pass(long pass, SimulationPhase phase, int tokens, int[] ids)
        {
            var perRank = (long)_layers * tokens * _k;
            var pairs = tokens * _k;
            long remote = 0;
            for (var r = 0; r < _ranks.Length; r++)
            {
                var source = _nodeOfRank[r];
                for (var l = 0; l < _layers; l++)
                {
                    var offset = r * perRank + (long)l * pairs;
                    Route(r, l, tokens, ids.AsSpan(checked((int)offset), pairs), offset);
                    remote += RemoteNodes(_physical.AsSpan(0, pairs), source);
                }
            }
            for (var r = 0; r < _ranks.Length; r++)
            {
                if (_options.Backend != Backend.Cpu) _ranks[r].Stream.CheckDeviceErrors();
                _counterBuffers[r].CopyTo(_counters[r], 0, _ranks[r].Stream);
            }
            Price(pass, phase, tokens);
            _remoteNodes[pass] = remote;

            _state.Step();
            var migration = Commits(pass);
            _migrationSeconds[pass] = migration;
            _stepSeconds[pass] += migration;
        }

        private void Route(int rank, int layer, int tokens, ReadOnlySpan<int> drawn, long offset)
        {
            var pairs = tokens * _k;
            var stream = _ranks[rank].Stream;
            var state = _ranks[rank].LayerStates![layer];
            if (_shared.Kernel == SimulationKernel.Mapping)
            {
                ExpertMapping.MapToPhysical(stream, _shared.Ids!.Slice(offset, pairs), _k, state, _deviceIds.Slice(0, pairs));
            }
            else if (_options.Backend == Backend.Cpu)
            {
                // The host form of the same kernel (eplb_route_hash on the CPU stream) reads the drawn ids in place.
                _routers[rank][layer].RouteByHash(_shared.HostLogits.AsSpan(0, tokens * _model.LogicalExperts), _shared.HostTokenIds.AsSpan(0, tokens),
                    drawn, _physical.AsSpan(0, pairs), _weights.AsSpan(0, pairs));
                return;
            }
            else
            {
                _routers[rank][layer].RouteByHash(stream, _shared.Logits!.Slice(0, (long)tokens * _model.LogicalExperts), _shared.TokenIds!.Slice(0, tokens),
                    _shared.Ids!.Slice(offset, pairs), _deviceIds.Slice(0, pairs), _deviceWeights.Slice(0, pairs));
            }
            _deviceIds.Slice(0, pairs).CopyTo(_physical.AsSpan(0, pairs), stream);
        }

        // Other nodes one rank's tokens reach: per token, the distinct nodes of its K slots but its own.
        private long RemoteNodes(ReadOnlySpan<int> physical, int source)
        {
            long remote = 0;
            if (_nodes <= 64)
            {
                var own = 1UL << source;
                for (var t = 0; t < physical.Length; t += _k)
                {
                    var mask = 0UL;
                    foreach (var slot in physical.Slice(t, _k)) mask |= _nodeBitOfSlot[slot];
                    remote += BitOperations.PopCount(mask & ~own);
                }
                return remote;
            }
            var seen = new HashSet<int>();
            for (var t = 0; t < physical.Length; t += _k)
            {
                seen.Clear();
                foreach (var slot in physical.Slice(t, _k))
                    if (_nodeOfSlot[slot] != source) seen.Add(_nodeOfSlot[slot]);
                remote += seen.Count;
            }
            return remote;
        }

        // The cost model over this pass's per-rank counters: [source rank][layer][slot] pairs.
        private void Price(long pass, SimulationPhase phase, int tokens)
        {
            var ranks = _ranks.Length;
            var decode = phase.Kind == PhaseKind.Decode;
            var seconds = _cost.OtherSeconds + _layers * _cost.DenseSeconds(tokens, decode);
            double sumOfMeans = 0, sumOfMaxima = 0;
            long crossPairs = 0, pairs = 0;
            for (var l = 0; l < _layers; l++)
            {
                Array.Clear(_slotLoad);
                Array.Clear(_rankPairs);
                Array.Clear(_intraSent);
                Array.Clear(_intraReceived);
                Array.Clear(_crossSent);
                Array.Clear(_crossReceived);
                Array.Clear(_activeSlots);
                for (var g = 0; g < ranks; g++)
                {
                    var row = _counters[g].AsSpan(l * _slots, _slots);
                    var node = _nodeOfRank[g];
                    for (var s = 0; s < row.Length; s++)
                    {
                        long v = row[s];
                        if (v == 0) continue;
                        _slotLoad[s] += v;
                        var d = _rankOfSlot[s];
                        if (d == g) continue;
                        if (_nodeOfSlot[s] == node)
                        {
                            _intraSent[g] += v;
                            _intraReceived[d] += v;
                        }
                        else
                        {
                            _crossSent[g] += v;
                            _crossReceived[d] += v;
                            crossPairs += v;
                        }
                    }
                }
                for (var s = 0; s < _slots; s++)
                {
                    if (_slotLoad[s] == 0) continue;
                    _rankPairs[_rankOfSlot[s]] += _slotLoad[s];
                    _activeSlots[_rankOfSlot[s]]++;
                    pairs += _slotLoad[s];
                }
                var layerSeconds = 0.0;
                long max = 0, sum = 0;
                for (var d = 0; d < ranks; d++)
                {
                    var gpu = _cost.ExpertSeconds(_activeSlots[d], _rankPairs[d])
                              + _cost.CommunicationSeconds(_intraSent[d], _intraReceived[d], _crossSent[d], _crossReceived[d]);
                    layerSeconds = Math.Max(layerSeconds, gpu);
                    max = Math.Max(max, _rankPairs[d]);
                    sum += _rankPairs[d];
                }
                seconds += layerSeconds;
                sumOfMeans += (double)sum / ranks;
                sumOfMaxima += max;
            }
            _stepSeconds[pass] = seconds;
            _sumOfMeans[pass] = sumOfMeans;
            _sumOfMaxima[pass] = sumOfMaxima;
            _tokens[pass] = (long)tokens * ranks;
            _pairs[pass] = pairs;
            _crossPairs[pass] = crossPairs;
        }

        // Layers whose placement changed in this step: what they moved, what it cost, and which rearrangement they belong to.
        private double Commits(long pass)
        {
            var ranks = _ranks.Length;
            var placement = _model.Placement;
            double[]? intra = null, cross = null;
            double seconds = 0, bytes = 0;
            long slots = 0;
            var committed = 0;
            var lastLayer = -1;
            var firstLayer = -1;
            for (var l = 0; l < _layers; l++)
            {
                var now = placement.Phy2Log(l);
                if (now.SequenceEqual(_phy2Log[l])) continue;
                var plan = MigrationPlanner.PlanLayer(_phy2Log[l], now, ranks, batch: false);
                if (intra is null || _options.UseAsync)
                {
                    intra = new double[ranks];
                    cross = new double[ranks];
                }
                foreach (var transfer in plan.Transfers)
                {
                    var into = _nodeOfRank[transfer.DestinationRank] == _nodeOfRank[transfer.SourceRank] ? intra : cross!;
                    into[transfer.DestinationRank] += _cost.ExpertBytes;
                    bytes += _cost.ExpertBytes;
                }
                // Async: each layer's staging traffic shares the links with this pass.
                if (_options.UseAsync) seconds += Enumerable.Range(0, ranks).Max(d => _cost.TransferSeconds(intra[d], cross![d]));
                slots += plan.SlotsChanged;
                now.CopyTo(_phy2Log[l]);
                committed++;
                if (firstLayer < 0) firstLayer = l;
                lastLayer = l;
            }
            // Sync: every rank waits for the busiest rank's bytes of all layers.
            if (!_options.UseAsync && intra != null) seconds = Enumerable.Range(0, ranks).Max(d => _cost.TransferSeconds(intra[d], cross![d]));

            var last = pass == _stepSeconds.Length - 1;
            if (committed == 0)
            {
                CloseStreak(completed: true);
                return 0;
            }
            if (!_options.UseAsync)
            {
                // A sync rearrangement commits all its layers inside one step.
                CloseStreak(completed: true);
                _rearrangements.Add(new RearrangementRecord(pass, pass, committed, slots, bytes, seconds, Completed: true));
                return seconds;
            }
            // Async: one layer a pass, in ascending order; a layer at or below the last one starts the next rearrangement.
            if (_streak != null && firstLayer <= _streak.LastLayer) CloseStreak(completed: true);
            _streak ??= new Streak(pass);
            _streak.Add(pass, lastLayer, committed, slots, bytes, seconds);
            // The run ends inside a rearrangement unless its last layer is the model's last.
            if (last) CloseStreak(completed: lastLayer == _layers - 1);
            return seconds;
        }

        private void CloseStreak(bool completed)
        {
            if (_streak is null) return;
            _rearrangements.Add(new RearrangementRecord(_streak.FirstPass, _streak.LastPass, _streak.Layers, _streak.Slots, _streak.Bytes,
                _streak.Seconds, completed));
            _streak = null;
        }

        public SimulationRun Figures(long? steady, bool[] decodePasses, (string Name, long From, long To)[] phases, SimulationRun? baseline)
        {
            CloseStreak(completed: false);
            var passes = _stepSeconds.Length;
            var whole = (From: 0L, To: (long)passes);
            (long From, long To)? steadyRange = steady.HasValue ? (steady.Value, passes) : null;
            SteadyAndWhole Over(Func<long, long, double> figure) =>
                new(steadyRange.HasValue ? figure(steadyRange.Value.From, steadyRange.Value.To) : null, figure(whole.From, whole.To));
            double Ratio(long from, long to, Func<long, double> numerator, Func<long, double> denominator)
            {
                double n = 0, d = 0;
                for (var p = from; p < to; p++)
                {
                    n += numerator(p);
                    d += denominator(p);
                }
                return d > 0 ? n / d : 0;
            }
            var tokensPerSecond = Over((a, b) => Ratio(a, b, p => _tokens[p], p => _stepSeconds[p]));
            PhaseFigures Phase((string Name, long From, long To) phase)
            {
                var from = steady.HasValue ? Math.Max(steady.Value, phase.From) : phase.To;
                SteadyAndWhole Within(Func<long, double> numerator, Func<long, double> denominator) =>
                    new(from < phase.To ? Ratio(from, phase.To, numerator, denominator) : null, Ratio(phase.From, phase.To, numerator, denominator));
                return new PhaseFigures(phase.Name, Within(p => _sumOfMeans[p], p => _sumOfMaxima[p]), Within(p => _tokens[p], p => _stepSeconds[p]));
            }
            var completed = _rearrangements.Where(r => r.Completed).ToList();
            return new SimulationRun
            {
                Name = Name,
                Slots = _slots,
                Policy = Policy,
                Balancedness = Over((a, b) => Ratio(a, b, p => _sumOfMeans[p], p => _sumOfMaxima[p])),
                CrossNodeFraction = Over((a, b) => Ratio(a, b, p => _crossPairs[p], p => _pairs[p])),
                RemoteNodesPerToken = Over((a, b) => Ratio(a, b, p => _remoteNodes[p], p => (double)_tokens[p] * _layers)),
                TokensPerSecond = tokensPerSecond,
                GainVsNoEplb = baseline is null
                    ? new SteadyAndWhole(steady.HasValue ? 0 : null, 0)
                    : new SteadyAndWhole(tokensPerSecond.Steady / baseline.TokensPerSecond.Steady - 1,
                        tokensPerSecond.Whole / baseline.TokensPerSecond.Whole - 1),
                StepMs = Percentiles(0, passes, decodePasses)!.Value,
                SteadyStepMs = steady.HasValue ? Percentiles(steady.Value, passes, decodePasses) : null,
                StallSeconds = completed.Count > 0 ? completed.Average(r => r.Seconds) : 0,
                RearrangementsCompleted = completed.Count,
                RearrangementsFailed = _state.FailedRearrangements,
                SlotsMoved = completed.Sum(r => r.SlotsMoved),
                BytesMovedPerGpu = completed.Sum(r => r.BytesReceived) / _ranks.Length,
                Phases = phases.Select(Phase).ToArray(),
                Rearrangements = _rearrangements.ToArray(),
                StepSeconds = _stepSeconds,
                TokensPerPass = _tokens,
                BalancednessPerPass = _sumOfMeans.Zip(_sumOfMaxima, (m, x) => x > 0 ? m / x : 0).ToArray(),
            };
        }

        // Nearest-rank percentiles of the decode passes' step times in [from, to), milliseconds.
        private StepPercentiles? Percentiles(long from, long to, bool[] decodePasses)
        {
            var times = new List<double>();
            for (var p = from; p < to; p++)
                if (decodePasses[p]) times.Add(_stepSeconds[p] * 1000);
            if (times.Count == 0) return null;
            times.Sort();
            double At(double q) => times[Math.Clamp((int)Math.Ceiling(q * times.Count) - 1, 0, times.Count - 1)];
            return new StepPercentiles(At(0.50), At(0.99));
        }

        public void Dispose()
        {
            _state.Dispose();
            _transport.Dispose();
            _deviceIds.Dispose();
            _deviceWeights.Dispose();
            foreach (var rank in _ranks) rank.Dispose();
        }

        private sealed class Streak(long firstPass)
        {
            public long FirstPass { get; } = firstPass;
            public long LastPass { get; private set; } = firstPass;
            public int LastLayer { get; private set; } = -1;
            public int Layers { get; private set; }
            public long Slots { get; private set; }
            public double Bytes { get; private set; }
            public double Seconds { get; private set; }

            public void Add(long pass, int lastLayer, int layers, long slots, double bytes, double seconds)
            {
                LastPass = pass;
                LastLayer = lastLayer;
                Layers += layers;
                Slots += slots;
                Bytes += bytes;
                Seconds += seconds;
            }
        }
    }
}
