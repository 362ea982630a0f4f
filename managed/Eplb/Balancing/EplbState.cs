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
/// Sync mode does all layers inside the step. Async mode (the default) plans and stages in the
/// background, one layer at a time into one layer of staging buffers; <see cref="Step"/> commits a
/// staged layer only when every rank has it, so a forward pass never sees a half-moved layer. A fault
/// or a cancellation leaves every layer not yet committed exactly as it was (old tables, old weights),
/// is logged, and the next interval tries again. An interval that falls while a rearrangement still
/// runs is skipped and remembered once (no runaway counter, vLLM #57883).
/// </para>
/// </summary>
public sealed class EplbState : IDisposable
{
    private readonly EplbOptions _options;
    private readonly IExpertTransport _transport;
    private readonly ILogger _logger;
    private readonly IPlacementPolicy _policy;
    private readonly List<EplbModel> _models = [];
    private readonly List<Rearrangement> _active = [];
    private int _rearrangementStep;
    private bool _pending;
    private bool _disposed;

    /// <summary>
    /// Creates the loop; the options are validated (one exception lists every violation) and the
    /// policy is looked up in <paramref name="policies"/> (default: the built-in ones).
    /// </summary>
    /// <exception cref="OptionsValidationException">The options break a rule of docs/design.md §3.1.</exception>
    public EplbState(EplbOptions options, IExpertTransport transport, ILogger<EplbState>? logger = null, PlacementPolicyCatalog? policies = null)
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
    }

    /// <summary>Creates the loop from DI-bound options.</summary>
    public EplbState(IOptions<EplbOptions> options, IExpertTransport transport, ILogger<EplbState> logger)
        : this(options.Value, transport, logger)
    {
    }

    /// <summary>The models, in the order they were added.</summary>
    public IReadOnlyList<EplbModel> Models => _models;

    /// <summary>Calls of <see cref="Step"/> so far (dummy ones included).</summary>
    public long StepCount { get; private set; }

    /// <summary>Steps until the next rearrangement is due.</summary>
    public int StepsUntilRearrangement => _options.StepInterval - _rearrangementStep;

    /// <summary>Whether a rearrangement is in progress (async mode).</summary>
    public bool IsRearranging => _active.Count > 0;

    /// <summary>Whether an interval fell during a rearrangement and another one will follow it.</summary>
    public bool RearrangementPending => _pending;

    /// <summary>Rearrangements that ran to the end (all layers committed).</summary>
    public int CompletedRearrangements { get; private set; }

    /// <summary>Rearrangements that stopped on a fault or a cancellation.</summary>
    public int FailedRearrangements { get; private set; }

    /// <summary>Intervals that fell while a rearrangement ran.</summary>
    public int SkippedIntervals { get; private set; }

    /// <summary>Layers committed by rearrangements so far (all models).</summary>
    public long LayersCommitted { get; private set; }

    /// <summary>Slots whose expert changed in committed layers so far.</summary>
    public long SlotsMoved { get; private set; }

    /// <summary>Experts received over the transport in committed layers so far (one per rank and expert it lacked).</summary>
    public long ExpertsMoved { get; private set; }

    /// <summary>Bytes of expert weights received over the transport in committed layers so far.</summary>
    public long BytesMoved { get; private set; }

    /// <summary>The aggregate balancedness of the last logged pass (NaN before the first log line).</summary>
    public double LastLoggedBalancedness { get; private set; } = double.NaN;

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
        if (_models.Count > 0 && (_models[0].LogicalExperts != n || _models[0].Slots != r))
            throw new ArgumentException($"model '{name}' has N = {n}, R = {r}; the first model '{_models[0].Name}' has N = {_models[0].LogicalExperts}, " +
                                        $"R = {_models[0].Slots}: EPLB models must have identical expert counts", nameof(localRanks));
        var kmax = _options.MaxReplicas > 0 ? _options.MaxReplicas : Math.Min(n, _options.RedundantExperts + 1);
        var model = new EplbModel(name, localRanks, topology, _options.WindowSize, kmax, _options.ReplicaSelection);
        _models.Add(model);
        foreach (var rank in localRanks) rank.SetEplbState(model.LayerStates(rank.Rank));
        return model;
    }

    /// <summary>
    /// One forward pass happened (call it after the pass's kernels are queued, on the thread that
    /// queues them). <paramref name="isDummy"/>: an idle data-parallel rank's pass — counted, not recorded.
    /// </summary>
    public void Step(bool isDummy = false)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        StepCount++;
        if (_options.LogBalancedness && StepCount % _options.LogBalancednessInterval == 0 && !isDummy) LogBalancedness();
        foreach (var model in _models) model.EndPass(isDummy);

        if (_active.Count > 0) AdvanceAsync();

        _rearrangementStep++;
        if (_rearrangementStep >= _options.StepInterval)
        {
            _rearrangementStep = 0;
            if (_active.Count > 0)
            {
                // Skip and remember once: the counter restarts, nothing piles up.
                if (!_pending) _logger.LogInformation("EPLB step {Step}: a rearrangement is still running; the next one follows it", StepCount);
                _pending = true;
                SkippedIntervals++;
                return;
            }
            Rearrange();
        }
        else if (_pending && _active.Count == 0)
        {
            _pending = false;
            Rearrange();
        }
    }

    /// <summary>Starts a rearrangement now (sync: runs it to the end before returning).</summary>
    public void Rearrange()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_active.Count > 0) throw new InvalidOperationException("a rearrangement is already running");
        foreach (var model in _models)
        {
            if (model.Layers == 0) continue;  // a stage with no MoE layer: nothing to do, nothing to log as an error
            var rearrangement = new Rearrangement(this, model);
            if (!rearrangement.Plan()) continue;
            if (_options.UseAsync)
            {
                rearrangement.StartAsync();
                _active.Add(rearrangement);
            }
            else
            {
                rearrangement.RunSync();
            }
        }
    }

    /// <summary>Cancels a running rearrangement; layers not committed keep the old placement. Waits for the worker.</summary>
    public void CancelRearrangement()
    {
        foreach (var rearrangement in _active) rearrangement.Cancel();
        foreach (var rearrangement in _active) rearrangement.WaitForWorker();
        AdvanceAsync();
    }

    /// <summary>Waits until an async rearrangement has staged its next layer (or ended); for tests and drains.</summary>
    public void WaitForStagedLayer(TimeSpan timeout)
    {
        foreach (var rearrangement in _active) rearrangement.WaitUntilStagedOrDone(timeout);
    }

    // Commits staged layers that every rank has, and retires finished rearrangements.
    private void AdvanceAsync()
    {
        for (var i = 0; i < _active.Count; i++)
        {
            var rearrangement = _active[i];
            var ready = rearrangement.HasStagedLayer ? 1 : 0;
            if (_transport.AllReduceMin(ready) == 1) rearrangement.CommitStagedLayer();
            if (rearrangement.Finished)
            {
                rearrangement.Conclude();
                _active.RemoveAt(i--);
            }
        }
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

    /// <summary>Cancels a running rearrangement (old placement kept) and releases every model's buffers.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        CancelRearrangement();
        _disposed = true;
        foreach (var model in _models) model.Dispose();
    }

    /// <summary>One model's rearrangement: the plan, then staging and commits layer by layer.</summary>
    private sealed class Rearrangement(EplbState owner, EplbModel model)
    {
        private readonly CancellationTokenSource _cancel = new();
        private readonly SemaphoreSlim _committed = new(0);
        private readonly ManualResetEventSlim _staged = new(false);
        private ExpertPlacement? _target;
        private LayerMigrationPlan[] _plans = [];
        private Task? _worker;
        private volatile int _stagedLayer = -1;
        private int _committedLayers;
        private Exception? _fault;

        public bool HasStagedLayer => _stagedLayer >= 0;

        public bool Finished => _worker is { IsCompleted: true } && _stagedLayer < 0;

        /// <summary>Folds the window to logical load, runs the policy and plans every layer. False: nothing to do.</summary>
        public bool Plan()
        {
            var physical = model.WindowPhysicalLoad();
            owner._transport.AllReduceSum(physical);
            var load = model.ToLogical(physical);
            var total = 0.0;
            foreach (var value in load.Values) total += value;
            if (total <= 0)
            {
                owner._logger.LogInformation("EPLB {Model}: no load recorded yet; the placement stays", model.Name);
                return false;
            }
            var options = owner._options;
            var topology = model.Topology;
            var request = new PlacementRequest(topology.Slots, topology.Groups, topology.Nodes, topology.Ranks)
            {
                NoDuplicateOnRank = options.NoDuplicateOnRank,
                PreserveSlots = options.PreserveSlots,
                MaxReplicas = model.MaxReplicas,
            };
            var started = System.Diagnostics.Stopwatch.StartNew();
            var current = model.Placement;
            ExpertPlacement target;
            try
            {
                target = owner._policy.Plan(load, request, current);
                if (target.MaxReplicas != model.MaxReplicas) target = target.WithMaxReplicas(model.MaxReplicas);
            }
            catch (ArgumentException e)
            {
                // A policy precondition failed (e.g. more replicas than Kmax): keep serving on the old placement.
                _fault = e;
                Fail();
                return false;
            }
            _target = target;
            _plans = Enumerable.Range(0, model.Layers)
                .Select(l => MigrationPlanner.PlanLayer(current.Phy2Log(l), target.Phy2Log(l), model.Ranks, options.BatchTransfers))
                .ToArray();
            owner._logger.LogInformation(
                "EPLB {Model} step {Step}: rearranging with '{Policy}' in {Ms:F1} ms: balancedness {Before:F4} -> {After:F4}, {Slots} slots to change",
                model.Name, owner.StepCount, owner._policy.Name, started.Elapsed.TotalMilliseconds, current.Balancedness(load),
                target.Balancedness(load), _plans.Sum(p => p.SlotsChanged));
            return true;
        }

        public void RunSync()
        {
            try
            {
                for (var layer = 0; layer < model.Layers; layer++)
                {
                    if (_plans[layer].IsEmpty) continue;
                    Stage(layer);
                    Commit(layer);
                }
                owner.CompletedRearrangements++;
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                _fault = e;
                Fail();
            }
        }

        public void StartAsync()
        {
            _worker = Task.Factory.StartNew(Work, _cancel.Token, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }

        // Background: stage one layer, hand it to the main loop, wait for its commit, go on.
        private void Work()
        {
            try
            {
                for (var layer = 0; layer < model.Layers; layer++)
                {
                    _cancel.Token.ThrowIfCancellationRequested();
                    if (_plans[layer].IsEmpty) continue;
                    Stage(layer);
                    _stagedLayer = layer;
                    _staged.Set();
                    _committed.Wait(_cancel.Token);
                }
            }
            catch (Exception e)
            {
                _fault = e;
            }
            finally
            {
                _staged.Set();
            }
        }

        private void Stage(int layer)
        {
            LayerMigrator.Stage(_plans[layer], owner._transport, r => model.Weights(r, layer), r => model.Staging(r, layer), _cancel.Token);
        }

        private void Commit(int layer)
        {
            var plan = _plans[layer];
            model.CommitLayer(layer, plan, _target!.Phy2Log(layer), _target.Log2Phy(layer), _target.LogCnt(layer));
            // Every rank computes the whole plan, so these are the global figures on every process.
            var bytesPerExpert = model.Weights(owner._transport.LocalRanks[0], layer).Sum(w => w.BytesPerExpert);
            owner.LayersCommitted++;
            owner.SlotsMoved += plan.SlotsChanged;
            owner.ExpertsMoved += plan.ExpertsReceived;
            owner.BytesMoved += plan.BytesToMove(bytesPerExpert);
            _committedLayers++;
        }

        public void CommitStagedLayer()
        {
            var layer = _stagedLayer;
            if (layer < 0) return;
            try
            {
                // A cancelled rearrangement commits nothing more: the staged layer is dropped.
                if (!_cancel.IsCancellationRequested) Commit(layer);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                _fault ??= e;
                _cancel.Cancel();
            }
            finally
            {
                _stagedLayer = -1;
                _staged.Reset();
                _committed.Release();
            }
        }

        public void Cancel() => _cancel.Cancel();

        public void WaitForWorker()
        {
            try
            {
                _worker?.Wait();
            }
            catch (AggregateException)
            {
                // The worker records its own fault; cancellation ends it without one.
            }
        }

        public void WaitUntilStagedOrDone(TimeSpan timeout) => _staged.Wait(timeout);

        /// <summary>Retires a finished async rearrangement: counts it and logs how it ended.</summary>
        public void Conclude()
        {
            if (_fault is null && !_cancel.IsCancellationRequested)
            {
                owner.CompletedRearrangements++;
                owner._logger.LogInformation("EPLB {Model} step {Step}: rearrangement done ({Layers} layers committed)", model.Name,
                    owner.StepCount, _committedLayers);
            }
            else
            {
                Fail();
            }
            _cancel.Dispose();
            _committed.Dispose();
            _staged.Dispose();
        }

        private void Fail()
        {
            owner.FailedRearrangements++;
            if (_fault is OperationCanceledException or null)
                owner._logger.LogWarning("EPLB {Model} step {Step}: rearrangement cancelled after {Committed} of {Layers} layers; " +
                                         "the rest keep their placement", model.Name, owner.StepCount, _committedLayers, model.Layers);
            else
                owner._logger.LogError(_fault, "EPLB {Model} step {Step}: rearrangement failed after {Committed} of {Layers} layers " +
                                               "({Reason}); every other layer keeps its placement and the next interval tries again",
                    model.Name, owner.StepCount, _committedLayers, model.Layers, _fault.Message);
        }
    }
}
