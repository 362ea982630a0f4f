using Eplb.Runtime;

namespace Eplb.Simulation;

/// <summary>A figure over the steady state and over the whole run.</summary>
/// <param name="Steady">Over the passes after every policy's first rearrangement completed (null when none completed).</param>
/// <param name="Whole">Over every pass.</param>
public readonly record struct SteadyAndWhole(double? Steady, double Whole);

/// <summary>A run's figures over one phase.</summary>
/// <param name="Phase">The phase's name.</param>
/// <param name="Balancedness">Over the phase's steady passes and over all its passes.</param>
/// <param name="TokensPerSecond">Likewise (cost model).</param>
public sealed record PhaseFigures(string Phase, SteadyAndWhole Balancedness, SteadyAndWhole TokensPerSecond);

/// <summary>Step time percentiles, milliseconds.</summary>
/// <param name="P50">Median.</param>
/// <param name="P99">99th percentile (nearest rank).</param>
public readonly record struct StepPercentiles(double P50, double P99);

/// <summary>One rearrangement as the simulated model saw it: the passes that committed its layers and what it moved.</summary>
/// <param name="FirstPass">The pass that committed its first layer.</param>
/// <param name="LastPass">The pass that committed its last layer.</param>
/// <param name="Layers">Layers committed.</param>
/// <param name="SlotsMoved">Slots whose expert changed.</param>
/// <param name="BytesReceived">Expert bytes received over all ranks (at the cost model's expert size).</param>
/// <param name="Seconds">Time it added (sync: the stall; async: the staging traffic of its passes).</param>
/// <param name="Completed">False for one still committing layers when the run ended.</param>
public sealed record RearrangementRecord(long FirstPass, long LastPass, int Layers, long SlotsMoved, double BytesReceived, double Seconds, bool Completed);

/// <summary>One run's figures: a baseline or one policy (docs/benchmarks.md says what each means).</summary>
public sealed record SimulationRun
{
    /// <summary><c>no EPLB</c>, <c>static</c>, a policy, or a policy with <c>+local</c> (node-local replica selection).</summary>
    public required string Name { get; init; }

    /// <summary>R of this run.</summary>
    public required int Slots { get; init; }

    /// <summary>The policy, null for the two baselines.</summary>
    public string? Policy { get; init; }

    /// <summary>Aggregate balancedness of the routed (token, expert) pairs per rank (docs/design.md §1), pass by pass.</summary>
    public required SteadyAndWhole Balancedness { get; init; }

    /// <summary>Share of (token, expert) pairs served on another node than the token's rank.</summary>
    public required SteadyAndWhole CrossNodeFraction { get; init; }

    /// <summary>Mean number of other nodes a token is sent to in one MoE layer (its K experts' nodes but its own).</summary>
    public required SteadyAndWhole RemoteNodesPerToken { get; init; }

    /// <summary>Tokens per second over all ranks (cost model).</summary>
    public required SteadyAndWhole TokensPerSecond { get; init; }

    /// <summary>Tokens per second relative to <c>no EPLB</c>, minus 1 (0 for <c>no EPLB</c>).</summary>
    public required SteadyAndWhole GainVsNoEplb { get; init; }

    /// <summary>Step time of the decode passes over the whole run (all passes when there are none), cost model.</summary>
    public required StepPercentiles StepMs { get; init; }

    /// <summary>Step time of the decode passes in the steady state (null when there is none).</summary>
    public StepPercentiles? SteadyStepMs { get; init; }

    /// <summary>Mean seconds a completed rearrangement cost (sync stall or async staging traffic); 0 when none.</summary>
    public required double StallSeconds { get; init; }

    /// <summary>Rearrangements that committed every layer they changed.</summary>
    public required int RearrangementsCompleted { get; init; }

    /// <summary>Rearrangements that stopped on a fault (EplbState's count).</summary>
    public required int RearrangementsFailed { get; init; }

    /// <summary>Slots moved by the completed rearrangements.</summary>
    public required long SlotsMoved { get; init; }

    /// <summary>Expert bytes the completed rearrangements moved, per GPU (mean), at the cost model's expert size.</summary>
    public required double BytesMovedPerGpu { get; init; }

    /// <summary>Balancedness and tokens/s of each phase (the steady state and the whole run mix decode and prefill passes).</summary>
    public required IReadOnlyList<PhaseFigures> Phases { get; init; }

    /// <summary>Every rearrangement seen, the unfinished one at the end included.</summary>
    public required IReadOnlyList<RearrangementRecord> Rearrangements { get; init; }

    /// <summary>Model step seconds of each pass.</summary>
    public required double[] StepSeconds { get; init; }

    /// <summary>Tokens each pass processed over all ranks.</summary>
    public required long[] TokensPerPass { get; init; }

    /// <summary>Balancedness of each pass (mean / max rank load, summed over layers).</summary>
    public required double[] BalancednessPerPass { get; init; }
}

/// <summary>What a simulation measured.</summary>
/// <param name="Backend">Where the kernels ran.</param>
/// <param name="Runs">The runs in table order (<c>no EPLB</c> first).</param>
/// <param name="PhaseStarts">The first pass of each phase.</param>
/// <param name="SteadyFromPass">The first steady pass (after every policy's first rearrangement completed); null when there is none.</param>
/// <param name="RequestsStarted">Requests the traffic started (all ranks and phases).</param>
public sealed record SimulationResult(Backend Backend, IReadOnlyList<SimulationRun> Runs, IReadOnlyList<long> PhaseStarts, long? SteadyFromPass,
    long RequestsStarted)
{
    /// <summary>The run without EPLB.</summary>
    public SimulationRun NoEplb => Runs[0];

    /// <summary>Passes of every run.</summary>
    public long Passes => Runs[0].StepSeconds.Length;
}
