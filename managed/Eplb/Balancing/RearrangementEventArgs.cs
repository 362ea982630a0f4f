namespace Eplb.Balancing;

/// <summary>How a rearrangement of one model ended (<see cref="EplbState.RearrangementEnded"/>).</summary>
public enum RearrangementOutcome
{
    /// <summary>Every layer the plan changes was committed on every rank.</summary>
    Completed = 0,
    /// <summary>A fault (here or on another rank) stopped it; committed layers stay, the rest keep the old placement.</summary>
    Failed = 1,
    /// <summary><see cref="EplbState.CancelRearrangement"/> or <see cref="EplbState.Dispose"/> stopped it; as Failed, without a fault.</summary>
    Cancelled = 2,
    /// <summary>It was not started: see <see cref="RearrangementEventArgs.SkipReason"/>. Nothing moved.</summary>
    Skipped = 3,
}

/// <summary>Why a due rearrangement was skipped.</summary>
public enum RearrangementSkipReason
{
    /// <summary>The load window holds no load yet.</summary>
    NoLoad = 0,
    /// <summary>The placement in force reaches <see cref="EplbOptions.BalancednessThreshold"/> on the window.</summary>
    BalancedEnough = 1,
    /// <summary>The plan gains less than <see cref="EplbOptions.MinBalancednessGain"/> on the window.</summary>
    GainTooSmall = 2,
}

/// <summary>
/// One rearrangement of one model that ended or was skipped: what it moved and what it achieved,
/// for logs and metrics. Figures count committed layers only; balancedness figures are aggregate
/// (docs/design.md §1) on the load window the plan was made from.
/// </summary>
public sealed class RearrangementEventArgs : EventArgs
{
    /// <summary>Completed, Failed, Cancelled or Skipped.</summary>
    public required RearrangementOutcome Outcome { get; init; }

    /// <summary>The model rearranged.</summary>
    public required EplbModel Model { get; init; }

    /// <summary><see cref="EplbState.StepCount"/> when it was planned.</summary>
    public required long Step { get; init; }

    /// <summary>Wall time from the start of planning to the end (the last commit, the fault, the cancellation or the skip).</summary>
    public required TimeSpan Duration { get; init; }

    /// <summary>Layers the plan changes (0 when skipped or when planning failed).</summary>
    public int LayersPlanned { get; init; }

    /// <summary>Layers committed on every rank.</summary>
    public int LayersCommitted { get; init; }

    /// <summary>Slots whose expert changed in the committed layers, over all ranks.</summary>
    public long SlotsMoved { get; init; }

    /// <summary>Experts received over the transport in the committed layers (one per rank and expert it lacked).</summary>
    public long ExpertsMoved { get; init; }

    /// <summary>Bytes of expert weights received over the transport in the committed layers.</summary>
    public long BytesMoved { get; init; }

    /// <summary>The placement in force when planning began, on the window (NaN when the window holds no load).</summary>
    public double BalancednessBefore { get; init; } = double.NaN;

    /// <summary>The plan's, on the same window (NaN when no plan was made).</summary>
    public double BalancednessPlanned { get; init; } = double.NaN;

    /// <summary>The placement in force at the end, on the same window: Planned when completed, Before when nothing was committed.</summary>
    public double BalancednessAfter { get; init; } = double.NaN;

    /// <summary>Why it was skipped (null unless <see cref="Outcome"/> is Skipped).</summary>
    public RearrangementSkipReason? SkipReason { get; init; }

    /// <summary>
    /// The fault that stopped it (Failed only): the first exception raised here, or an
    /// <see cref="InvalidOperationException"/> saying another rank gave up.
    /// </summary>
    public Exception? Exception { get; init; }

    /// <summary>
    /// The background transfer did not stop within <see cref="EplbOptions.CancelTimeout"/>: its staged
    /// layer was dropped and its staging buffers are released only when it ends.
    /// </summary>
    public bool WorkerAbandoned { get; init; }
}
