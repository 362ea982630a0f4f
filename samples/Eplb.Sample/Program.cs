// A host app on the Eplb package: options from the appsettings.json next to the binary, the runtime
// wired by AddEplb (transport, EplbState), a MoE model over in-process ranks whose routers record the
// load, and EplbState stepping and rearranging it. Prints one line with balancedness and counts, and
// one with the metrics EplbState publishes on the "Eplb" meter (what OpenTelemetry would export).
using System.Diagnostics.Metrics;
using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Runtime;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;

const int ranks = 8, layers = 4, experts = 64, topK = 8, tokensPerRank = 64, passes = 120;
// The content root is the binary's folder, so the sample reads its own appsettings.json from any
// working directory (the default is the current directory).
var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { Args = args, ContentRootPath = AppContext.BaseDirectory });
builder.Services.AddEplb(builder.Configuration.GetSection(EplbOptions.SectionName)).AddInProcessTransport(ranks);
using var host = builder.Build();
await host.StartAsync();  // validates the options (one exception lists every violation)
var options = host.Services.GetRequiredService<IOptions<EplbOptions>>().Value;
var eplb = host.Services.GetRequiredService<EplbState>();  // disposed with the host

// The host's own view of EPLB's metrics: the instruments of the "Eplb" meter, summed by name and outcome.
var metrics = new SortedDictionary<string, double>();
using var listener = new MeterListener
{
    InstrumentPublished = (instrument, l) => { if (instrument.Meter.Name == EplbMetrics.MeterName) l.EnableMeasurementEvents(instrument); },
};
void Record(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
{
    var outcome = tags.ToArray().FirstOrDefault(t => t.Key == "eplb.outcome").Value;
    var name = outcome is null ? instrument.Name : $"{instrument.Name}{{{outcome}}}";
    lock (metrics)
    {
        if (instrument is ObservableInstrument<long> or ObservableInstrument<double>) metrics[name] = value;  // observed totals
        else metrics[name] = metrics.GetValueOrDefault(name) + value;
    }
}
listener.SetMeasurementEventCallback<long>((instrument, value, tags, _) => Record(instrument, value, tags));
listener.SetMeasurementEventCallback<double>((instrument, value, tags, _) => Record(instrument, value, tags));
listener.Start();

var backend = EplbRuntime.DefaultBackend;
var slots = experts + options.RedundantExperts;
var model = Enumerable.Range(0, ranks).Select(r => new SampleRank(r, ranks, layers, experts, slots, backend)).ToArray();
var eplbModel = eplb.AddModel("main", model);
var initial = eplbModel.Placement;
var routers = model.Select(rank => rank.LayerStates.Select(state => new Router(
    new RouterOptions { LogicalExperts = experts, TopK = topK, Score = RoutingScore.Softmax }, state)).ToArray()).ToArray();

// Skewed traffic: logit = log(popularity) + Gumbel noise (a draw in proportion to the popularity),
// popularity exp(-e / 10) with e shifted per layer: each layer's hot experts start on one or two ranks.
var random = new Random(7);
var logits = new float[tokensPerRank * experts];
using var logitBuffer = new DeviceBuffer<float>(backend, logits.Length);
using var ids = new DeviceBuffer<int>(backend, tokensPerRank * topK);
using var weights = new DeviceBuffer<float>(backend, tokensPerRank * topK);
for (var pass = 0; pass < passes || eplb.IsRearranging; pass++)
{
    for (var r = 0; r < ranks; r++)
        for (var layer = 0; layer < layers; layer++)
        {
            for (var i = 0; i < logits.Length; i++)
                logits[i] = (float)(-((i % experts + 8 * layer) % experts) / 10.0 - Math.Log(-Math.Log(1 - random.NextDouble())));
            logitBuffer.CopyFrom(logits, 0, model[r].Stream);
            routers[r][layer].Route(model[r].Stream, logitBuffer, ids, weights);
        }
    eplb.Step();
    if (pass >= passes) eplb.WaitForStagedLayer(TimeSpan.FromSeconds(10));  // drain the last rearrangement
}

var load = eplbModel.ToLogical(eplbModel.WindowPhysicalLoad());
var consistent = model.All(rank => Enumerable.Range(0, layers).All(l => rank.HoldsExpertsOf(eplbModel.Placement.Phy2Log(l), l)));
Console.WriteLine($"policy={options.Policy} backend={backend.ToString().ToLowerInvariant()} passes={eplb.StepCount} " +
                  $"balancedness {initial.Balancedness(load):F3} -> {eplbModel.Placement.Balancedness(load):F3} " +
                  $"rearrangements completed={eplb.CompletedRearrangements} failed={eplb.FailedRearrangements} skipped={eplb.SkippedRearrangements} " +
                  $"slots moved={eplb.SlotsMoved} weights follow placement={(consistent ? "yes" : "no")}");
listener.RecordObservableInstruments();
lock (metrics)
    Console.WriteLine("metrics: " + string.Join(" ", metrics.Where(m => !m.Key.Contains(".duration")).Select(m => $"{m.Key}={m.Value:0.###}")));
await host.StopAsync();
foreach (var rank in model) rank.Dispose();
return consistent && eplb.CompletedRearrangements > 0 && eplb.FailedRearrangements == 0 ? 0 : 1;

/// <summary>One rank of a toy MoE model: per layer one weight tensor of R/G experts, expert e's row filled with e.</summary>
sealed class SampleRank : IMixtureOfExperts, IDisposable
{
    private const int ExpertSize = 32;
    private readonly DeviceBuffer<float>[] _weights;
    private readonly ExpertTensor[][] _tensors;

    public SampleRank(int rank, int ranks, int layers, int experts, int slots, Backend backend)
    {
        (Rank, Layers, LogicalExperts, Slots, SlotsPerRank, Backend) = (rank, layers, experts, slots, slots / ranks, backend);
        Stream = new ComputeStream(backend);
        // EPLB's initial placement: slot s holds expert s % N.
        var values = Enumerable.Range(0, SlotsPerRank * ExpertSize).Select(i => (float)((rank * SlotsPerRank + i / ExpertSize) % experts)).ToArray();
        _weights = Enumerable.Range(0, layers).Select(_ => new DeviceBuffer<float>(backend, values)).ToArray();
        _tensors = _weights.Select(w => new[] { ExpertTensor.Create("w", w.AsSlice(), SlotsPerRank) }).ToArray();
    }

    public int Rank { get; }
    public int Layers { get; }
    public int LogicalExperts { get; }
    public int Slots { get; }
    public int SlotsPerRank { get; }
    public Backend Backend { get; }
    public ComputeStream Stream { get; }
    public IReadOnlyList<EplbLayerState> LayerStates { get; private set; } = [];

    public IReadOnlyList<ExpertTensor> GetExpertWeights(int layer) => _tensors[layer];
    public void SetEplbState(IReadOnlyList<EplbLayerState> layers) => LayerStates = layers;
    public void UpdateExpertMap(int layer, ReadOnlySpan<int> phy2Log) { }

    /// <summary>Whether every local slot's weights are those of the expert <paramref name="phy2Log"/> puts there.</summary>
    public bool HoldsExpertsOf(ReadOnlySpan<int> phy2Log, int layer)
    {
        var values = _weights[layer].ToArray(Stream);
        for (var j = 0; j < SlotsPerRank; j++)
            for (var i = 0; i < ExpertSize; i++)
                if (values[j * ExpertSize + i] != phy2Log[Rank * SlotsPerRank + j]) return false;
        return true;
    }

    public void Dispose()
    {
        foreach (var weights in _weights) weights.Dispose();
        Stream.Dispose();
    }
}
