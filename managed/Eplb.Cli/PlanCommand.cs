using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;

namespace Eplb.Cli;

/// <summary>
/// <c>eplb plan</c>: turns a recorded expert-load dump into a placement file that SGLang's
/// <c>--init-expert-location</c> can load (SPEC 8), and reports what the plan achieves.
/// </summary>
internal static class PlanCommand
{
    public static Command Create()
    {
        var load = new Option<string>("--load") { Description = "Expert-load dump: SGLang's {\"logical_count\": [L][N] or [T][L][N]} or a bare [L][N] array", Required = true };
        var replicas = new Option<int>("--replicas") { Description = "R, physical slots per layer (N + redundant), a multiple of --gpus", Required = true };
        var groups = new Option<int>("--groups") { Description = "Expert groups of group-limited routing (8 for DeepSeek-V3; 1 for none)", Required = true };
        var nodes = new Option<int>("--nodes") { Description = "Nodes; --gpus must be a multiple of it", Required = true };
        var gpus = new Option<int>("--gpus") { Description = "Expert-parallel ranks (GPUs)", Required = true };
        var policy = new Option<string>("--policy") { Description = $"Placement policy: {string.Join(", ", PlacementPolicies.Names)}", DefaultValueFactory = _ => "deepseek" };
        var old = new Option<string?>("--old") { Description = "The placement in force (a file this command wrote): slots are preserved, incremental starts from it" };
        var noDuplicate = new Option<bool>("--no-duplicate-on-gpu") { Description = "Never put two replicas of one expert on one GPU" };
        var maxReplicas = new Option<int>("--max-replicas") { Description = "Kmax, the width of logical_to_physical_map (0 derives it from the plan)" };
        var expertBytes = new Option<long>("--expert-bytes")
        {
            Description = "Bytes of one expert of one layer, for the bytes-to-move figure (default: DeepSeek-V3 FP8 weights and block scales)",
            DefaultValueFactory = _ => Placement.DeepSeekV3ExpertBytes,
        };
        var output = new Option<string>("--out") { Description = "Placement file to write (JSON)", Required = true };
        var repeat = new Option<int>("--repeat")
        {
            Description = "Plan this many times and report the median planning time (for benchmarks; the plan is the same every time)",
            DefaultValueFactory = _ => 1,
        };
        var command = new Command("plan", "Plan an expert placement from a load dump and write it for SGLang's --init-expert-location")
        {
            load, replicas, groups, nodes, gpus, policy, old, noDuplicate, maxReplicas, expertBytes, output, repeat,
        };
        command.SetAction(parse => Run(new Arguments(parse.GetValue(load)!, parse.GetValue(replicas), parse.GetValue(groups), parse.GetValue(nodes),
            parse.GetValue(gpus), parse.GetValue(policy)!, parse.GetValue(old), parse.GetValue(noDuplicate), parse.GetValue(maxReplicas),
            parse.GetValue(expertBytes), parse.GetValue(output)!, parse.GetValue(repeat))));
        return command;
    }

    private sealed record Arguments(string Load, int Replicas, int Groups, int Nodes, int Gpus, string Policy, string? Old,
        bool NoDuplicateOnGpu, int MaxReplicas, long ExpertBytes, string Out, int Repeat);

    private static int Run(Arguments args)
    {
        if (args.ExpertBytes < 0) throw new ArgumentException($"--expert-bytes must be >= 0 (got {args.ExpertBytes})");
        if (string.IsNullOrWhiteSpace(args.Out)) throw new ArgumentException("--out must name a file");
        if (args.Repeat < 1) throw new ArgumentException($"--repeat must be >= 1 (got {args.Repeat})");
        var policy = PlacementPolicies.Get(args.Policy);
        var raw = ExpertLoad.Read(args.Load);
        var load = raw.WithoutEmptyLayers(out var dropped);
        if (load.Layers == 0) throw new InvalidDataException($"{args.Load}: every layer's load is 0; there is nothing to plan");
        var request = new PlacementRequest(args.Replicas, args.Groups, args.Nodes, args.Gpus)
        {
            NoDuplicateOnGpu = args.NoDuplicateOnGpu,
            MaxReplicas = args.MaxReplicas,
        };
        request.Validate(load);
        var current = args.Old != null ? ReadPlacement(args.Old, raw, load, request) : null;

        // Run the policy on a few layers first (code compiled, threads started): elapsed_ms is the
        // policy's time, not the JIT's or the thread pool's. Eight layers make full batches of
        // layers (DeepSeekPolicy plans up to four at once), so every path is compiled.
        var warm = Enumerable.Range(0, Math.Min(8, load.Layers)).ToArray();
        policy.Plan(load.Select(warm), request,
            current != null ? Placement.FromPhy2Log(warm.Select(l => current.Phy2Log(l).ToArray()).ToList(), load.Experts, request.Gpus, request.Nodes) : null);
        var times = new double[args.Repeat];
        Placement placement = null!;
        for (var i = 0; i < times.Length; i++)
        {
            var clock = Stopwatch.StartNew();
            placement = policy.Plan(load, request, current);
            times[i] = clock.Elapsed.TotalMilliseconds;
        }
        Array.Sort(times);
        var elapsedMs = times[times.Length / 2];

        var before = current ?? Placement.Initial(load.Layers, load.Experts, request.Slots, request.Gpus, request.Nodes);
        var perLayer = placement.BalancednessPerLayer(load);
        var balancedness = placement.Balancedness(load);
        var nodeLocal = placement.NodeLocalFraction(load, load.Experts % request.Groups == 0 ? request.Groups : 1);
        WriteAtomically(args.Out, writer => Write(writer, placement, load, policy.Name, request, balancedness, perLayer, nodeLocal, elapsedMs));

        var hierarchical = request.IsHierarchical(load.Experts) ? "hierarchical" : "global";
        var slots = (long)load.Layers * request.Slots;
        var changed = placement.SlotsChanged(before);
        var bytes = placement.BytesToMove(before, args.ExpertBytes);
        var invariant = CultureInfo.InvariantCulture;
        Console.WriteLine(string.Create(invariant,
            $"{policy.Name} ({hierarchical} layout): {load.Layers} layers x {load.Experts} experts -> R = {request.Slots} slots on {request.Gpus} GPUs, " +
            $"{request.Nodes} nodes, {request.Groups} groups"));
        if (dropped.Count > 0) Console.WriteLine($"left out {dropped.Count} layers with no load: {string.Join(", ", dropped)}");
        Console.WriteLine(string.Create(invariant,
            $"balancedness {before.Balancedness(load):F3} -> {balancedness:F3} (worst layer {perLayer.Min():F3}), node-local {nodeLocal:F3}"));
        Console.WriteLine(string.Create(invariant,
            $"slots changed {changed} of {slots} (against the {(current != null ? "old" : "initial")} placement), " +
            $"{bytes / (1024.0 * 1024 * 1024):F2} GiB to move at {args.ExpertBytes} bytes per expert"));
        Console.WriteLine(string.Create(invariant, $"planned in {elapsedMs:F3} ms{(args.Repeat > 1 ? $" (median of {args.Repeat} runs)" : "")}; wrote {args.Out}"));
        return 0;
    }

    /// <summary>
    /// Reads the placement in force from a file in this command's format (<c>physical_to_logical_map</c>
    /// [L][R], optional <c>layer_ids</c>). Rows are matched to the load's kept layers by layer id when
    /// the file has ids, else by position (all layers of the dump, or only the kept ones).
    /// </summary>
    private static Placement ReadPlacement(string path, ExpertLoad raw, ExpertLoad load, PlacementRequest request)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"placement file '{path}' does not exist", path);
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllBytes(path));
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: malformed JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("physical_to_logical_map", out var map) || map.ValueKind != JsonValueKind.Array)
                throw new InvalidDataException($"{path}: expected an object with a \"physical_to_logical_map\" array");
            var rows = new List<int[]>();
            foreach (var row in map.EnumerateArray())
            {
                if (row.ValueKind != JsonValueKind.Array) throw new InvalidDataException($"{path}: physical_to_logical_map[{rows.Count}] is not an array");
                var values = new int[row.GetArrayLength()];
                var i = 0;
                foreach (var cell in row.EnumerateArray())
                {
                    if (cell.ValueKind != JsonValueKind.Number || !cell.TryGetInt32(out values[i]))
                        throw new InvalidDataException($"{path}: physical_to_logical_map[{rows.Count}][{i}] is not an integer ({cell.GetRawText()})");
                    i++;
                }
                rows.Add(values);
            }
            List<int[]> selected;
            if (root.TryGetProperty("layer_ids", out var ids))
            {
                if (ids.ValueKind != JsonValueKind.Array || ids.GetArrayLength() != rows.Count || ids.EnumerateArray().Any(v => v.ValueKind != JsonValueKind.Number))
                    throw new InvalidDataException($"{path}: layer_ids must be {rows.Count} integers, one per physical_to_logical_map row");
                var byId = new Dictionary<int, int[]>();
                var k = 0;
                foreach (var id in ids.EnumerateArray()) byId[id.GetInt32()] = rows[k++];
                selected = [];
                foreach (var id in load.LayerIds)
                {
                    if (!byId.TryGetValue(id, out var row)) throw new InvalidDataException($"{path}: has no row for layer {id} of the load");
                    selected.Add(row);
                }
            }
            else if (rows.Count == load.Layers)
            {
                selected = rows;
            }
            else if (rows.Count == raw.Layers)
            {
                selected = load.LayerIds.Select(id => rows[id]).ToList();
            }
            else
            {
                throw new InvalidDataException($"{path}: {rows.Count} layers, but the load has {raw.Layers} ({load.Layers} with load)");
            }
            if (selected.Count > 0 && selected[0].Length != request.Slots)
                throw new InvalidDataException($"{path}: {selected[0].Length} slots per layer, but --replicas is {request.Slots}");
            try
            {
                return Placement.FromPhy2Log(selected, load.Experts, request.Gpus, request.Nodes);
            }
            catch (ArgumentException e)
            {
                throw new InvalidDataException($"{path}: {e.Message}", e);
            }
        }
    }

    private static void Write(Utf8JsonWriter w, Placement p, ExpertLoad load, string policy, PlacementRequest request,
        double balancedness, double[] perLayer, double nodeLocal, double elapsedMs)
    {
        w.WriteStartObject();
        w.WriteStartArray("physical_to_logical_map");
        for (var l = 0; l < p.Layers; l++) WriteInts(w, p.Phy2Log(l));
        w.WriteEndArray();
        w.WriteStartArray("logical_to_physical_map");
        for (var l = 0; l < p.Layers; l++)
        {
            w.WriteStartArray();
            var table = p.Log2Phy(l);
            for (var e = 0; e < p.Experts; e++) WriteInts(w, table.Slice(e * p.MaxReplicas, p.MaxReplicas));
            w.WriteEndArray();
        }
        w.WriteEndArray();
        w.WriteStartArray("logical_replica_count");
        for (var l = 0; l < p.Layers; l++) WriteInts(w, p.LogCnt(l));
        w.WriteEndArray();
        w.WriteStartArray("layer_ids");
        foreach (var id in load.LayerIds) w.WriteNumberValue(id);
        w.WriteEndArray();
        w.WriteString("policy", policy);
        w.WriteNumber("replicas", request.Slots);
        w.WriteNumber("groups", request.Groups);
        w.WriteNumber("nodes", request.Nodes);
        w.WriteNumber("gpus", request.Gpus);
        w.WriteNumber("balancedness", balancedness);
        w.WriteStartArray("balancedness_per_layer");
        foreach (var b in perLayer) w.WriteNumberValue(b);
        w.WriteEndArray();
        w.WriteNumber("node_local_fraction", nodeLocal);
        w.WriteNumber("elapsed_ms", elapsedMs);
        w.WriteEndObject();
    }

    private static void WriteInts(Utf8JsonWriter w, ReadOnlySpan<int> values)
    {
        w.WriteStartArray();
        foreach (var v in values) w.WriteNumberValue(v);
        w.WriteEndArray();
    }

    /// <summary>Writes next to the target and renames, so a failure leaves no partial file.</summary>
    private static void WriteAtomically(string path, Action<Utf8JsonWriter> write)
    {
        var full = Path.GetFullPath(path);
        var temporary = full + $".{Environment.ProcessId}.tmp";
        try
        {
            using (var stream = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write))
            using (var writer = new Utf8JsonWriter(stream))
            {
                write(writer);
            }
            File.Move(temporary, full, overwrite: true);
        }
        finally
        {
            if (File.Exists(temporary)) File.Delete(temporary);
        }
    }
}
