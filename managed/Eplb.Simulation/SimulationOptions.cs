using System.Text.RegularExpressions;
using Eplb.Load;
using Eplb.Placement;
using Eplb.Runtime;

namespace Eplb.Simulation;

/// <summary>Which kernel turns each rank's drawn top-k ids into slots and load (both share the EPLB epilogue of docs/design.md §4.3).</summary>
public enum SimulationKernel
{
    /// <summary>
    /// <c>eplb_map_logical_to_physical</c>: the epilogue every routing kernel fuses (replica choice,
    /// load recording) on the drawn ids. The default: it is what EPLB sees, at a fifth of the cost.
    /// </summary>
    Mapping = 0,
    /// <summary>
    /// <c>eplb_route_hash</c> (DeepSeek-V4 hash routing) with the drawn ids as its table: the same
    /// slots and load, plus the routing weights, which the simulation does not use (4-7x the time).
    /// </summary>
    Hash = 1,
}

/// <summary>What a phase of the simulated serving does each pass.</summary>
public enum PhaseKind
{
    /// <summary>Every rank decodes one token for each of its requests (<see cref="SimulationOptions.DecodeTokens"/> requests per rank).</summary>
    Decode = 0,
    /// <summary>Every rank prefills <see cref="SimulationOptions.PrefillTokens"/> prompt tokens, request after request.</summary>
    Prefill = 1,
}

/// <summary>One phase of a simulation: the load its routing is drawn from, what the ranks do, and for how many passes.</summary>
/// <param name="Name">For tables and plots (the dump's file name without extension).</param>
/// <param name="Load">The recorded load the routing is drawn from (MoE layers only).</param>
/// <param name="Kind">Decode or prefill.</param>
/// <param name="Passes">Forward passes of the phase (at least 1).</param>
/// <param name="PromptTokens">Prefill: tokens of each request's prompt (at least 1).</param>
public sealed record SimulationPhase(string Name, ExpertLoad Load, PhaseKind Kind, int Passes, int PromptTokens = 2048)
{
    /// <summary>
    /// The phase a dump's name suggests: "prefill" in the name means prefill, anything else decode;
    /// a prompt length <c>in&lt;n&gt;</c> in the name (SGLang's benchmark dumps: prefill_in4096) sets
    /// <see cref="PromptTokens"/>, else 2048.
    /// </summary>
    public static SimulationPhase FromName(string name, ExpertLoad load, int decodePasses, int prefillPasses)
    {
        var prefill = name.Contains("prefill", StringComparison.OrdinalIgnoreCase);
        var match = Regex.Match(name, @"in(\d{1,6})");
        var prompt = match.Success && int.TryParse(match.Groups[1].Value, out var n) && n > 0 ? n : 2048;
        return new SimulationPhase(name, load, prefill ? PhaseKind.Prefill : PhaseKind.Decode, prefill ? prefillPasses : decodePasses, prompt);
    }
}

/// <summary>Settings of a <see cref="ServingSimulation"/> (docs/benchmarks.md, "The simulator", says what each changes).</summary>
public sealed record SimulationOptions
{
    /// <summary>The phases, run in turn (requests restart at each phase; EPLB carries on).</summary>
    public required IReadOnlyList<SimulationPhase> Phases { get; init; }

    /// <summary>G, expert-parallel ranks (GPUs); each originates its own tokens every pass (data-parallel attention).</summary>
    public int Ranks { get; init; } = 32;

    /// <summary>Nodes the ranks span (consecutive ranks share a node).</summary>
    public int Nodes { get; init; } = 4;

    /// <summary>R, physical slots per layer of the EPLB runs and of <c>static</c> (N + redundant).</summary>
    public int Slots { get; init; } = 288;

    /// <summary>Expert groups (DeepSeek-V3: 8), for the group limit of the routing and for the policies.</summary>
    public int Groups { get; init; } = 8;

    /// <summary>Groups one token may route to (DeepSeek-V3: 4 of 8); <see cref="Groups"/> turns the limit off.</summary>
    public int TopKGroups { get; init; } = 4;

    /// <summary>K, experts per token.</summary>
    public int TopK { get; init; } = 8;

    /// <summary>Decode: requests (one token each per pass) per rank.</summary>
    public int DecodeTokens { get; init; } = 128;

    /// <summary>Prefill: prompt tokens per rank per pass.</summary>
    public int PrefillTokens { get; init; } = 1024;

    /// <summary>Mean decode passes a request lives (geometric) before a new one replaces it.</summary>
    public double RequestPasses { get; init; } = 1000;

    /// <summary>
    /// Request affinity in [0, 1]: each of a token's K experts is, with this probability, one of its
    /// request's own K experts (drawn once when the request starts), else a fresh pick from the load.
    /// </summary>
    public double Affinity { get; init; } = 0.5;

    /// <summary>The policies to run (after <c>no EPLB</c> and <c>static</c>).</summary>
    public IReadOnlyList<string> Policies { get; init; } = ["deepseek", "locality", "incremental"];

    /// <summary>Policies run a second time with node-local replica selection (each must also be in <see cref="Policies"/>).</summary>
    public IReadOnlyList<string> NodeLocalPolicies { get; init; } = ["locality"];

    /// <summary>EPLB load window, passes.</summary>
    public int WindowSize { get; init; } = 32;

    /// <summary>EPLB rearrangement interval, passes (the first after a quarter of it).</summary>
    public int StepInterval { get; init; } = 64;

    /// <summary>Async rearrangement (one layer committed per pass) instead of all layers inside one pass.</summary>
    public bool UseAsync { get; init; } = true;

    /// <summary>The kernel each rank's routing goes through (the same slots and load either way).</summary>
    public SimulationKernel Kernel { get; init; } = SimulationKernel.Mapping;

    /// <summary>Seed of every draw: the same seed gives the same result.</summary>
    public int Seed { get; init; } = 1;

    /// <summary>Backend of the kernels and buffers.</summary>
    public Backend Backend { get; init; } = Backend.Cpu;

    /// <summary>Floats per expert of the scaled-down weights the simulated ranks migrate.</summary>
    public int ExpertFloats { get; init; } = 64;

    /// <summary>Runs advanced in parallel (each is single-threaded apart from its EPLB worker).</summary>
    public int MaxParallelRuns { get; init; } = Environment.ProcessorCount;

    /// <summary>The time model (DeepSeek-V3 FP8 on H200 by default).</summary>
    public CostModel Cost { get; init; } = CostModel.DeepSeekV3OnH200;

    /// <summary>Forward passes over all phases.</summary>
    public long TotalPasses => Phases.Sum(p => (long)p.Passes);

    /// <summary>The runs, in table order: <c>no EPLB</c>, <c>static</c>, each policy, then the node-local ones.</summary>
    public IReadOnlyList<string> RunNames =>
        [NoEplbName, StaticName, .. Policies, .. NodeLocalPolicies.Select(p => p + NodeLocalSuffix)];

    /// <summary>The baseline without EPLB (N slots, one per expert, never moves).</summary>
    public const string NoEplbName = "no EPLB";

    /// <summary>The baseline with R slots in the initial layout that never moves (what redundancy alone buys).</summary>
    public const string StaticName = "static";

    /// <summary>Appended to a policy's name for its node-local run.</summary>
    public const string NodeLocalSuffix = "+local";

    /// <summary>
    /// The slots of <c>no EPLB</c>: N when N splits over G, else the smallest multiple of G above N
    /// (the initial layout then duplicates experts 0.. in the extra slots; the table says so).
    /// </summary>
    public int NoEplbSlots
    {
        get
        {
            var n = Phases.Count > 0 ? Phases[0].Load.LogicalExperts : 0;
            return Ranks > 0 && n % Ranks != 0 ? (n / Ranks + 1) * Ranks : n;
        }
    }

    /// <summary>
    /// Checks every setting against the others and the loads; the message names the value.
    /// </summary>
    /// <exception cref="ArgumentException">A setting is out of range or inconsistent.</exception>
    public void Validate()
    {
        if (Phases.Count == 0) throw new ArgumentException("no phase to simulate (give at least one load)");
        var first = Phases[0].Load;
        foreach (var phase in Phases)
        {
            if (phase.Load.Layers != first.Layers || phase.Load.LogicalExperts != first.LogicalExperts)
                throw new ArgumentException($"every load must have the same layers x experts: {phase.Name} has {phase.Load.Layers} x {phase.Load.LogicalExperts}, " +
                                            $"{Phases[0].Name} {first.Layers} x {first.LogicalExperts}");
            if (phase.Passes < 1) throw new ArgumentException($"phase {phase.Name}: passes must be >= 1 (got {phase.Passes})");
            if (phase.PromptTokens < 1) throw new ArgumentException($"phase {phase.Name}: prompt tokens must be >= 1 (got {phase.PromptTokens})");
            for (var l = 0; l < phase.Load.Layers; l++)
                if (!(phase.Load.LayerTotal(l) > 0))
                    throw new ArgumentException($"phase {phase.Name}: layer {phase.Load.LayerIds[l]} has no load to draw routing from");
        }
        if (first.Layers < 1) throw new ArgumentException("the loads have no MoE layer with load");
        _ = new ExpertTopology(first.Layers, first.LogicalExperts, Slots, Ranks, Nodes, Groups);
        if (TopK < 1 || TopK > first.LogicalExperts) throw new ArgumentException($"top-k ({TopK}) must be in [1, N = {first.LogicalExperts}]");
        if (TopKGroups < 1 || TopKGroups > Groups) throw new ArgumentException($"top-k groups ({TopKGroups}) must be in [1, groups = {Groups}]");
        if (TopKGroups < Groups && TopK > TopKGroups * (first.LogicalExperts / Groups))
            throw new ArgumentException($"top-k ({TopK}) does not fit in {TopKGroups} groups of {first.LogicalExperts / Groups} experts");
        if (TopKGroups < Groups && Groups > 64) throw new ArgumentException($"group-limited routing supports at most 64 groups (got {Groups})");
        if (first.LogicalExperts > ushort.MaxValue) throw new ArgumentException($"at most {ushort.MaxValue} experts (got {first.LogicalExperts})");
        if (DecodeTokens < 1) throw new ArgumentException($"decode tokens per rank must be >= 1 (got {DecodeTokens})");
        if (PrefillTokens < 1) throw new ArgumentException($"prefill tokens per rank must be >= 1 (got {PrefillTokens})");
        var idsPerPass = (double)first.Layers * Ranks * Math.Max(DecodeTokens, PrefillTokens) * TopK;
        if (idsPerPass > Array.MaxLength)
            throw new ArgumentException($"one pass would route {idsPerPass:N0} (token, expert) pairs ({first.Layers} layers x {Ranks} ranks x " +
                                        $"{Math.Max(DecodeTokens, PrefillTokens)} tokens x top-{TopK}); at most {Array.MaxLength:N0}");
        if (!(RequestPasses >= 1) || !double.IsFinite(RequestPasses)) throw new ArgumentException($"request passes must be a number >= 1 (got {RequestPasses})");
        if (!(Affinity >= 0 && Affinity <= 1)) throw new ArgumentException($"affinity must be in [0, 1] (got {Affinity})");
        if (WindowSize < 1) throw new ArgumentException($"window must be >= 1 (got {WindowSize})");
        if (StepInterval < 1) throw new ArgumentException($"interval must be >= 1 (got {StepInterval})");
        if (UseAsync && StepInterval < first.Layers + 2)
            throw new ArgumentException($"interval {StepInterval} is shorter than layers + 2 = {first.Layers + 2} with async EPLB: a rearrangement commits one " +
                                        $"layer per pass, so the next interval would fall inside it and the result would depend on thread timing; " +
                                        $"use an interval >= {first.Layers + 2} or sync EPLB");
        if (ExpertFloats < 16) throw new ArgumentException($"expert floats must be >= 16 (got {ExpertFloats})");
        if (MaxParallelRuns < 1) throw new ArgumentException($"parallel runs must be >= 1 (got {MaxParallelRuns})");
        foreach (var policy in Policies) PlacementPolicies.Get(policy);
        if (Policies.Distinct(StringComparer.OrdinalIgnoreCase).Count() != Policies.Count) throw new ArgumentException("a policy is listed twice");
        foreach (var policy in NodeLocalPolicies)
            if (!Policies.Contains(policy, StringComparer.OrdinalIgnoreCase))
                throw new ArgumentException($"node-local run of '{policy}' needs '{policy}' among the policies ({string.Join(", ", Policies)})");
    }

    /// <summary>
    /// Bytes the run would allocate, estimated from the settings alone (before anything is
    /// allocated): per run and rank the EPLB window, counters, sums and tables, the weights and one
    /// layer of staging; per rank the routing buffers; the routing drawn for a pass, the requests'
    /// experts and the per-pass records. Within a factor of about 1.5 of what the process uses.
    /// </summary>
    public double EstimateMemoryBytes()
    {
        if (Phases.Count == 0) return 0;
        double layers = Phases[0].Load.Layers, experts = Phases[0].Load.LogicalExperts;
        double ranks = Ranks, k = TopK, runs = RunNames.Count;
        var tokens = Math.Max((double)DecodeTokens, PrefillTokens);
        var perRankRun = 0.0;
        foreach (var (slots, window) in new[] { ((double)NoEplbSlots, 1.0), (Slots, 1.0) }
                     .Concat(Enumerable.Repeat(((double)Slots, (double)WindowSize), (int)runs - 2)))
        {
            var kmax = Math.Min(experts, slots - experts + 1);
            perRankRun += layers * slots * 4 * (window + 1) + layers * slots * 8        // window ring, counters, 64-bit sums
                          + layers * experts * (kmax + 1) * 4                           // log2phy, logcnt
                          + (layers + 1) * (slots / ranks) * ExpertFloats * 4 * 17 / 16 // weights + one layer of staging
                          + tokens * k * 8;                                             // physical ids and weights
        }
        var shared = 2 * layers * ranks * tokens * k * 4        // the pass's routing: host and device copies
                     + tokens * (experts * 4 + 8)               // zero logits and token ids
                     + ranks * DecodeTokens * (layers * k * 2 + 16) // decode requests' own experts
                     + layers * experts * 8 * 6 * Phases.Count  // samplers
                     + TotalPasses * runs * 12 * 8;             // per-pass records
        return ranks * perRankRun + shared + runs * layers * Slots * 4 * 8;  // + placements the policies and planner keep
    }
}
