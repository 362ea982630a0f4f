using System.Diagnostics.Metrics;
using System.Reflection;

namespace Eplb.Balancing;

/// <summary>
/// EPLB's metrics through <see cref="System.Diagnostics.Metrics"/>: a <see cref="Meter"/> named
/// <see cref="MeterName"/>, so OpenTelemetry (<c>AddMeter("Eplb")</c>) and its Prometheus exporter
/// pick them up, as vLLM and SGLang users watch balancedness and rebalance events. Every
/// <see cref="EplbState"/> publishes them; the figures come from its
/// <see cref="EplbState.RearrangementEnded"/> events and counters, so reading them never touches
/// the device. Every measurement carries the model's name as the <c>eplb.model</c> tag.
/// </summary>
public sealed class EplbMetrics : IDisposable
{
    /// <summary>The meter's name.</summary>
    public const string MeterName = "Eplb";

    /// <summary>Counter of rearrangements, tagged <c>eplb.outcome</c>: completed, failed, cancelled or skipped.</summary>
    public const string Rearrangements = "eplb.rearrangements";

    /// <summary>Histogram of rearrangement durations (seconds, planning to the last commit, fault or cancellation), tagged <c>eplb.outcome</c>.</summary>
    public const string RearrangementDuration = "eplb.rearrangement.duration";

    /// <summary>Counter of slots whose expert changed in committed layers.</summary>
    public const string SlotsMoved = "eplb.slots_moved";

    /// <summary>Counter of bytes of expert weights received over the transport in committed layers.</summary>
    public const string BytesMoved = "eplb.bytes_moved";

    /// <summary>Observable counter of layers staged (all models of the state).</summary>
    public const string LayersStaged = "eplb.layers_staged";

    /// <summary>Observable counter of layers committed (all models of the state).</summary>
    public const string LayersCommitted = "eplb.layers_committed";

    /// <summary>
    /// Observable gauge: the aggregate balancedness (docs/design.md §1) of the placement in force on
    /// the load window, as measured at the model's last rearrangement decision (the planned value
    /// once a rearrangement completes); absent until the window has been measured once.
    /// </summary>
    public const string Balancedness = "eplb.balancedness";

    private static readonly string? Version = typeof(EplbMetrics).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion;

    private readonly EplbState _state;
    private readonly Meter _meter;
    private readonly bool _ownsMeter;
    private readonly Counter<long> _rearrangements;
    private readonly Histogram<double> _duration;
    private readonly Counter<long> _slotsMoved;
    private readonly Counter<long> _bytesMoved;
    private readonly Dictionary<string, double> _balancedness = [];

    /// <summary>Publishes <paramref name="state"/>'s metrics on a meter from <paramref name="meterFactory"/> (DI) or a meter of its own.</summary>
    public EplbMetrics(EplbState state, IMeterFactory? meterFactory = null)
    {
        ArgumentNullException.ThrowIfNull(state);
        _state = state;
        _ownsMeter = meterFactory is null;
        _meter = meterFactory?.Create(new MeterOptions(MeterName) { Version = Version }) ?? new Meter(MeterName, Version);
        _rearrangements = _meter.CreateCounter<long>(Rearrangements, "{rearrangement}", "EPLB rearrangements by outcome");
        _duration = _meter.CreateHistogram<double>(RearrangementDuration, "s", "Duration of EPLB rearrangements");
        _slotsMoved = _meter.CreateCounter<long>(SlotsMoved, "{slot}", "Slots whose expert changed");
        _bytesMoved = _meter.CreateCounter<long>(BytesMoved, "By", "Expert weight bytes received over the transport");
        _meter.CreateObservableCounter(LayersStaged, () => state.LayersStaged, "{layer}", "Layers staged by rearrangements");
        _meter.CreateObservableCounter(LayersCommitted, () => state.LayersCommitted, "{layer}", "Layers committed by rearrangements");
        _meter.CreateObservableGauge(Balancedness, ObserveBalancedness, null, "Balancedness of the placement in force on the load window");
        state.RearrangementEnded += OnRearrangementEnded;
    }

    /// <summary>Stops publishing (the meter is disposed when this instance created it).</summary>
    public void Dispose()
    {
        _state.RearrangementEnded -= OnRearrangementEnded;
        if (_ownsMeter) _meter.Dispose();
    }

    private void OnRearrangementEnded(object? sender, RearrangementEventArgs e)
    {
        var model = new KeyValuePair<string, object?>("eplb.model", e.Model.Name);
        var outcome = new KeyValuePair<string, object?>("eplb.outcome", e.Outcome.ToString().ToLowerInvariant());
        _rearrangements.Add(1, model, outcome);
        if (e.Outcome != RearrangementOutcome.Skipped) _duration.Record(e.Duration.TotalSeconds, model, outcome);
        if (e.SlotsMoved > 0) _slotsMoved.Add(e.SlotsMoved, model);
        if (e.BytesMoved > 0) _bytesMoved.Add(e.BytesMoved, model);
        var balancedness = double.IsNaN(e.BalancednessAfter) ? e.BalancednessBefore : e.BalancednessAfter;
        if (double.IsNaN(balancedness)) return;
        lock (_balancedness) _balancedness[e.Model.Name] = balancedness;
    }

    private IEnumerable<Measurement<double>> ObserveBalancedness()
    {
        lock (_balancedness)
            return _balancedness.Select(p => new Measurement<double>(p.Value, new KeyValuePair<string, object?>("eplb.model", p.Key))).ToArray();
    }
}
