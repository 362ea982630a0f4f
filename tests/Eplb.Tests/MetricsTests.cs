using System.Diagnostics.Metrics;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>EPLB's metrics reach a <see cref="MeterListener"/> with the figures of the state's own counters and events.</summary>
public class MetricsTests
{
    // Expert 15 is hot in every layer and starts on the last rank only: a rearrangement must move it.
    private static double[] SkewedLoad(int layer) =>
        Enumerable.Range(0, 16).Select(e => e == 15 ? 60.0 : 1.0 + (e + layer) % 3).ToArray();

    /// <summary>Collects every measurement of the Eplb meters that belong to one state (by its model's name).</summary>
    private sealed class Recorder : IDisposable
    {
        private readonly MeterListener _listener = new();
        private readonly string _model;

        public Recorder(string model)
        {
            _model = model;
            _listener.InstrumentPublished = (instrument, listener) =>
            {
                if (instrument.Meter.Name == EplbMetrics.MeterName) listener.EnableMeasurementEvents(instrument);
            };
            _listener.SetMeasurementEventCallback<long>((i, v, tags, _) => Add(i, v, tags));
            _listener.SetMeasurementEventCallback<double>((i, v, tags, _) => Add(i, v, tags));
            _listener.Start();
        }

        public List<(string Name, double Value, Dictionary<string, object?> Tags)> Measurements { get; } = [];

        private void Add(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            var map = tags.ToArray().ToDictionary(t => t.Key, t => t.Value);
            // Observable counters of every live state are reported; keep only tagged ones of this model, and the untagged layer counters.
            if (map.TryGetValue("eplb.model", out var model) && (string?)model != _model) return;
            lock (Measurements) Measurements.Add((instrument.Name, value, map));
        }

        public void Observe() => _listener.RecordObservableInstruments();

        public double Sum(string name, string? outcome = null) =>
            Measurements.Where(m => m.Name == name && (outcome == null || Equals(m.Tags.GetValueOrDefault("eplb.outcome"), outcome))).Sum(m => m.Value);

        public void Dispose() => _listener.Dispose();
    }

    [Test]
    public void CompletedAndSkippedRearrangementsAreCountedWithTheirMovesAndBalancedness()
    {
        var model = $"metrics-{Guid.NewGuid():N}";
        using var recorder = new Recorder(model);
        var options = new EplbOptions
        {
            UseAsync = false, WindowSize = 4, StepInterval = 4, RedundantExperts = 4, Groups = 4, Nodes = 1,
            // After the first rearrangement a new plan of the same skewed load gains nothing: later intervals skip.
            MinBalancednessGain = 0.1,
        };
        using var cluster = new Cluster(options, gpus: 4, layers: 3, experts: 16, [4, 2], modelName: model);
        var events = new List<RearrangementEventArgs>();
        cluster.State.RearrangementEnded += (_, e) => events.Add(e);
        for (var step = 0; step < 12; step++)
        {
            cluster.Forward(SkewedLoad, 64);
            cluster.State.Step();
        }
        recorder.Observe();

        var completed = events.Where(e => e.Outcome == RearrangementOutcome.Completed).ToList();
        var skipped = events.Where(e => e.Outcome == RearrangementOutcome.Skipped).ToList();
        Assert.That(completed, Is.Not.Empty, "the skewed load is rearranged at least once");
        Assert.That(skipped, Is.Not.Empty, "a balanced window is skipped by the threshold");
        Assert.That(recorder.Sum(EplbMetrics.Rearrangements, "completed"), Is.EqualTo(completed.Count));
        Assert.That(recorder.Sum(EplbMetrics.Rearrangements, "skipped"), Is.EqualTo(skipped.Count));
        Assert.That(recorder.Sum(EplbMetrics.SlotsMoved), Is.EqualTo(cluster.State.SlotsMoved).And.GreaterThan(0));
        Assert.That(recorder.Sum(EplbMetrics.BytesMoved), Is.EqualTo(cluster.State.BytesMoved).And.GreaterThan(0));
        var durations = recorder.Measurements.Where(m => m.Name == EplbMetrics.RearrangementDuration).ToList();
        Assert.That(durations, Has.Count.EqualTo(completed.Count), "one duration per rearrangement that ran (skips have none)");
        Assert.That(durations.Select(d => d.Value), Is.All.GreaterThan(0));
        Assert.That(durations.Select(d => d.Value), Is.EqualTo(completed.Select(e => e.Duration.TotalSeconds)).Within(1e-12));

        var gauge = recorder.Measurements.Where(m => m.Name == EplbMetrics.Balancedness).ToList();
        Assert.That(gauge, Has.Count.EqualTo(1));
        Assert.That(gauge[0].Value, Is.EqualTo(events[^1].BalancednessAfter is var after && !double.IsNaN(after) ? after : events[^1].BalancednessBefore));
        Assert.That(gauge[0].Value, Is.GreaterThan(completed[0].BalancednessBefore), "the gauge shows the rearranged placement");
        // The layer counters are per state, untagged: this state's figures are among those observed.
        Assert.That(recorder.Measurements.Where(m => m.Name == EplbMetrics.LayersCommitted).Select(m => m.Value), Does.Contain((double)cluster.State.LayersCommitted));
        Assert.That(recorder.Measurements.Where(m => m.Name == EplbMetrics.LayersStaged).Select(m => m.Value), Does.Contain((double)cluster.State.LayersStaged));
        Assert.That(cluster.State.LayersStaged, Is.GreaterThanOrEqualTo(cluster.State.LayersCommitted).And.GreaterThan(0));
    }

    [Test]
    public void AFailedRearrangementIsCountedAsFailedAndADisposedStatePublishesNothing()
    {
        var model = $"metrics-{Guid.NewGuid():N}";
        using var recorder = new Recorder(model);
        var options = new EplbOptions { UseAsync = false, WindowSize = 4, StepInterval = 4, RedundantExperts = 4, Groups = 4, Nodes = 1 };
        var cluster = new Cluster(options, gpus: 4, layers: 2, experts: 16, [4], transport: new FaultyTransport(4) { Failures = 1 }, modelName: model);
        var events = new List<RearrangementEventArgs>();
        cluster.State.RearrangementEnded += (_, e) => events.Add(e);
        for (var step = 0; step < 2; step++)
        {
            cluster.Forward(SkewedLoad, 64);
            cluster.State.Step();
        }
        Assert.That(events.Select(e => e.Outcome), Does.Contain(RearrangementOutcome.Failed));
        Assert.That(recorder.Sum(EplbMetrics.Rearrangements, "failed"), Is.EqualTo(events.Count(e => e.Outcome == RearrangementOutcome.Failed)));
        Assert.That(recorder.Sum(EplbMetrics.SlotsMoved), Is.EqualTo(cluster.State.SlotsMoved));

        var staged = cluster.State.LayersStaged;
        recorder.Observe();
        Assert.That(recorder.Measurements.Where(m => m.Name == EplbMetrics.LayersStaged).Select(m => m.Value), Does.Contain((double)staged));
        cluster.Dispose();
        var before = recorder.Measurements.Count;
        recorder.Observe();
        Assert.That(recorder.Measurements.Skip(before).Where(m => m.Name == EplbMetrics.LayersStaged).Select(m => m.Value), Does.Not.Contain((double)staged),
            "a disposed state's meter is gone");
    }

    [Test]
    public void AContainerWithMetricsGivesTheStateAMeterFromItsFactory()
    {
        var section = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Eplb:WindowSize"] = "4", ["Eplb:StepInterval"] = "8", ["Eplb:Groups"] = "1", ["Eplb:UseAsync"] = "false",
        }).Build().GetSection(EplbOptions.SectionName);
        var services = new ServiceCollection().AddMetrics();
        services.AddEplb(section).AddInProcessTransport(2);
        var published = new List<Instrument>();
        using var listener = new MeterListener
        {
            InstrumentPublished = (instrument, _) => { if (instrument.Meter.Name == EplbMetrics.MeterName) lock (published) published.Add(instrument); },
        };
        listener.Start();
        using (var provider = services.BuildServiceProvider())
        {
            var factory = provider.GetRequiredService<IMeterFactory>();
            _ = provider.GetRequiredService<EplbState>();
            lock (published)
            {
                var ours = published.Where(i => ReferenceEquals(i.Meter.Scope, factory)).Select(i => i.Name).ToList();
                Assert.That(ours, Is.SupersetOf(new[] { EplbMetrics.Rearrangements, EplbMetrics.Balancedness, EplbMetrics.BytesMoved }));
            }
        }
    }
}
