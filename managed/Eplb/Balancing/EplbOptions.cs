using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Placement;
using Microsoft.Extensions.Options;

namespace Eplb.Balancing;

/// <summary>
/// EPLB settings (docs/design.md §3.1), bound from configuration (<c>services.AddEplb(configuration.GetSection("Eplb"))</c>)
/// and validated at start; invalid settings fail with one message listing every violation.
/// </summary>
public sealed class EplbOptions
{
    /// <summary>The configuration section AddEplb binds by convention.</summary>
    public const string SectionName = "Eplb";

    /// <summary>Whether EPLB runs at all. Default true.</summary>
    public bool Enabled { get; set; } = true;

    /// <summary>Passes in the load window. Default 1000; must be &gt; 0.</summary>
    public int WindowSize { get; set; } = 1000;

    /// <summary>
    /// Passes between rearrangements (the first comes after a quarter of it). Default 3000; must be
    /// &gt; 0. A window longer than the interval mixes in loads recorded under the old placement (warned).
    /// </summary>
    public int StepInterval { get; set; } = 3000;

    /// <summary>Extra physical slots per layer, R = N + this. Default 0; &gt; 0 requires EPLB enabled.</summary>
    public int RedundantExperts { get; set; }

    /// <summary>Log the balancedness every <see cref="LogBalancednessInterval"/> passes. Default false.</summary>
    public bool LogBalancedness { get; set; }

    /// <summary>Passes between balancedness log lines. Default 1; must be &gt; 0.</summary>
    public int LogBalancednessInterval { get; set; } = 1;

    /// <summary>Rearrange in the background, committing one layer per pass (default true, as vLLM since #43219).</summary>
    public bool UseAsync { get; set; } = true;

    /// <summary>The placement policy, a registered name. Default "deepseek".</summary>
    public string Policy { get; set; } = "deepseek";

    /// <summary>How weights move. NCCL with async is refused unless <see cref="AllowNcclWithAsync"/>.</summary>
    public TransportKind Communicator { get; set; } = TransportKind.Auto;

    /// <summary>
    /// The documented override for NCCL with async rearrangement: NCCL kernels on a second stream can
    /// deadlock with cooperative kernels and conflict with the forward stream (vLLM's reviewers: "NCCL
    /// should not be used asynchronously"); allow it only with NCCL_MAX_CTAS applied and no other
    /// NCCL traffic during transfers. <see cref="NcclTransport"/> keeps the background transfers and
    /// the serving thread's all-reduces on separate communicators and streams, so their orders never
    /// mix across ranks; the two communicators' kernels still share the GPU's SMs. Default false.
    /// </summary>
    public bool AllowNcclWithAsync { get; set; }

    /// <summary>How tokens pick a replica. Default TokenHash (SGLang #32962).</summary>
    public ReplicaSelection ReplicaSelection { get; set; } = ReplicaSelection.TokenHash;

    /// <summary>Expert groups of group-limited routing (DeepSeek-V3: 8), used by the policies. Default 1.</summary>
    public int Groups { get; set; } = 1;

    /// <summary>Nodes the ranks span (fast interconnect inside a node). Default 1.</summary>
    public int Nodes { get; set; } = 1;

    /// <summary>
    /// Kmax, the fixed capacity of a log2phy row (device tables never move). 0 derives
    /// min(N, RedundantExperts + 1), enough for any placement.
    /// </summary>
    public int MaxReplicas { get; set; }

    /// <summary>Keep experts in their old slot inside a rank when they stay on it (docs/design.md §2.2). Default true.</summary>
    public bool PreserveSlots { get; set; } = true;

    /// <summary>Never place two replicas of one expert on one rank (GPU). Default false.</summary>
    public bool NoDuplicateOnRank { get; set; }

    /// <summary>Order transfers so each rank talks to one peer per batch. Default true.</summary>
    public bool BatchTransfers { get; set; } = true;

    /// <summary>
    /// Skip a rearrangement when the placement in force already reaches this aggregate balancedness
    /// on the load window (SGLang's <c>eplb_min_rebalancing_utilization_threshold</c>, docs/design.md §3.2).
    /// Null (the default) never skips for this reason; otherwise in (0, 1].
    /// </summary>
    public double? BalancednessThreshold { get; set; }

    /// <summary>
    /// Skip a rearrangement when the plan would raise the aggregate balancedness on the load window
    /// by less than this (planned minus in force). Null (the default) applies every plan; otherwise in [0, 1].
    /// </summary>
    public double? MinBalancednessGain { get; set; }

    /// <summary>
    /// Async commit points by pass count (for simulations and reproducible runs): when &gt; 0, a staged
    /// layer commits exactly this many passes after its staging began, <see cref="EplbState.Step"/>
    /// waiting for the stage when it is not ready yet, so a run's outcome depends on pass counts only.
    /// 0 (the default, for serving) commits a layer at the first pass after every rank has staged it
    /// and never waits. Must be &gt;= 0; ignored when <see cref="UseAsync"/> is false.
    /// </summary>
    public int AsyncCommitPasses { get; set; }

    /// <summary>
    /// How long <see cref="EplbState.CancelRearrangement"/>, <see cref="EplbState.Dispose"/> and an
    /// aborted async rearrangement wait for the background transfer to stop. A transfer that ignores
    /// its cancellation longer is abandoned: its staged layer is dropped (never committed) and its
    /// staging buffers are set aside until it ends. Default 10 s; must be &gt;= 0 and finite.
    /// </summary>
    public TimeSpan CancelTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>The longest <see cref="CancelTimeout"/> accepted (a wait must stay bounded).</summary>
    public static readonly TimeSpan MaxCancelTimeout = TimeSpan.FromHours(1);

    /// <summary>The violations of the rules of docs/design.md §3.1 (empty when valid), the policy looked up among the built-in ones.</summary>
    public IReadOnlyList<string> Violations() => Violations(PlacementPolicies.Default);

    /// <summary>The violations of the rules of docs/design.md §3.1 (empty when valid), the policy looked up in <paramref name="policies"/>.</summary>
    public IReadOnlyList<string> Violations(PlacementPolicyCatalog policies)
    {
        ArgumentNullException.ThrowIfNull(policies);
        var errors = new List<string>();
        if (WindowSize <= 0) errors.Add($"WindowSize must be > 0 (got {WindowSize})");
        if (StepInterval <= 0) errors.Add($"StepInterval must be > 0 (got {StepInterval})");
        if (RedundantExperts < 0) errors.Add($"RedundantExperts must be >= 0 (got {RedundantExperts})");
        if (RedundantExperts > 0 && !Enabled)
            errors.Add($"RedundantExperts = {RedundantExperts} requires EPLB enabled (Enabled = false)");
        if (LogBalancednessInterval <= 0) errors.Add($"LogBalancednessInterval must be > 0 (got {LogBalancednessInterval})");
        if (Groups <= 0) errors.Add($"Groups must be > 0 (got {Groups})");
        if (Nodes <= 0) errors.Add($"Nodes must be > 0 (got {Nodes})");
        if (MaxReplicas < 0) errors.Add($"MaxReplicas must be >= 0 (got {MaxReplicas})");
        if (BalancednessThreshold is { } threshold && !(threshold > 0 && threshold <= 1))
            errors.Add($"BalancednessThreshold must be in (0, 1] when set (got {threshold})");
        if (MinBalancednessGain is { } gain && !(gain >= 0 && gain <= 1))
            errors.Add($"MinBalancednessGain must be in [0, 1] when set (got {gain})");
        if (AsyncCommitPasses < 0) errors.Add($"AsyncCommitPasses must be >= 0 (got {AsyncCommitPasses})");
        if (CancelTimeout < TimeSpan.Zero || CancelTimeout == Timeout.InfiniteTimeSpan || CancelTimeout > MaxCancelTimeout)
            errors.Add($"CancelTimeout must be >= 0 and at most {MaxCancelTimeout} (got {CancelTimeout})");
        if (!Enum.IsDefined(Communicator)) errors.Add($"Communicator '{Communicator}' is not one of {string.Join(", ", Enum.GetNames<TransportKind>())}");
        if (!Enum.IsDefined(ReplicaSelection)) errors.Add($"ReplicaSelection '{ReplicaSelection}' is not one of {string.Join(", ", Enum.GetNames<ReplicaSelection>())}");
        if (UseAsync && Communicator == TransportKind.Nccl && !AllowNcclWithAsync)
            errors.Add("Communicator = Nccl is refused with UseAsync = true (NCCL on a second stream conflicts with the forward " +
                       "stream and cooperative kernels); use UseAsync = false, or set AllowNcclWithAsync = true deliberately");
        if (string.IsNullOrWhiteSpace(Policy))
        {
            errors.Add("Policy must name a registered placement policy");
        }
        else if (!policies.TryGet(Policy, out var policy))
        {
            errors.Add($"Policy '{Policy}' is not registered (known: {string.Join(", ", policies.Names)})");
        }
        else if (UseAsync && !policy.SupportsAsync)
        {
            errors.Add($"UseAsync = true requires a policy that supports asynchronous rearrangement; '{Policy}' does not");
        }
        return errors;
    }

    /// <summary>Advice that does not stop the start (logged by <see cref="EplbState"/>).</summary>
    public IReadOnlyList<string> Warnings()
    {
        var warnings = new List<string>();
        if (WindowSize > StepInterval)
            warnings.Add($"WindowSize ({WindowSize}) > StepInterval ({StepInterval}): loads recorded under the previous " +
                         "placement are counted as if under the new one");
        return warnings;
    }
}

/// <summary>Validates <see cref="EplbOptions"/>: every violation of docs/design.md §3.1 in one result, the policy looked up in <c>policies</c>.</summary>
public sealed class EplbOptionsValidator(PlacementPolicyCatalog policies) : IValidateOptions<EplbOptions>
{
    /// <summary>Validates against the built-in policies.</summary>
    public EplbOptionsValidator() : this(PlacementPolicies.Default)
    {
    }

    /// <inheritdoc/>
    public ValidateOptionsResult Validate(string? name, EplbOptions options)
    {
        var violations = options.Violations(policies);
        return violations.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(violations);
    }
}
