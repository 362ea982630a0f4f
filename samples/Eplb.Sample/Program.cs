// A host app using the Eplb package: options from appsettings.json through AddEplb, a placement for
// a DeepSeek-V3-shaped load, and one routing call with the EPLB mapping and load recording.
using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Load;
using Eplb.Placement;
using Eplb.Runtime;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;

var builder = Host.CreateApplicationBuilder(args);
builder.Services.AddEplb(builder.Configuration.GetSection(EplbOptions.SectionName));
using var host = builder.Build();
var options = host.Services.GetRequiredService<IOptions<EplbOptions>>().Value;

// A skewed load: 4 MoE layers x 256 experts, expert e of layer l gets (e * 37 + l) % 97 + 1 tokens.
const int layers = 4, experts = 256, ranks = 32;
var values = new double[layers * experts];
for (var l = 0; l < layers; l++)
    for (var e = 0; e < experts; e++) values[l * experts + e] = (e * 37 + l) % 97 + 1;
var load = new ExpertLoad(layers, experts, values);

var slots = experts + options.RedundantExperts;
var request = new PlacementRequest(slots, options.Groups, options.Nodes, ranks);
var placement = PlacementPolicies.Get(options.Policy).Plan(load, request);
var initial = ExpertPlacement.Initial(layers, experts, slots, ranks, options.Nodes);
Console.WriteLine($"policy={options.Policy} balancedness {initial.Balancedness(load):F3} -> {placement.Balancedness(load):F3}");

// Route 64 tokens of layer 0 on the default backend, with that layer's EPLB tables.
var backend = EplbRuntime.DefaultBackend;
using var stream = new ComputeStream(backend);
using var log2phy = new DeviceBuffer<int>(backend, placement.Log2Phy(0));
using var logcnt = new DeviceBuffer<int>(backend, placement.LogCnt(0));
using var counters = new DeviceBuffer<int>(backend, slots);
counters.Fill(0);
using var record = new DeviceBuffer<int>(backend, [1]);
var layerState = new EplbLayerState(log2phy, logcnt, counters, record, experts, placement.MaxReplicas, slots, options.ReplicaSelection);
var router = new Router(RouterOptions.DeepSeekV3, layerState);
var random = new Random(7);
const int tokens = 64;
using var logits = new DeviceBuffer<float>(backend, Enumerable.Range(0, tokens * experts).Select(_ => (float)random.NextDouble() * 4 - 2).ToArray());
using var ids = new DeviceBuffer<int>(backend, tokens * router.Options.TopK);
using var weights = new DeviceBuffer<float>(backend, tokens * router.Options.TopK);
router.Route(stream, logits, ids, weights);
stream.Synchronize();
var routed = counters.ToArray().Sum();
Console.WriteLine($"backend={backend.ToString().ToLowerInvariant()} routed={routed} tokens x top-k={tokens * router.Options.TopK}");
return routed == tokens * router.Options.TopK ? 0 : 1;
