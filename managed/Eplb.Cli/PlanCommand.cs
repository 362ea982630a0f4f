using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Eplb.Formats;
using Eplb.Load;
using Eplb.Migration;
using Eplb.Placement;

namespace Eplb.Cli;

/// <summary>
/// <c>eplb plan</c>: turns a recorded expert-load dump (SGLang's recorder <c>.pt</c> or JSON) into a
/// placement file that SGLang's <c>--init-expert-location</c> loads as is (docs/design.md §8: only
/// <c>physical_to_logical_map</c>, one row per model layer), and reports what the plan achieves in
/// <c>&lt;out&gt;.report.json</c> and on stdout.
/// </summary>
internal static class PlanCommand
{
    public static Command Create()
    {
        var load = new Option<string[]>("--load")
        {
            Description = "Expert-load dump: SGLang's recorder .pt (stat, stat_approx, per_pass), {\"logical_count\": [L][N] or [T][L][N]} or a bare [L][N] array; " +
                "repeat it to sum files (per_pass writes one per rank)",
            Required = true,
        };
        var modelLayers = new Option<int>("--model-layers")
        {
            Description = "The model's layer count (num_hidden_layers, 61 for DeepSeek-V3) when the load has only MoE rows (they are taken as the last layers); " +
                "default: the load's rows",
        };
        var slots = new Option<int>("--slots", "--replicas") { Description = "R, physical slots per layer (N + redundant), a multiple of --ranks", Required = true };
        var groups = new Option<int>("--groups") { Description = "Expert groups of group-limited routing (8 for DeepSeek-V3; 1 for none)", Required = true };
        var nodes = new Option<int>("--nodes") { Description = "Nodes; --ranks must be a multiple of it", Required = true };
        var ranks = new Option<int>("--ranks", "--gpus") { Description = "G, expert-parallel ranks (GPUs)", Required = true };
        var policy = new Option<string>("--policy") { Description = $"Placement policy: {string.Join(", ", PlacementPolicies.Names)}", DefaultValueFactory = _ => "deepseek" };
        var old = new Option<string?>("--old")
        {
            Description = "The placement in force (SGLang's physical_to_logical_map as .json or .pt, or an older file of this command): " +
                "slots are preserved, incremental starts from it",
        };
        var noDuplicate = new Option<bool>("--no-duplicate-on-rank", "--no-duplicate-on-gpu") { Description = "Never put two replicas of one expert on one rank" };
        var maxReplicas = new Option<int>("--max-replicas") { Description = "Kmax, the width of logical_to_physical_map (0 derives it from the plan)" };
        var expertBytes = new Option<long>("--expert-bytes")
        {
            Description = "Bytes of one expert of one layer, for the bytes-to-move figure (default: DeepSeek-V3 FP8 weights and block scales)",
            DefaultValueFactory = _ => MigrationPlanner.DeepSeekV3ExpertBytes,
        };
        var output = new Option<string>("--out")
        {
            Description = "Placement file for --init-expert-location: JSON, or torch.save format when it ends in .pt (a symlink's target is written, " +
                          "a device or FIFO written through, never replaced)",
            Required = true,
        };
        var repeat = new Option<int>("--repeat")
        {
            Description = "Plan this many times and report the median planning time (for benchmarks; the plan is the same every time)",
            DefaultValueFactory = _ => 1,
        };
        var reportOption = new Option<string?>("--report")
        {
            Description = "The report (policy, balancedness, bytes to move, logical_to_physical_map); default <out>.report.json, none when --out is a device or FIFO",
        };
        var command = new Command("plan", "Plan an expert placement from a load dump and write it for SGLang's --init-expert-location. " +
                                          $"Memory: a run is refused before it starts when it would need more than {MemoryBudget.Describe()}; " +
                                          "it needs about 16 times the size of the input files plus 32 x model layers x (R + N x Kmax + N) bytes " +
                                          "(Kmax: --max-replicas, or R - N + 1 when derived)")
        {
            load, modelLayers, slots, groups, nodes, ranks, policy, old, noDuplicate, maxReplicas, expertBytes, output, reportOption, repeat,
        };
        command.SetAction(parse => Run(new Arguments(parse.GetValue(load)!, parse.GetValue(modelLayers), parse.GetValue(slots), parse.GetValue(groups),
            parse.GetValue(nodes), parse.GetValue(ranks), parse.GetValue(policy)!, parse.GetValue(old), parse.GetValue(noDuplicate), parse.GetValue(maxReplicas),
            parse.GetValue(expertBytes), parse.GetValue(output)!, parse.GetValue(reportOption), parse.GetValue(repeat))));
        return command;
    }

    private sealed record Arguments(string[] Load, int ModelLayers, int Slots, int Groups, int Nodes, int Ranks, string Policy, string? Old,
        bool NoDuplicateOnRank, int MaxReplicas, long ExpertBytes, string Out, string? Report, int Repeat);

    /// <summary>
    /// The memory a plan needs once the load's shape is known: the placements it builds (planned,
    /// initial or old, the model's rows, the slot-preserving copy, the warm-up) and the policies'
    /// per-thread work space, <c>[L][R]</c> + <c>[L][N][Kmax]</c> + <c>[L][N]</c> ints each (docs/ARCHITECTURE.md).
    /// </summary>
    internal static double PlanBytes(int modelLayers, int logicalExperts, int slots, int ranks, int maxReplicas)
    {
        double kmax = maxReplicas > 0 ? maxReplicas : Math.Max(1, slots - logicalExperts + 1);
        var placement = 4.0 * modelLayers * (slots + logicalExperts * kmax + logicalExperts);
        var workspace = 256.0 * (slots + logicalExperts + ranks) * Environment.ProcessorCount;
        return 8 * placement + workspace + 64.0 * 1024 * 1024;
    }

    private static int Run(Arguments args)
    {
        if (args.ExpertBytes < 0) throw new ArgumentException($"--expert-bytes must be >= 0 (got {args.ExpertBytes})");
        if (args.ModelLayers < 0) throw new ArgumentException($"--model-layers must be >= 0 (got {args.ModelLayers})");
        if (args.Repeat is < 1 or > 1_000_000) throw new ArgumentException($"--repeat must be in [1, 1000000] (got {args.Repeat})");
        if (args.Slots < 1) throw new ArgumentException($"--slots must be >= 1 (got {args.Slots})");
        if (args.MaxReplicas > args.Slots) throw new ArgumentException($"--max-replicas {args.MaxReplicas} exceeds --slots {args.Slots}: no expert has more replicas than there are slots");
        var policy = PlacementPolicies.Get(args.Policy);

        // Every path before the work: inputs are regular files of a size that fits, outputs writable.
        var inputBytes = args.Load.Sum(path => (double)InputFile.Check("--load", path));
        if (args.Old != null) inputBytes += InputFile.Check("--old", args.Old);
        MemoryBudget.Check("reading the input files", 16 * inputBytes, $"16 x {MemoryBudget.Format(inputBytes)} of input");
        var torch = args.Out.EndsWith(".pt", StringComparison.OrdinalIgnoreCase);
        var reportPath = args.Report ?? (OutputFiles.IsWrittenThrough(args.Out) ? null : args.Out + ".report.json");
        using var outputs = OutputFiles.Prepare(("--out", args.Out), ("--report", reportPath));

        // The load's own shape first, so that --model-layers is weighed before rows are added for it.
        var file = ExpertLoadFile.Read(args.Load);
        if (args.ModelLayers > 0)
        {
            MemoryBudget.Check($"--model-layers {args.ModelLayers}", PlanBytes(args.ModelLayers, file.Load.LogicalExperts, args.Slots, args.Ranks, args.MaxReplicas),
                $"{args.ModelLayers} model layers x R = {args.Slots} slots");
            file = ExpertLoadFile.Read(args.Load, new ExpertLoadReadOptions { ModelLayers = args.ModelLayers });
        }
        var load = file.Planned;
        if (load.Layers == 0) throw new InvalidDataException($"{string.Join(", ", args.Load)}: every layer's load is 0; there is nothing to plan");
        var request = new PlacementRequest(args.Slots, args.Groups, args.Nodes, args.Ranks)
        {
            NoDuplicateOnRank = args.NoDuplicateOnRank,
            MaxReplicas = args.MaxReplicas,
        };
        request.Validate(load);
        MemoryBudget.Check("the plan", PlanBytes(file.ModelLayers, load.LogicalExperts, request.Slots, request.Ranks, request.MaxReplicas),
            $"{file.ModelLayers} model layers x R = {request.Slots} slots, N = {load.LogicalExperts} experts, Kmax = " +
            (request.MaxReplicas > 0 ? $"{request.MaxReplicas}" : $"up to {request.Slots - load.LogicalExperts + 1}"));
        if (args.ExpertBytes > 0 && (double)load.Layers * request.Slots * args.ExpertBytes > long.MaxValue)
            throw new ArgumentException($"--expert-bytes {args.ExpertBytes} is too large: {load.Layers} layers x {request.Slots} slots of it overflow a 64-bit byte count");
        var current = args.Old == null
            ? null
            : PlacementFile.Read(args.Old).ForLayers(load.LayerIds, file.ModelLayers, load.LogicalExperts, request.Slots, request.Ranks, request.Nodes, args.Old);

        // Run the policy on a few layers first (code compiled, threads started): elapsed_ms is the
        // policy's time, not the JIT's or the thread pool's. Eight layers make full batches of
        // layers (DeepSeekPolicy plans up to four at once), so every path is compiled.
        var warm = Enumerable.Range(0, Math.Min(8, load.Layers)).ToArray();
        policy.Plan(load.Select(warm), request,
            current != null ? ExpertPlacement.FromPhy2Log(warm.Select(l => current.Phy2Log(l).ToArray()).ToList(), load.LogicalExperts, request.Ranks, request.Nodes) : null);
        var times = new double[args.Repeat];
        ExpertPlacement placement = null!;
        for (var i = 0; i < times.Length; i++)
        {
            var clock = Stopwatch.StartNew();
            placement = policy.Plan(load, request, current);
            times[i] = clock.Elapsed.TotalMilliseconds;
        }
        Array.Sort(times);
        var elapsedMs = times[times.Length / 2];

        var before = current ?? ExpertPlacement.Initial(load.Layers, load.LogicalExperts, request.Slots, request.Ranks, request.Nodes);
        var perLayer = placement.BalancednessPerLayer(load);
        var balancedness = placement.Balancedness(load);
        var nodeLocal = placement.NodeLocalFraction(load, load.LogicalExperts % request.Groups == 0 ? request.Groups : 1);
        var model = PlacementFile.ForModel(placement, load.LayerIds, file.ModelLayers, request.MaxReplicas);
        var report = new Report(file, policy.Name, request, model, before.Balancedness(load), balancedness, perLayer, nodeLocal,
            placement.SlotsChanged(before), (long)load.Layers * request.Slots, current != null, MigrationPlanner.BytesToMove(before, placement, args.ExpertBytes),
            args.ExpertBytes, elapsedMs);
        outputs.Write(args.Out, stream =>
        {
            if (torch) PlacementFile.WriteTorch(stream, model);
            else PlacementFile.WriteJson(stream, model);
        });
        if (reportPath != null)
        {
            outputs.Write(reportPath, stream =>
            {
                using var writer = new Utf8JsonWriter(stream);
                WriteReport(writer, report, args.Out);
            });
        }
        // Everything is written: only now do the files appear (a failure above left none).
        outputs.Commit();

        var hierarchical = request.IsHierarchical(load.LogicalExperts) ? "hierarchical" : "global";
        var invariant = CultureInfo.InvariantCulture;
        foreach (var source in file.Sources) Console.WriteLine($"read {source.Path}: {source.Description}");
        Console.WriteLine(file.UnplannedLayerIds.Count == 0
            ? $"{file.ModelLayers} model layers x {load.LogicalExperts} experts, all planned"
            : $"{file.ModelLayers} model layers x {load.LogicalExperts} experts: {file.UnplannedLayerIds.Count} layers with no load keep SGLang's trivial row: " +
              string.Join(", ", file.UnplannedLayerIds));
        Console.WriteLine(string.Create(invariant,
            $"{policy.Name} ({hierarchical} layout): {load.Layers} layers x {load.LogicalExperts} experts -> R = {request.Slots} slots on {request.Ranks} ranks, " +
            $"{request.Nodes} nodes, {request.Groups} groups"));
        Console.WriteLine(string.Create(invariant,
            $"balancedness {report.BalancednessBefore:F3} -> {balancedness:F3} (worst layer {perLayer.Min():F3}), node-local {nodeLocal:F3}"));
        Console.WriteLine(string.Create(invariant,
            $"slots changed {report.SlotsChanged} of {report.SlotsTotal} (against the {(current != null ? "old" : "initial")} placement), " +
            $"{report.BytesToMove / (1024.0 * 1024 * 1024):F2} GiB to move at {args.ExpertBytes} bytes per expert"));
        var reportLine = reportPath != null ? $"the report {reportPath}" : "no report (--out is not a regular file; --report names one)";
        Console.WriteLine(string.Create(invariant,
            $"planned in {elapsedMs:F3} ms{(args.Repeat > 1 ? $" (median of {args.Repeat} runs)" : "")}; wrote {args.Out} ({PlacementFile.MapKey} only, {model.Layers} layers x {model.Slots} slots, " +
            $"{(torch ? "torch.save" : "JSON")}) for SGLang's --init-expert-location, and {reportLine}"));
        return 0;
    }

    private sealed record Report(ExpertLoadFile File, string Policy, PlacementRequest Request, ExpertPlacement Model, double BalancednessBefore,
        double Balancedness, double[] BalancednessPerLayer, double NodeLocalFraction, long SlotsChanged, long SlotsTotal, bool AgainstOld,
        long BytesToMove, long ExpertBytes, double ElapsedMs);

    /// <summary>Everything the placement file cannot hold (SGLang accepts no other key there).</summary>
    private static void WriteReport(Utf8JsonWriter w, Report r, string placementPath)
    {
        var model = r.Model;
        w.WriteStartObject();
        w.WriteString("placement_file", placementPath);
        w.WriteStartArray("load_files");
        foreach (var source in r.File.Sources)
        {
            w.WriteStartObject();
            w.WriteString("path", source.Path);
            w.WriteString("format", source.Format.ToString());
            w.WriteString("description", source.Description);
            w.WriteEndObject();
        }
        w.WriteEndArray();
        w.WriteString("policy", r.Policy);
        w.WriteNumber("slots", r.Request.Slots);
        w.WriteNumber("groups", r.Request.Groups);
        w.WriteNumber("nodes", r.Request.Nodes);
        w.WriteNumber("ranks", r.Request.Ranks);
        w.WriteNumber("logical_experts", model.LogicalExperts);
        w.WriteNumber("model_layers", model.Layers);
        w.WriteStartArray("planned_layer_ids");
        foreach (var id in r.File.PlannedLayerIds) w.WriteNumberValue(id);
        w.WriteEndArray();
        w.WriteStartArray("unplanned_layer_ids");
        foreach (var id in r.File.UnplannedLayerIds) w.WriteNumberValue(id);
        w.WriteEndArray();
        w.WriteNumber("balancedness_before", r.BalancednessBefore);
        w.WriteNumber("balancedness", r.Balancedness);
        w.WriteStartArray("balancedness_per_layer");
        foreach (var b in r.BalancednessPerLayer) w.WriteNumberValue(b);
        w.WriteEndArray();
        w.WriteNumber("node_local_fraction", r.NodeLocalFraction);
        w.WriteNumber("slots_changed", r.SlotsChanged);
        w.WriteNumber("slots_total", r.SlotsTotal);
        w.WriteString("changed_against", r.AgainstOld ? "old" : "initial");
        w.WriteNumber("bytes_to_move", r.BytesToMove);
        w.WriteNumber("expert_bytes", r.ExpertBytes);
        w.WriteNumber("elapsed_ms", r.ElapsedMs);
        w.WriteStartArray("logical_to_physical_map");
        for (var l = 0; l < model.Layers; l++)
        {
            w.WriteStartArray();
            var table = model.Log2Phy(l);
            for (var e = 0; e < model.LogicalExperts; e++) WriteInts(w, table.Slice(e * model.MaxReplicas, model.MaxReplicas));
            w.WriteEndArray();
        }
        w.WriteEndArray();
        w.WriteStartArray("logical_replica_count");
        for (var l = 0; l < model.Layers; l++) WriteInts(w, model.LogCnt(l));
        w.WriteEndArray();
        w.WriteEndObject();
    }

    private static void WriteInts(Utf8JsonWriter w, ReadOnlySpan<int> values)
    {
        w.WriteStartArray();
        foreach (var v in values) w.WriteNumberValue(v);
        w.WriteEndArray();
    }
}
