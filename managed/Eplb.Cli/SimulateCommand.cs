using System.CommandLine;
using System.Text.Json;
using Eplb.Load;
using Eplb.Placement;
using Eplb.Runtime;
using Eplb.Simulation;
using Spectre.Console;

namespace Eplb.Cli;

/// <summary>
/// <c>eplb simulate</c>: the main job. An expert-parallel serving simulation on the real DeepSeek-V3
/// load files that runs the real pipeline (routing + EPLB mapping and recording, EplbState with async
/// rearrangement, in-process weight migration over simulated ranks) and compares no EPLB with every policy.
/// </summary>
internal static class SimulateCommand
{
    public static Command Create()
    {
        var load = new Option<string[]>("--load") { Description = "Load dump(s) to draw routing from, one phase each (default: decode and prefill files of data/load-data, alternating)", AllowMultipleArgumentsPerToken = true };
        var ranks = new Option<int>("--ranks", "--gpus") { Description = "G, expert-parallel ranks (GPUs)", DefaultValueFactory = _ => 32 };
        var nodes = new Option<int>("--nodes") { Description = "Nodes the ranks span", DefaultValueFactory = _ => 4 };
        var slots = new Option<int>("--slots", "--replicas") { Description = "R, physical slots per layer with EPLB (N + redundant)", DefaultValueFactory = _ => 288 };
        var groups = new Option<int>("--groups") { Description = "Expert groups (DeepSeek-V3: 8)", DefaultValueFactory = _ => 8 };
        var steps = new Option<int>("--steps") { Description = "Forward passes per run", DefaultValueFactory = _ => 256 };
        var tokens = new Option<int>("--tokens") { Description = "Tokens per forward pass over all ranks", DefaultValueFactory = _ => 512 };
        var policy = new Option<string[]>("--policy") { Description = "Policies to compare: deepseek, locality, incremental or all", AllowMultipleArgumentsPerToken = true, DefaultValueFactory = _ => ["all"] };
        var backend = new Option<string>("--backend") { Description = "cpu, cuda or auto", DefaultValueFactory = _ => "auto" };
        var window = new Option<int>("--window") { Description = "EPLB load window (passes)", DefaultValueFactory = _ => 48 };
        var interval = new Option<int>("--interval") { Description = "EPLB rearrangement interval (passes)", DefaultValueFactory = _ => 96 };
        var routing = new Option<string>("--routing") { Description = "Routing kernel: hash (DeepSeek-V4 hash top-k, fast) or softmax (top-k over Gumbel-noised logits)", DefaultValueFactory = _ => "hash" };
        routing.AcceptOnlyFromAmong("hash", "softmax");
        var sync = new Option<bool>("--sync") { Description = "Rearrange synchronously instead of in the background" };
        var seed = new Option<int>("--seed") { Description = "Seed of the routing draws", DefaultValueFactory = _ => 1 };
        var plot = new Option<string?>("--plot") { Description = "Write a PNG: per-rank load without and with EPLB, balancedness over time" };
        var json = new Option<string?>("--json") { Description = "Write the final table as JSON" };
        var command = new Command("simulate", "Simulate expert-parallel serving on the real load files: no EPLB vs each policy")
        {
            load, ranks, nodes, slots, groups, steps, tokens, policy, backend, routing, window, interval, sync, seed, plot, json,
        };
        command.SetAction(parse =>
        {
            var policies = parse.GetValue(policy)!;
            var names = policies.Length == 0 || policies.Any(p => p.Equals("all", StringComparison.OrdinalIgnoreCase))
                ? PlacementPolicies.Names.Take(3).ToArray()
                : policies.Select(p => PlacementPolicies.Get(p).Name).ToArray();
            var files = parse.GetValue(load) is { Length: > 0 } given ? given : DefaultLoadFiles();
            var options = new SimulationOptions
            {
                Loads = files.Select(f => ExpertLoad.Read(f).WithoutEmptyLayers(out _)).ToList(),
                Ranks = Positive(parse.GetValue(ranks), "--ranks"),
                Nodes = Positive(parse.GetValue(nodes), "--nodes"),
                Slots = Positive(parse.GetValue(slots), "--slots"),
                Groups = Positive(parse.GetValue(groups), "--groups"),
                Steps = Positive(parse.GetValue(steps), "--steps"),
                Tokens = Positive(parse.GetValue(tokens), "--tokens"),
                Policies = names,
                Backend = EplbRuntime.ResolveBackend(parse.GetValue(backend)),
                WindowSize = Positive(parse.GetValue(window), "--window"),
                StepInterval = Positive(parse.GetValue(interval), "--interval"),
                UseAsync = !parse.GetValue(sync),
                Routing = parse.GetValue(routing) == "softmax" ? SimulationRouting.Softmax : SimulationRouting.Hash,
                Seed = parse.GetValue(seed),
            };
            return Run(options, files, parse.GetValue(plot), parse.GetValue(json));
        });
        return command;
    }

    private static int Positive(int value, string name) =>
        value >= 1 ? value : throw new ArgumentException($"{name} must be >= 1 (got {value})");

    private static int Run(SimulationOptions options, string[] files, string? plotPath, string? jsonPath)
    {
        using var outputs = OutputFiles.Prepare(("--json", jsonPath), ("--plot", plotPath));
        var simulation = new ServingSimulation(options);
        SimulationResult? result = null;
        var runNames = new[] { "no EPLB" }.Concat(options.Policies).ToArray();
        AnsiConsole.Progress().AutoClear(true).HideCompleted(false).Start(context =>
        {
            var tasks = runNames.Select(n => context.AddTask(n, autoStart: true, maxValue: options.Steps)).ToArray();
            result = simulation.Run((run, step) => tasks[run].Value = step);
        });

        var table = new Table().Title($"eplb simulate: {options.Loads[0].Layers} layers x {options.Loads[0].LogicalExperts} experts, " +
                                      $"{options.Ranks} ranks / {options.Nodes} nodes, R = {options.Slots}, {options.Tokens} tokens x {options.TopK} per pass")
            .Border(TableBorder.Simple)
            .AddColumns("", "balancedness", "local", "rearr.", "slots", "bytes*", "ms/pass");
        foreach (var column in table.Columns) column.NoWrap();
        foreach (var run in result!.Runs)
            table.AddRow(run.Name, $"{run.Balancedness:F3}", $"{run.NodeLocalFraction:P1}", run.Rearrangements.ToString(), run.SlotsMoved.ToString("N0"),
                Bytes(run.FullScaleBytesMoved), $"{run.SecondsPerStep * 1000:F1}");
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine("local: node-local fraction of routed tokens; slots, bytes*: slots changed and bytes moved by rearrangements,");
        AnsiConsole.MarkupLine("* at the real expert size (DeepSeek-V3 FP8 with scales; the simulated ranks move scaled-down weights)");
        AnsiConsole.MarkupLine($"backend [bold]{Backend(result.Backend)}[/], {options.Steps} passes per run, " +
                               $"{options.Routing.ToString().ToLowerInvariant()} routing, {(options.UseAsync ? "async" : "sync")} EPLB (window {options.WindowSize}, interval {options.StepInterval}), " +
                               $"loads: {Markup.Escape(string.Join(" -> ", files.Select(Path.GetFileNameWithoutExtension)))}");

        if (jsonPath != null) outputs.Write(jsonPath, stream => stream.Write(System.Text.Encoding.UTF8.GetBytes(Json(result))));
        if (plotPath != null) outputs.WriteFile(plotPath, temporary => SimulationPlot.Save(result, temporary));
        outputs.Commit();
        return 0;
    }

    internal static string Json(SimulationResult result)
    {
        var document = new Dictionary<string, object>
        {
            ["backend"] = Backend(result.Backend),
            ["steps"] = result.Steps,
            ["seconds_per_step"] = result.Runs.Average(r => r.SecondsPerStep),
            ["no_eplb"] = new Dictionary<string, object>
            {
                ["balancedness"] = result.NoEplb.Balancedness,
                ["node_local_fraction"] = result.NoEplb.NodeLocalFraction,
            },
            ["policies"] = result.Runs.Skip(1).ToDictionary(r => r.Name, r => (object)new Dictionary<string, object>
            {
                ["balancedness"] = r.Balancedness,
                ["node_local_fraction"] = r.NodeLocalFraction,
                ["rearrangements"] = r.Rearrangements,
                ["slots_moved"] = r.SlotsMoved,
                ["bytes_moved"] = r.FullScaleBytesMoved,
                ["simulated_bytes_moved"] = r.BytesMoved,
                ["seconds_per_step"] = r.SecondsPerStep,
            }),
        };
        return JsonSerializer.Serialize(document, new JsonSerializerOptions { WriteIndented = true });
    }

    private static string Backend(Backend backend) => backend.ToString().ToLowerInvariant();

    private static string Bytes(long bytes) => bytes switch
    {
        >= 1L << 30 => $"{bytes / (double)(1L << 30):F1} GiB",
        >= 1L << 20 => $"{bytes / (double)(1L << 20):F1} MiB",
        _ => $"{bytes:N0} B",
    };

    /// <summary>The real SGLang dumps, decode and prefill alternating (the drift EPLB has to follow).</summary>
    private static string[] DefaultLoadFiles()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            var data = Path.Combine(dir.FullName, "data", "load-data", "sglang-deepseek-v3-r1");
            if (!Directory.Exists(data)) continue;
            string[] phases = ["decode_in1000out1000", "prefill_in4096", "decode_in500out1500", "prefill_in1024"];
            return phases.Select(p => Path.Combine(data, p + ".json")).ToArray();
        }
        throw new ArgumentException("no --load given and data/load-data was not found above the eplb binary");
    }
}
