namespace Eplb.Simulation;

/// <summary>
/// The routing every rank originates, pass by pass, drawn per request (data-parallel attention: each
/// rank serves its own requests). A request keeps its own K experts per layer for its whole life
/// (drawn from the phase's load when it starts); each expert of each of its tokens is one of those
/// with probability <see cref="SimulationOptions.Affinity"/>, else a fresh draw (<see cref="ExpertSampler"/>).
/// Decode: each rank holds <see cref="SimulationOptions.DecodeTokens"/> requests, one token each per
/// pass; a request lives a geometric number of passes (mean <see cref="SimulationOptions.RequestPasses"/>)
/// and a new one takes its place. Prefill: each rank prefills <see cref="SimulationOptions.PrefillTokens"/>
/// prompt tokens per pass, a request's <see cref="SimulationPhase.PromptTokens"/> tokens in order,
/// across passes, then the next request. Every draw comes from a generator seeded by
/// (seed, pass, rank, layer), so the routing does not depend on threads.
/// </summary>
internal sealed class RequestTraffic
{
    private readonly SimulationOptions _options;
    private readonly int _layers;
    private readonly int _k;
    private ExpertSampler[] _samplers = [];
    private SimulationPhase? _phase;
    // Decode: [rank][slot] remaining passes and [rank][slot][layer][k] own experts.
    private int[][] _remaining = [];
    private ushort[][] _decodeExperts = [];
    // Prefill: per rank, the request being prefilled (its own experts [layer][k]) and its tokens left.
    private ushort[][] _prefillExperts = [];
    private int[] _promptLeft = [];
    private long _requests;

    public RequestTraffic(SimulationOptions options)
    {
        _options = options;
        _layers = options.Phases[0].Load.Layers;
        _k = options.TopK;
    }

    /// <summary>Requests started so far (over all ranks and phases).</summary>
    public long RequestsStarted => _requests;

    /// <summary>Tokens per rank in a pass of <paramref name="phase"/>.</summary>
    public int TokensPerRank(SimulationPhase phase) => phase.Kind == PhaseKind.Decode ? _options.DecodeTokens : _options.PrefillTokens;

    /// <summary>Starts a phase: its samplers, and fresh requests on every rank.</summary>
    public void StartPhase(SimulationPhase phase, int phaseIndex)
    {
        _phase = phase;
        _samplers = new ExpertSampler[_layers];
        Parallel.For(0, _layers, l => _samplers[l] = new ExpertSampler(phase.Load.Layer(l), _options.Groups, _options.TopKGroups));
        var ranks = _options.Ranks;
        if (phase.Kind == PhaseKind.Decode)
        {
            var slots = _options.DecodeTokens;
            _remaining = new int[ranks][];
            _decodeExperts = new ushort[ranks][];
            Parallel.For(0, ranks, r =>
            {
                var random = new FastRandom(_options.Seed, -1 - phaseIndex, r);
                _remaining[r] = new int[slots];
                _decodeExperts[r] = new ushort[(long)slots * _layers * _k];
                for (var s = 0; s < slots; s++) StartDecodeRequest(ref random, r, s);
            });
            _requests += (long)ranks * slots;
        }
        else
        {
            _prefillExperts = new ushort[ranks][];
            _promptLeft = new int[ranks];
            for (var r = 0; r < ranks; r++) _prefillExperts[r] = new ushort[_layers * _k];
        }
    }

    /// <summary>
    /// Draws pass <paramref name="pass"/> of the current phase into <paramref name="ids"/>, laid out
    /// <c>[rank][layer][token][k]</c> with <see cref="TokensPerRank"/> tokens per rank.
    /// </summary>
    public void Fill(long pass, int[] ids)
    {
        var phase = _phase ?? throw new InvalidOperationException("no phase started");
        var ranks = _options.Ranks;
        var tokens = TokensPerRank(phase);
        var perRank = (long)_layers * tokens * _k;
        // Prefill: which request each token of each rank belongs to this pass (the requests are
        // sequential, so a short list of (first token, experts) per rank).
        var segments = new List<(int First, ushort[] Experts)>[ranks];
        if (phase.Kind == PhaseKind.Prefill)
        {
            for (var r = 0; r < ranks; r++)
            {
                var random = new FastRandom(_options.Seed, pass, r, -1);
                segments[r] = [];
                var t = 0;
                while (t < tokens)
                {
                    if (_promptLeft[r] == 0)
                    {
                        StartRequestExperts(ref random, _prefillExperts[r]);
                        _promptLeft[r] = phase.PromptTokens;
                        _requests++;
                    }
                    segments[r].Add((t, _prefillExperts[r].ToArray()));
                    var take = Math.Min(_promptLeft[r], tokens - t);
                    _promptLeft[r] -= take;
                    t += take;
                }
            }
        }
        else
        {
            // A request whose passes are used up is replaced before this pass draws; each serves one token a pass.
            var started = new long[ranks];
            Parallel.For(0, ranks, r =>
            {
                var random = new FastRandom(_options.Seed, pass, r, -1);
                for (var s = 0; s < tokens; s++)
                {
                    if (_remaining[r][s] == 0)
                    {
                        StartDecodeRequest(ref random, r, s);
                        started[r]++;
                    }
                    _remaining[r][s]--;
                }
            });
            _requests += started.Sum();
        }
        var affinity = _options.Affinity;
        Parallel.For(0, ranks * _layers, job =>
        {
            var r = job / _layers;
            var l = job % _layers;
            var random = new FastRandom(_options.Seed, pass, r, l);
            var sampler = _samplers[l];
            var output = ids.AsSpan((int)(r * perRank + (long)l * tokens * _k), tokens * _k);
            if (phase.Kind == PhaseKind.Decode)
            {
                var own = _decodeExperts[r];
                for (var t = 0; t < tokens; t++)
                    sampler.Draw(ref random, output.Slice(t * _k, _k), own.AsSpan(((int)((long)t * _layers + l)) * _k, _k), affinity);
            }
            else
            {
                var list = segments[r];
                for (var i = 0; i < list.Count; i++)
                {
                    var end = i + 1 < list.Count ? list[i + 1].First : tokens;
                    var own = list[i].Experts.AsSpan(l * _k, _k);
                    for (var t = list[i].First; t < end; t++) sampler.Draw(ref random, output.Slice(t * _k, _k), own, affinity);
                }
            }
        });
    }

    private void StartDecodeRequest(ref FastRandom random, int rank, int slot)
    {
        _remaining[rank][slot] = random.NextGeometric(_options.RequestPasses);
        StartRequestExperts(ref random, _decodeExperts[rank].AsSpan((int)((long)slot * _layers * _k), _layers * _k));
    }

    // A new request's own experts in every layer: one token's routing drawn from the load.
    private void StartRequestExperts(ref FastRandom random, Span<ushort> experts)
    {
        Span<int> picks = stackalloc int[_k];
        for (var l = 0; l < _layers; l++)
        {
            _samplers[l].Draw(ref random, picks, default, 0);
            for (var j = 0; j < _k; j++) experts[l * _k + j] = (ushort)picks[j];
        }
    }
}
