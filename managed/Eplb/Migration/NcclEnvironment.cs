using Eplb.Kernels;
using Microsoft.Extensions.Logging;

namespace Eplb.Migration;

/// <summary>The all-to-all backend the serving engine uses (only DeepEP low-latency matters for NCCL_MAX_CTAS).</summary>
public enum AllToAllBackend
{
    /// <summary>Any backend other than DeepEP low-latency.</summary>
    Other = 0,
    /// <summary>DeepEP's low-latency kernels (cooperative, need their SMs).</summary>
    DeepEpLowLatency = 1,
}

/// <summary>The facts the NCCL environment rule looks at (docs/design.md §3.4).</summary>
/// <param name="DataParallelSize">Data-parallel ranks.</param>
/// <param name="EplbEnabled">Whether EPLB runs.</param>
/// <param name="Communicator">How EPLB moves weights between ranks.</param>
/// <param name="UseAsync">Whether rearrangement is asynchronous.</param>
/// <param name="AllToAll">The all-to-all backend.</param>
/// <param name="Moe">The MoE backend.</param>
public sealed record NcclEnvironmentContext(int DataParallelSize, bool EplbEnabled, TransportKind Communicator, bool UseAsync,
    AllToAllBackend AllToAll, MoeBackend Moe);

/// <summary>What <see cref="NcclEnvironment.Apply"/> did.</summary>
public enum NcclEnvironmentDecision
{
    /// <summary>The conditions do not hold; nothing changed.</summary>
    NotNeeded = 0,
    /// <summary>NCCL_MAX_CTAS was set to 8.</summary>
    SetMaxCtas = 1,
    /// <summary>The conditions hold but the user already set NCCL_MAX_CTAS to a number; it is kept.</summary>
    KeptUserValue = 2,
}

/// <summary>
/// The NCCL environment rule for EPLB (docs/design.md §3.4, vLLM <c>override_envs_for_eplb</c>): cooperative
/// kernels (DeepEP low-latency, the Mega MoE kernel) need every SM co-resident, and NCCL kernels
/// launched by EPLB transfers can occupy SMs and deadlock them. Before any NCCL communicator is
/// created, set <c>NCCL_MAX_CTAS=8</c> when all of: data-parallel size &gt; 1, EPLB enabled, the EPLB
/// communicator is NCCL-based, and (DeepEP low-latency with async EPLB, or the Mega MoE backend —
/// which needs it even with sync EPLB). A numeric value the user set is respected. Logged once.
/// </summary>
public static class NcclEnvironment
{
    /// <summary>The variable the rule sets.</summary>
    public const string MaxCtasVariable = "NCCL_MAX_CTAS";

    /// <summary>The value the rule sets.</summary>
    public const int MaxCtas = 8;

    private static int _applied;
    private static int _logged;

    /// <summary>Whether <see cref="Apply"/> has run in this process (an <see cref="NcclTransport"/> runs it before its communicator).</summary>
    public static bool HasRun => Volatile.Read(ref _applied) != 0;

    /// <summary>Whether the rule's conditions hold for the context.</summary>
    public static bool ConditionsHold(NcclEnvironmentContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        var nccl = context.Communicator == TransportKind.Nccl;
        var deepEpAsync = context.AllToAll == AllToAllBackend.DeepEpLowLatency && context.UseAsync;
        return context.DataParallelSize > 1 && context.EplbEnabled && nccl && (deepEpAsync || context.Moe == MoeBackend.MegaMoe);
    }

    /// <summary>
    /// Applies the rule to the process environment (or to <paramref name="environment"/> for tests):
    /// call it before creating any NCCL communicator. Returns what it did; logs the firing rule once.
    /// </summary>
    public static NcclEnvironmentDecision Apply(NcclEnvironmentContext context, ILogger? logger = null,
        IDictionary<string, string?>? environment = null)
    {
        Interlocked.Exchange(ref _applied, 1);
        if (!ConditionsHold(context)) return NcclEnvironmentDecision.NotNeeded;
        var current = environment != null
            ? environment.TryGetValue(MaxCtasVariable, out var value) ? value : null
            : Environment.GetEnvironmentVariable(MaxCtasVariable);
        if (!string.IsNullOrEmpty(current) && current.All(char.IsAsciiDigit))
            return NcclEnvironmentDecision.KeptUserValue;
        if (environment != null) environment[MaxCtasVariable] = MaxCtas.ToString();
        else Environment.SetEnvironmentVariable(MaxCtasVariable, MaxCtas.ToString());
        if (logger != null && Interlocked.Exchange(ref _logged, 1) == 0)
        {
            var reason = context.Moe == MoeBackend.MegaMoe ? "the cooperative Mega MoE backend" : "DeepEP low-latency with async EPLB";
            logger.LogInformation("EPLB: setting {Variable}={Value} for expert parallelism with an NCCL-based EPLB communicator and {Reason}",
                MaxCtasVariable, MaxCtas, reason);
        }
        return NcclEnvironmentDecision.SetMaxCtas;
    }
}
