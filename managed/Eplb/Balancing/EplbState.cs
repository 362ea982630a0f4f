using System.Diagnostics;
using System.Diagnostics.Metrics;
using Eplb.Kernels;
using Eplb.Load;
using Eplb.Migration;
using Eplb.Placement;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace Eplb.Balancing;

/// <summary>
/// The EPLB loop (docs/design.md §3.2): call <see cref="Step"/> once per forward pass. It pushes the pass's
/// expert counters into each model's load window (dummy passes advance the counter only), logs the
/// balancedness when asked, and every <see cref="EplbOptions.StepInterval"/> passes (the first after
/// a quarter of it) rearranges: window load folded to logical experts through the placement in force,
/// the policy, a migration plan per layer, the weight moves, the table commits.
/// <para>
/// A layer switches whole on every rank or not at all. It is first staged without touching what the
/// routers read (new weights into staging buffers, new tables into a second table set), every rank
/// votes that it has it, and then each rank switches by steps that each have an undo (weights
/// swapped with the staging buffer, tables copied from the second set, the model told), after which
/// every rank votes again; only when every vote succeeds does the placement in force change
/// (<see cref="EplbModel.CommitLayer"/>, docs/design.md §5). A fault anywhere — the model's
/// <see cref="IMixtureOfExperts.GetExpertWeights"/> or <see cref="IMixtureOfExperts.UpdateExpertMap"/>, a copy, the
/// transport, a collective — is logged with its exception, counted, reported by
/// <see cref="RearrangementEnded"/>, never thrown out of <see cref="Step"/>; the layers not yet committed
/// keep their placement and the next interval tries again.
/// </para>
/// <para>
/// Sync mode does all layers inside the step. Async mode (the default) stages in the background, one
/// layer at a time; <see cref="Step"/> commits a staged layer at the first pass at which every rank
/// has it (or, with <see cref="EplbOptions.AsyncCommitPasses"/>, exactly that many passes after its
/// staging began). An interval that falls while a rearrangement still runs is skipped and remembered
/// once (no runaway counter, vLLM #57883).
/// </para>
/// <para>
/// Threads: <see cref="Step"/>, <see cref="Rearrange"/>, <see cref="AddModel"/> and
/// <see cref="WaitForStagedLayer"/> belong to the serving loop's thread (they serialise on an internal
/// lock if called from several). <see cref="CancelRearrangement"/> and <see cref="Dispose"/> may be
/// called from any thread at any time, also while <see cref="Step"/> runs, and wait at most
/// <see cref="EplbOptions.CancelTimeout"/>. The counters, <see cref="StepCount"/>,
/// <see cref="IsRearranging"/>, <see cref="RearrangementPending"/>, <see cref="Models"/> and
/// <see cref="EplbModel.Placement"/> may be read from any thread (each read is a consistent value,
/// not a snapshot of several). The background worker calls only <see cref="IExpertTransport.Transfer"/>
/// and the model's <see cref="IMixtureOfExperts.GetExpertWeights"/>; collectives
/// (<see cref="IExpertTransport.AllReduceSum"/>, <see cref="IExpertTransport.AllReduceMin"/>) are issued
/// from the thread that calls <see cref="Step"/> only, in the same order on every rank.
/// </para>
/// </summary>
public sealed class EplbState : IDisposable
{
    private readonly EplbOptions _options;
    private readonly IExpertTransport _transport;
    private readonly ILogger _logger;
    private readonly IPlacementPolicy _policy;
    // Held by Step, Rearrange, AddModel and by whoever retires a rearrangement or releases the buffers.
    private readonly Lock _gate = new();
    private readonly List<RearrangementEventArgs> _events = [];
    private volatile EplbModel[] _models = [];
    private volatile Rearrangement[] _active = [];
    private volatile bool _pending;
    private volatile bool _disposed;
    private bool _released;
    private int _rearrangementStep;
    private long _stepCount;
    private int _completed, _failed, _cancelled, _skipped, _skippedIntervals, _abandoned, _stepFaults;
    private readonly EplbMetrics _metrics;
    private long _layersStaged, _layersCommitted, _slotsMoved, _expertsMoved, _bytesMoved;

    /// <summary>
    /// Creates the loop; the options are validated (one exception lists every violation) and the
    /// policy is looked up in <paramref name="policies"/> (default: the built-in ones). Its metrics go
    /// to the <c>Eplb</c> meter (<see cref="EplbMetrics"/>), created by <paramref name="meterFactory"/>
    /// when given (DI), else owned by this instance.
    /// </summary>
    /// <exception cref="OptionsValidationException">The options break a rule of docs/design.md §3.1.</exception>
    public EplbState(EplbOptions options, IExpertTransport transport, ILogger<EplbState>? logger = null, PlacementPolicyCatalog? policies = null,
        IMeterFactory? meterFactory = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(transport);
        policies ??= PlacementPolicies.Default;
        var violations = options.Violations(policies);
        if (violations.Count > 0) throw new OptionsValidationException(nameof(EplbOptions), typeof(EplbOptions), violations);
        var communicator = options.Communicator == TransportKind.Auto ? transport.Kind : options.Communicator;
        if (communicator != transport.Kind)
            throw new ArgumentException($"Communicator = {options.Communicator} but the transport is {transport.Kind}", nameof(transport));
        _options = options;
        _transport = transport;
        _logger = logger ?? (ILogger)NullLogger.Instance;
        _policy = policies.Get(options.Policy);
        foreach (var warning in options.Warnings()) _logger.LogWarning("EPLB: {Warning}", warning);
        // The first rearrangement comes after a quarter of the interval (vLLM: step counter starts at
        // interval - interval / 4), then every interval.
        _rearrangementStep = Math.Max(0, options.StepInterval - options.StepInterval / 4);
        _metrics = new EplbMetrics(this, meterFactory);
    }

    /// <summary>Creates the loop from DI-bound options.</summary>
    public EplbState(IOptions<EplbOptions> options, IExpertTransport transport, ILogger<EplbState> logger)
        : this(options.Value, transport, logger)
    {
    }

    /// <summary>
    /// Raised once per model and rearrangement when it ends (Completed, Failed, Cancelled) or is
    /// skipped, after the counters are updated; for metrics and logs. Raised on the thread that ended
    /// it (the <see cref="Step"/> thread; <see cref="CancelRearrangement"/>'s or <see cref="Dispose"/>'s
    /// for a cancellation), after EPLB's internal lock is released. A handler should be quick; an
    /// exception it throws is logged and ignored. An interval skipped because a rearrangement still
    /// runs raises nothing (it is deferred, see <see cref="RearrangementPending"/>).
    /// </summary>
    public event EventHandler<RearrangementEventArgs>? RearrangementEnded;

    /// <summary>The models, in the order they were added.</summary>
    public IReadOnlyList<EplbModel> Models => _models;

    /// <summary>Calls of <see cref="Step"/> so far (dummy ones included).</summary>
    public long StepCount => Interlocked.Read(ref _stepCount);

    /// <summary>Steps until the next rearrangement is due.</summary>
    public int StepsUntilRearrangement => _options.StepInterval - Volatile.Read(ref _rearrangementStep);

    /// <summary>Whether a rearrangement is in progress.</summary>
    public bool IsRearranging => _active.Length > 0;

    /// <summary>Whether an interval fell during a rearrangement and another one will follow it.</summary>
    public bool RearrangementPending => _pending;

    /// <summary>Rearrangements that ran to the end (all layers committed).</summary>
    public int CompletedRearrangements => Volatile.Read(ref _completed);

    /// <summary>Rearrangements that stopped on a fault or a cancellation (<see cref="CancelledRearrangements"/> included).</summary>
    public int FailedRearrangements => Volatile.Read(ref _failed);

    /// <summary>Of <see cref="FailedRearrangements"/>, those stopped by <see cref="CancelRearrangement"/> or <see cref="Dispose"/> without a fault.</summary>
    public int CancelledRearrangements => Volatile.Read(ref _cancelled);

    /// <summary>
    /// Rearrangements not started: no load in the window, the placement already balanced enough
    /// (<see cref="EplbOptions.BalancednessThreshold"/>), or too small a gain (<see cref="EplbOptions.MinBalancednessGain"/>).
    /// </summary>
    public int SkippedRearrangements => Volatile.Read(ref _skipped);

    /// <summary>Intervals that fell while a rearrangement ran.</summary>
    public int SkippedIntervals => Volatile.Read(ref _skippedIntervals);

    /// <summary>Background transfers that ignored their cancellation past <see cref="EplbOptions.CancelTimeout"/> and were abandoned.</summary>
    public int AbandonedTransfers => Volatile.Read(ref _abandoned);

    /// <summary>Faults inside <see cref="Step"/> outside a rearrangement (recording the pass, the balancedness log), logged and survived.</summary>
    public int StepFaults => Volatile.Read(ref _stepFaults);

    /// <summary>Layers committed by rearrangements so far (all models).</summary>
    public long LayersCommitted => Interlocked.Read(ref _layersCommitted);

    /// <summary>Layers staged (weights and tables ready in the staging set of every local rank) so far, committed or not.</summary>
    public long LayersStaged => Interlocked.Read(ref _layersStaged);

    /// <summary>Slots whose expert changed in committed layers so far.</summary>
    public long SlotsMoved => Interlocked.Read(ref _slotsMoved);

    /// <summary>Experts received over the transport in committed layers so far (one per rank and expert it lacked).</summary>
    public long ExpertsMoved => Interlocked.Read(ref _expertsMoved);

    /// <summary>Bytes of expert weights received over the transport in committed layers so far.</summary>
    public long BytesMoved => Interlocked.Read(ref _bytesMoved);

    /// <summary>The aggregate balancedness of the last logged pass (NaN before the first log line).</summary>
    public double LastLoggedBalancedness { get; private set; } = double.NaN;

    /// <summary>Called before every device copy of a migration; a test throws from it to fail that copy.</summary>
    internal CopyProbe? CopyProbe { get; set; }

    /// <summary>
    /// Registers a model with its ranks in this process (one per local rank; all of them with the
    /// in-process transport). A second model (e.g. a draft model) must have the same expert counts.
    /// The model's routers get their <see cref="EplbLayerState"/> views through
    /// <see cref="IMixtureOfExperts.SetEplbState"/>.
    /// </summary>
    public EplbModel AddModel(string name, IReadOnlyList<IMixtureOfExperts> localRanks)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(localRanks);
        if (!_options.Enabled) throw new InvalidOperationException("EPLB is disabled (EplbOptions.Enabled = false): routers run without EPLB state");
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var expected = _transport.LocalRanks.Order().ToArray();
            var given = localRanks.Select(r => r.Rank).Order().ToArray();
            if (!expected.SequenceEqual(given))
                throw new ArgumentException($"model '{name}' gives ranks [{string.Join(", ", given)}] but this process hosts [{string.Join(", ", expected)}]", nameof(localRanks));
            var first = localRanks[0];
            foreach (var rank in localRanks)
            {
                if (rank.Layers != first.Layers || rank.LogicalExperts != first.LogicalExperts ||
                    rank.Slots != first.Slots || rank.SlotsPerRank != first.SlotsPerRank)
                    throw new ArgumentException($"model '{name}': rank {rank.Rank} reports a different shape than rank {first.Rank}", nameof(localRanks));
            }
            var n = first.LogicalExperts;
            var r = first.Slots;
            var g = _transport.Ranks;
            if (r != n + _options.RedundantExperts)
                throw new ArgumentException($"model '{name}' has R = {r} slots for N = {n} experts, but RedundantExperts = {_options.RedundantExperts}", nameof(localRanks));
            var topology = new ExpertTopology(first.Layers, n, r, g, _options.Nodes, _options.Groups);
            if (first.SlotsPerRank != topology.SlotsPerRank)
                throw new ArgumentException($"model '{name}': its ranks hold {first.SlotsPerRank} slots each, but R = {r} over G = {g} ranks is {topology.SlotsPerRank}", nameof(localRanks));
            var models = _models;
            if (models.Length > 0 && (models[0].LogicalExperts != n || models[0].Slots != r))
                throw new ArgumentException($"model '{name}' has N = {n}, R = {r}; the first model '{models[0].Name}' has N = {models[0].LogicalExperts}, " +
                                            $"R = {models[0].Slots}: EPLB models must have identical expert counts", nameof(localRanks));
            var kmax = _options.MaxReplicas > 0 ? _options.MaxReplicas : Math.Min(n, _options.RedundantExperts + 1);
            var model = new EplbModel(name, localRanks, topology, _options.WindowSize, kmax, _options.ReplicaSelection);
            _models = [.. models, model];
            foreach (var rank in localRanks) rank.SetEplbState(model.LayerStates(rank.Rank));
            return model;
        }
    }

    /// <summary>
    /// One forward pass happened (call it after the pass's kernels are queued, on the thread that
    /// queues them). <paramref name="isDummy"/>: an idle data-parallel rank's pass — counted, not recorded.
    /// Faults are logged and counted, never thrown.
    /// </summary>
    /// <exception cref="ObjectDisposedException">The state was disposed.</exception>
    public void Step(bool isDummy = false)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        lock (_gate)
        {
            try
            {
                if (!_released) StepLocked(isDummy);
            }
            catch (Exception e)
            {
                // Every known fault is handled where it happens; this is the promise for the unknown ones.
                Interlocked.Increment(ref _stepFaults);
                _logger.LogError(e, "EPLB step {Step}: unexpected fault ({Reason}); serving goes on", StepCount, e.Message);
            }
            finally
            {
                // Dispose from another thread while this step ran: the buffers go now that it is over.
                if (_disposed) ReleaseLocked();
            }
        }
        RaiseEvents();
    }

    private void StepLocked(bool isDummy)
    {
        var step = Interlocked.Increment(ref _stepCount);
        foreach (var model in _models) ResyncMaps(model);
        if (_options.LogBalancedness && step % _options.LogBalancednessInterval == 0 && !isDummy)
            Survive("logging the balancedness", LogBalancedness);
        foreach (var model in _models) Survive($"recording the pass of model '{model.Name}'", () => model.EndPass(isDummy));

        if (_active.Length > 0) AdvanceAsync();

        var due = _rearrangementStep + 1;
        if (due >= _options.StepInterval)
        {
            Volatile.Write(ref _rearrangementStep, 0);
            if (_active.Length > 0)
            {
                // Skip and remember once: the counter restarts, nothing piles up.
                if (!_pending) _logger.LogInformation("EPLB step {Step}: a rearrangement is still running; the next one follows it", step);
                _pending = true;
                Interlocked.Increment(ref _skippedIntervals);
                return;
            }
            StartRearrangements();
        }
        else
        {
            Volatile.Write(ref _rearrangementStep, due);
            if (_pending && _active.Length == 0)
            {
                _pending = false;
                StartRearrangements();
            }
        }
    }

    // A fault outside a rearrangement: logged and counted, the step goes on.
    private void Survive(string what, Action action)
    {
        try
        {
            action();
        }
        catch (Exception e)
        {
            Interlocked.Increment(ref _stepFaults);
            _logger.LogError(e, "EPLB step {Step}: {What} failed ({Reason}); serving goes on", StepCount, what, e.Message);
        }
    }

    private void ResyncMaps(EplbModel model)
    {
        if (model.UnsyncedMaps == 0) return;
        var failures = model.ResyncMaps();
        if (failures.Count == 0)
            _logger.LogInformation("EPLB {Model} step {Step}: every model map again describes the placement in force", model.Name, StepCount);
        else
            foreach (var (rank, layer, fault) in failures)
                _logger.LogWarning(fault, "EPLB {Model} step {Step}: rank {Rank} still refuses the map of layer {Layer} in force ({Reason}); retrying next step",
                    model.Name, StepCount, rank, layer, fault.Message);
    }

    /// <summary>
    /// Starts a rearrangement now (sync: runs it to the end before returning). Faults are handled as
    /// in <see cref="Step"/>; a rearrangement already running is a usage error.
    /// </summary>
    /// <exception cref="InvalidOperationException">A rearrangement is already running.</exception>
    public void Rearrange()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        lock (_gate)
        {
            if (_active.Length > 0) throw new InvalidOperationException("a rearrangement is already running");
            if (!_released) StartRearrangements();
        }
        RaiseEvents();
    }

    private void StartRearrangements()
    {
        foreach (var model in _models)
        {
            if (model.Layers == 0) continue;  // a stage with no MoE layer: nothing to do, nothing to log as an error
            var rearrangement = new Rearrangement(this, model);
            if (!rearrangement.Plan()) continue;
            _active = [.. _active, rearrangement];
            if (_options.UseAsync)
            {
                rearrangement.StartWorker();
            }
            else
            {
                rearrangement.RunSync();
                Retire(rearrangement);
            }
        }
    }

    /// <summary>
    /// Cancels the running rearrangements: layers not committed keep the old placement, a staged layer
    /// is dropped. Safe from any thread, also while <see cref="Step"/> runs; waits at most
    /// <see cref="EplbOptions.CancelTimeout"/> for the background transfers to stop and abandons one
    /// that ignores its cancellation longer (its staging buffers are set aside until it ends). With
    /// ranks in other processes the next <see cref="Step"/> ends the rearrangement on every rank
    /// together (their collectives must stay matched); with every rank in this process it ends here.
    /// </summary>
    /// <returns>
    /// True when every rearrangement stopped within the time; false when a transfer was abandoned, or
    /// <see cref="Step"/> held the state past the time (the cancellation then completes when it returns).
    /// </returns>
    public bool CancelRearrangement() => CancelAll(disposing: false);

    private bool CancelAll(bool disposing)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan Remaining() => _options.CancelTimeout - clock.Elapsed is var left && left > TimeSpan.Zero ? left : TimeSpan.Zero;
        var active = _active;
        if (active.Length == 0) return true;
        foreach (var rearrangement in active) rearrangement.RequestCancel();
        var stopped = true;
        foreach (var rearrangement in active) stopped &= rearrangement.WaitForWorker(Remaining());
        var everyRankHere = _transport.LocalRanks.Count == _transport.Ranks;
        if (!everyRankHere && !disposing) return stopped;
        if (!_gate.TryEnter(Remaining()))
        {
            _logger.LogWarning("EPLB: cancellation requested; a step still holds the state after {Timeout}, the rearrangement ends when it returns",
                _options.CancelTimeout);
            return false;
        }
        try
        {
            foreach (var rearrangement in _active)
            {
                stopped &= rearrangement.Abort(Remaining());
                Retire(rearrangement);
            }
        }
        finally
        {
            _gate.Exit();
        }
        RaiseEvents();
        return stopped;
    }

    /// <summary>Waits until each async rearrangement has staged its next layer (or ended); for tests and drains.</summary>
    public void WaitForStagedLayer(TimeSpan timeout)
    {
        foreach (var rearrangement in _active) rearrangement.WaitUntilStagedOrDone(timeout);
    }

    // Votes on, commits and retires async rearrangements (Step's thread, under the gate).
    private void AdvanceAsync()
    {
        foreach (var rearrangement in _active)
        {
            rearrangement.Advance();
            if (rearrangement.Concluded) Retire(rearrangement);
        }
    }

    private void Retire(Rearrangement rearrangement)
    {
        if (!rearrangement.Concluded) return;
        _active = _active.Where(r => r != rearrangement).ToArray();
    }

    private void LogBalancedness()
    {
        foreach (var model in _models)
        {
            if (model.Layers == 0) continue;
            var physical = model.PassPhysicalLoad();
            _transport.AllReduceSum(physical);
            var rankLoads = model.RankLoads(physical);
            var balancedness = Balancedness.Of(rankLoads);
            var perRank = Enumerable.Range(0, model.Ranks).Select(g => rankLoads.Sum(layer => layer[g])).ToArray();
            LastLoggedBalancedness = balancedness;
            _logger.LogInformation(
                "EPLB {Model} step {Step}: avg_tokens={AvgTokens:F2}, max_tokens={MaxTokens:F2}, balancedness={Balancedness:F4}, steps until next rearrangement: {Steps}",
                model.Name, StepCount, perRank.Average(), perRank.Max(), balancedness, StepsUntilRearrangement);
        }
    }

    // Counters first, then the event (raised outside the gate by RaiseEvents).
    private void Conclude(RearrangementEventArgs result)
    {
        switch (result.Outcome)
        {
            case RearrangementOutcome.Completed:
                Interlocked.Increment(ref _completed);
                break;
            case RearrangementOutcome.Failed:
                Interlocked.Increment(ref _failed);
                break;
            case RearrangementOutcome.Cancelled:
                Interlocked.Increment(ref _failed);
                Interlocked.Increment(ref _cancelled);
                break;
            case RearrangementOutcome.Skipped:
                Interlocked.Increment(ref _skipped);
                break;
        }
        if (result.WorkerAbandoned) Interlocked.Increment(ref _abandoned);
        lock (_events) _events.Add(result);
    }

    private void RaiseEvents()
    {
        RearrangementEventArgs[] events;
        lock (_events)
        {
            if (_events.Count == 0) return;
            events = [.. _events];
            _events.Clear();
        }
        foreach (var result in events)
        {
            try
            {
                RearrangementEnded?.Invoke(this, result);
            }
            catch (Exception e)
            {
                _logger.LogWarning(e, "EPLB: a RearrangementEnded handler threw ({Reason}); ignored", e.Message);
            }
        }
    }

    /// <summary>
    /// Cancels a running rearrangement (old placement kept; waits at most <see cref="EplbOptions.CancelTimeout"/>)
    /// and releases every model's buffers. Safe from any thread: when <see cref="Step"/> is running,
    /// the buffers are released as it returns.
    /// </summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        CancelAll(disposing: true);
        if (_gate.TryEnter(_options.CancelTimeout))
        {
            try
            {
                ReleaseLocked();
            }
            finally
            {
                _gate.Exit();
            }
        }
        else
        {
            _logger.LogWarning("EPLB: disposed while a step runs; its buffers are released when the step returns");
        }
        RaiseEvents();
        _metrics.Dispose();
    }

    private void ReleaseLocked()
    {
        if (_released) return;
        foreach (var rearrangement in _active)
        {
            rearrangement.RequestCancel();
            rearrangement.Abort(TimeSpan.Zero);
            Retire(rearrangement);
        }
        _released = true;
        foreach (var model in _models) model.Dispose();
    }

    /// <summary>
    /// One model's rearrangement: the plan (Step's thread), then per layer a stage (the worker in async
    /// mode, inline in sync mode), a vote and a commit (Step's thread).
    /// </summary>
    private sealed class Rearrangement(EplbState owner, EplbModel model)
    {
        private readonly CancellationTokenSource _cancel = new();
        private readonly SemaphoreSlim _committed = new(0);
        private readonly ManualResetEventSlim _stageDone = new(false);
        private readonly Stopwatch _clock = new();
        private ExpertPlacement? _target;
        private LayerMigrationPlan[] _plans = [];
        private int[] _layers = [];
        private ExpertLoad? _load;
        private double _before = double.NaN, _planned = double.NaN;
        private long _startStep;
        private long _stageStartedAt;
        private Task? _worker;
        private volatile EplbModel.StagedLayer? _staged;
        private volatile bool _userCancelled;
        private Exception? _fault;
        private int _next;
        private int _committedLayers;
        private long _slots, _experts, _bytes;
        private bool _abandoned;
        private RearrangementSkipReason? _skipReason;

        public bool Concluded { get; private set; }

        private EplbOptions Options => owner._options;

        /// <summary>Folds the window to logical load, decides whether to skip, runs the policy and plans every layer. False: concluded already.</summary>
        public bool Plan()
        {
            _clock.Start();
            _startStep = owner.StepCount;
            try
            {
                var physical = model.WindowPhysicalLoad();
                owner._transport.AllReduceSum(physical);
                _load = model.ToLogical(physical);
            }
            catch (Exception e)
            {
                RecordFault(e);
                Conclude();
                return false;
            }
            var total = 0.0;
            foreach (var value in _load.Values) total += value;
            if (total <= 0) return Skip(RearrangementSkipReason.NoLoad, "no load recorded yet; the placement stays");
            var current = model.Placement;
            _before = current.Balancedness(_load);
            if (Options.BalancednessThreshold is { } threshold && _before >= threshold)
                return Skip(RearrangementSkipReason.BalancedEnough,
                    $"balancedness {_before:F4} on the window reaches the threshold {threshold:F4}; the placement stays");

            var topology = model.Topology;
            var request = new PlacementRequest(topology.Slots, topology.Groups, topology.Nodes, topology.Ranks)
            {
                NoDuplicateOnRank = Options.NoDuplicateOnRank,
                PreserveSlots = Options.PreserveSlots,
                MaxReplicas = model.MaxReplicas,
            };
            ExpertPlacement target;
            try
            {
                target = owner._policy.Plan(_load, request, current);
                if (target.MaxReplicas != model.MaxReplicas) target = target.WithMaxReplicas(model.MaxReplicas);
                _plans = Enumerable.Range(0, model.Layers)
                    .Select(l => MigrationPlanner.PlanLayer(current.Phy2Log(l), target.Phy2Log(l), model.Ranks, Options.BatchTransfers))
                    .ToArray();
            }
            catch (Exception e)
            {
                // A policy precondition failed (e.g. more replicas than Kmax) or the policy broke: keep serving on the old placement.
                RecordFault(e);
                Conclude();
                return false;
            }
            _target = target;
            _planned = target.Balancedness(_load);
            if (Options.MinBalancednessGain is { } gain && _planned - _before < gain)
                return Skip(RearrangementSkipReason.GainTooSmall,
                    $"the plan gains {_planned - _before:F4} ({_before:F4} -> {_planned:F4}), less than {gain:F4}; the placement stays");
            _layers = Enumerable.Range(0, model.Layers).Where(l => !_plans[l].IsEmpty).ToArray();
            owner._logger.LogInformation(
                "EPLB {Model} step {Step}: rearranging with '{Policy}' in {Ms:F1} ms: balancedness {Before:F4} -> {After:F4}, {Slots} slots to change in {Layers} layers",
                model.Name, owner.StepCount, owner._policy.Name, _clock.Elapsed.TotalMilliseconds, _before, _planned,
                _plans.Sum(p => p.SlotsChanged), _layers.Length);
            if (_layers.Length > 0) return true;
            Conclude();
            return false;
        }

        private bool Skip(RearrangementSkipReason reason, string message)
        {
            owner._logger.LogInformation("EPLB {Model} step {Step}: rearrangement skipped: {Reason}", model.Name, owner.StepCount, message);
            _skipReason = reason;
            Concluded = true;
            _clock.Stop();
            owner.Conclude(Result(RearrangementOutcome.Skipped));
            return false;
        }

        public void StartWorker()
        {
            _stageStartedAt = owner.StepCount;
            _worker = Task.Factory.StartNew(Work, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }

        // Background: stage one layer, hand it to Step, wait for its commit (or drop), go on. Only the
        // transport's Transfer and the model's GetExpertWeights are called here: no collective.
        private void Work()
        {
            var token = _cancel.Token;
            try
            {
                foreach (var layer in _layers)
                {
                    token.ThrowIfCancellationRequested();
                    _staged = model.StageLayer(layer, _plans[layer], _target!, owner._transport, token, owner.CopyProbe);
                    Interlocked.Increment(ref owner._layersStaged);
                    _stageDone.Set();
                    _committed.Wait(token);
                }
            }
            catch (Exception e)
            {
                RecordFault(e);
            }
            finally
            {
                _stageDone.Set();
            }
        }

        /// <summary>Sync mode: every layer staged, voted on and committed inside the step.</summary>
        public void RunSync()
        {
            var token = _cancel.Token;
            foreach (var layer in _layers)
            {
                var ready = 1;
                try
                {
                    token.ThrowIfCancellationRequested();
                    _staged = model.StageLayer(layer, _plans[layer], _target!, owner._transport, token, owner.CopyProbe);
                    Interlocked.Increment(ref owner._layersStaged);
                }
                catch (Exception e)
                {
                    RecordFault(e);
                    ready = -1;
                }
                if (Vote(ready) != 1 || !Commit())
                {
                    _staged = null;
                    Conclude();
                    return;
                }
            }
            Conclude();
        }

        /// <summary>Async mode, once per step: every rank votes (1 staged, 0 not yet, -1 gave up); all commit, wait, or give up together.</summary>
        public void Advance()
        {
            if (Concluded) return;
            var local = LocalVote();
            var vote = Vote(local);
            if (vote == 1)
            {
                if (!Commit()) Abort(Options.CancelTimeout);
            }
            else if (vote < 0)
            {
                Abort(Options.CancelTimeout);
            }
        }

        private int LocalVote()
        {
            if (_cancel.IsCancellationRequested || Volatile.Read(ref _fault) != null) return -1;
            var delay = Options.AsyncCommitPasses;
            if (delay > 0)
            {
                // Deterministic commit points: not before the delay, and then whatever the stage takes.
                if (owner.StepCount - _stageStartedAt < delay) return 0;
                try
                {
                    _stageDone.Wait(_cancel.Token);
                }
                catch (OperationCanceledException)
                {
                    return -1;
                }
            }
            if (_staged != null) return 1;
            return _worker is { IsCompleted: true } || Volatile.Read(ref _fault) != null ? -1 : 0;
        }

        // The collective that keeps every rank's decision the same; a throwing one is a fault here.
        private int Vote(int local)
        {
            try
            {
                var vote = owner._transport.AllReduceMin(local);
                if (vote < 0 && local >= 0 && !_cancel.IsCancellationRequested)
                    RecordFault(new InvalidOperationException($"another rank gave up the rearrangement of model '{model.Name}' (a fault or a cancellation there)"));
                return vote;
            }
            catch (Exception e)
            {
                RecordFault(e);
                return -1;
            }
        }

        // Commits the staged layer; true when it is switched on every rank (then the next one may be staged).
        private bool Commit()
        {
            var staged = _staged!;
            try
            {
                model.CommitLayer(staged, owner._transport, owner.CopyProbe);
            }
            catch (Exception e)
            {
                RecordFault(e);
                return false;
            }
            var plan = staged.Plan;
            _committedLayers++;
            _slots += plan.SlotsChanged;
            _experts += plan.ExpertsReceived;
            _bytes += staged.BytesToMove;
            Interlocked.Increment(ref owner._layersCommitted);
            Interlocked.Add(ref owner._slotsMoved, plan.SlotsChanged);
            Interlocked.Add(ref owner._expertsMoved, plan.ExpertsReceived);
            Interlocked.Add(ref owner._bytesMoved, staged.BytesToMove);
            _staged = null;
            _next++;
            if (_worker is null) return true;
            // The worker goes on to the next layer (or, after the last, ends).
            _stageDone.Reset();
            _stageStartedAt = owner.StepCount;
            _committed.Release();
            if (_next == _layers.Length) Conclude();
            return true;
        }

        public void RequestCancel()
        {
            _userCancelled = true;
            _cancel.Cancel();
        }

        /// <summary>Stops the worker (waiting at most <paramref name="wait"/>, then abandoning it) and concludes. True when it stopped in time.</summary>
        public bool Abort(TimeSpan wait)
        {
            if (Concluded) return !_abandoned;
            _cancel.Cancel();
            _staged = null;
            if (!WaitForWorker(wait))
            {
                // It ignores its cancellation: it may still write into its staging buffers, so they
                // are set aside (the next stage allocates new ones) and released when it ends.
                _abandoned = true;
                var detached = model.DetachStaging();
                _worker!.ContinueWith(_ => detached.Dispose(), TaskScheduler.Default);
            }
            Conclude();
            return !_abandoned;
        }

        public bool WaitForWorker(TimeSpan wait)
        {
            if (_worker is null) return true;
            try
            {
                return _worker.Wait(wait);
            }
            catch (AggregateException)
            {
                return true;  // the worker records its own fault
            }
        }

        public void WaitUntilStagedOrDone(TimeSpan timeout) => _stageDone.Wait(timeout);

        private void RecordFault(Exception e)
        {
            // A cancellation we asked for is not a fault; the first real fault is the one reported.
            if (e is OperationCanceledException && _cancel.IsCancellationRequested) return;
            Interlocked.CompareExchange(ref _fault, e, null);
        }

        private RearrangementEventArgs Result(RearrangementOutcome outcome) => new()
        {
            Outcome = outcome,
            Model = model,
            Step = _startStep,
            Duration = _clock.Elapsed,
            LayersPlanned = _layers.Length,
            LayersCommitted = _committedLayers,
            SlotsMoved = _slots,
            ExpertsMoved = _experts,
            BytesMoved = _bytes,
            BalancednessBefore = _before,
            BalancednessPlanned = _planned,
            BalancednessAfter = _load is null || double.IsNaN(_before) ? double.NaN : model.Placement.Balancedness(_load),
            SkipReason = outcome == RearrangementOutcome.Skipped ? _skipReason : null,
            Exception = outcome == RearrangementOutcome.Failed ? _fault : null,
            WorkerAbandoned = _abandoned,
        };

        /// <summary>Counts, logs and reports how it ended (once).</summary>
        private void Conclude()
        {
            if (Concluded) return;
            Concluded = true;
            _clock.Stop();
            var fault = Volatile.Read(ref _fault);
            var outcome = fault != null ? RearrangementOutcome.Failed
                : _userCancelled || _cancel.IsCancellationRequested ? RearrangementOutcome.Cancelled
                : RearrangementOutcome.Completed;
            var result = Result(outcome);
            var logger = owner._logger;
            var abandoned = _abandoned ? $"; its transfer ignored the cancellation for {Options.CancelTimeout} and was abandoned" : "";
            switch (outcome)
            {
                case RearrangementOutcome.Completed:
                    logger.LogInformation("EPLB {Model} step {Step}: rearrangement done ({Layers} layers committed, balancedness {After:F4})",
                        model.Name, owner.StepCount, _committedLayers, result.BalancednessAfter);
                    break;
                case RearrangementOutcome.Cancelled:
                    logger.LogWarning("EPLB {Model} step {Step}: rearrangement cancelled after {Committed} of {Layers} layers; " +
                                      "the rest keep their placement{Abandoned}", model.Name, owner.StepCount, _committedLayers, _layers.Length, abandoned);
                    break;
                default:
                    logger.LogError(fault, "EPLB {Model} step {Step}: rearrangement failed after {Committed} of {Layers} layers " +
                                           "({Reason}); every other layer keeps its placement and the next interval tries again{Abandoned}",
                        model.Name, owner.StepCount, _committedLayers, _layers.Length, fault!.Message, abandoned);
                    break;
            }
            // The cancellation source and the events hold no timer or kernel handle: nothing to dispose,
            // and a late CancelRearrangement from another thread can still touch them safely.
            owner.Conclude(result);
        }
    }
}
