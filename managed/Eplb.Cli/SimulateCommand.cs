using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Eplb.Formats;
using Eplb.Load;
using Eplb.Placement;
using Eplb.Runtime;
using Eplb.Simulation;
using Spectre.Console;

namespace Eplb.Cli;

/// <summary>
/// <c>eplb simulate</c>: the main job. Expert-parallel serving on the real DeepSeek-V3 load dumps
/// (shipped inside the tool) through the real pipeline: per-request routing on every rank, libeplb's
/// EPLB epilogue (mapping op or hash routing kernel), EplbState with in-process migration, and a cost model that
/// turns it into tokens per second. Compares no EPLB, static redundancy, each policy and node-local
/// replica selection (docs/benchmarks.md, "The simulator"; docs/cost-model.md).
/// </summary>
internal static class SimulateCommand
{
    /// <summary>The loads the tool carries, in the default order (decode, then prefill).</summary>
    internal static readonly string[] BuiltInLoads = ["decode_in1000out1000", "prefill_in4096"];

    /// <summary>Share of the memory available to the process a run may be estimated to need.</summary>
    internal const double MemoryShare = 0.75;

    public static Command Create()
    {
        var load = new Option<string[]>("--load")
        {
            Description = "Load dumps (SGLang .pt or JSON), one phase each, in order; 'prefill' in a name makes it a prefill phase, " +
                          "'decode:' or 'prefill:' before a path says so. Built in (the default): " + string.Join(", ", BuiltInLoads),
            AllowMultipleArgumentsPerToken = true,
        };
        var ranks = new Option<int>("--ranks", "--gpus") { Description = "G, expert-parallel ranks (GPUs); each serves its own requests", DefaultValueFactory = _ => 32 };
        var nodes = new Option<int>("--nodes") { Description = "Nodes the ranks span", DefaultValueFactory = _ => 4 };
        var slots = new Option<int>("--slots", "--replicas") { Description = "R, slots per layer of static and the EPLB runs (N + redundant)", DefaultValueFactory = _ => 288 };
        var groups = new Option<int>("--groups") { Description = "Expert groups (DeepSeek-V3: 8)", DefaultValueFactory = _ => 8 };
        var topkGroups = new Option<int>("--topk-groups") { Description = "Groups a token may route to (DeepSeek-V3: 4; = --groups for no limit)", DefaultValueFactory = _ => 4 };
        var decodePasses = new Option<int>("--decode-passes") { Description = "Passes of each decode phase", DefaultValueFactory = _ => 116 };
        var prefillPasses = new Option<int>("--prefill-passes") { Description = "Passes of each prefill phase", DefaultValueFactory = _ => 2 };
        var tokens = new Option<int>("--tokens", "--decode-tokens") { Description = "Decode requests (one token each per pass) per GPU", DefaultValueFactory = _ => 128 };
        var prefillTokens = new Option<int>("--prefill-tokens") { Description = "Prompt tokens per GPU per prefill pass", DefaultValueFactory = _ => 1024 };
        var requestPasses = new Option<double>("--request-passes") { Description = "Mean decode passes a request lives before a new one replaces it", DefaultValueFactory = _ => 1000 };
        var affinity = new Option<double>("--affinity") { Description = "Chance that each expert of a token is one of its request's own experts (0..1)", DefaultValueFactory = _ => 0.5 };
        var policy = new Option<string[]>("--policy") { Description = "Policies: deepseek, locality, incremental or all", AllowMultipleArgumentsPerToken = true, DefaultValueFactory = _ => ["all"] };
        var nodeLocal = new Option<string[]>("--node-local")
        {
            Description = "Policies to run again with node-local replica selection (a replica on the token's node when there is one), or none",
            AllowMultipleArgumentsPerToken = true,
            DefaultValueFactory = _ => ["locality"],
        };
        var backend = new Option<string>("--backend") { Description = "cpu, cuda or auto", DefaultValueFactory = _ => "auto" };
        var window = new Option<int>("--window") { Description = "EPLB load window (passes)", DefaultValueFactory = _ => 32 };
        var interval = new Option<int>("--interval") { Description = "EPLB rearrangement interval (passes; async needs >= layers + 2)", DefaultValueFactory = _ => 64 };
        var kernel = new Option<string>("--kernel")
        {
            Description = "mapping (eplb_map_logical_to_physical, the EPLB epilogue of every routing kernel) or hash (DeepSeek-V4 hash " +
                          "routing around it: the same slots and load, 4-7x slower on the CPU)",
            DefaultValueFactory = _ => "mapping",
        };
        kernel.AcceptOnlyFromAmong("mapping", "hash");
        var sync = new Option<bool>("--sync") { Description = "Rearrange all layers inside one pass (a stall) instead of one layer per pass" };
        var seed = new Option<int>("--seed") { Description = "Seed of every draw (the same seed gives the same JSON)", DefaultValueFactory = _ => 1 };
        var cost = new Option<string[]>("--cost")
        {
            Description = "Override a cost-model constant, name=value (docs/cost-model.md): " + string.Join(", ", CostModel.Names),
            AllowMultipleArgumentsPerToken = true,
        };
        var plot = new Option<string?>("--plot") { Description = "Write a PNG: step time and tokens/s per pass of every run, rearrangements and phases marked" };
        var json = new Option<string?>("--json") { Description = "Write the settings and every run's figures as JSON" };
        var command = new Command("simulate",
            "Simulate expert-parallel serving of DeepSeek-V3 on the real load dumps: no EPLB, static redundancy and each policy, in tokens/s " +
            "(a cost model). Refused before anything is allocated when the estimated memory exceeds " +
            $"{MemoryShare:P0} of the memory available to the process (the estimate and the limit are in the message).")
        {
            load, ranks, nodes, slots, groups, topkGroups, decodePasses, prefillPasses, tokens, prefillTokens, requestPasses, affinity, policy,
            nodeLocal, backend, kernel, window, interval, sync, seed, cost, plot, json,
        };
        command.SetAction(parse =>
        {
            var policies = parse.GetValue(policy)!;
            var names = policies.Length == 0 || policies.Any(p => p.Equals("all", StringComparison.OrdinalIgnoreCase))
                ? PlacementPolicies.Names.Take(3).ToArray()
                : policies.Select(p => PlacementPolicies.Get(p).Name).ToArray();
            // Node-local runs: as given, or by default locality's when locality runs.
            var local = parse.GetValue(nodeLocal)!;
            var given = parse.GetResult(nodeLocal) is { Implicit: false };
            var localNames = local.Any(p => p.Equals("none", StringComparison.OrdinalIgnoreCase))
                ? []
                : local.Select(p => PlacementPolicies.Get(p).Name).Where(p => given || names.Contains(p)).ToArray();
            var model = CostModel.DeepSeekV3OnH200;
            foreach (var entry in parse.GetValue(cost) ?? [])
            {
                var parts = entry.Split('=', 2);
                if (parts.Length != 2 || !double.TryParse(parts[1], NumberStyles.Float, CultureInfo.InvariantCulture, out var value))
                    throw new ArgumentException($"--cost '{entry}' is not name=number");
                model = model.With(parts[0].Trim(), value);
            }
            var passesDecode = Positive(parse.GetValue(decodePasses), "--decode-passes");
            var passesPrefill = Positive(parse.GetValue(prefillPasses), "--prefill-passes");
            var phases = ReadPhases(parse.GetValue(load) ?? [], passesDecode, passesPrefill);
            var options = new SimulationOptions
            {
                Phases = phases,
                Ranks = Positive(parse.GetValue(ranks), "--ranks"),
                Nodes = Positive(parse.GetValue(nodes), "--nodes"),
                Slots = Positive(parse.GetValue(slots), "--slots"),
                Groups = Positive(parse.GetValue(groups), "--groups"),
                TopKGroups = Positive(parse.GetValue(topkGroups), "--topk-groups"),
                DecodeTokens = Positive(parse.GetValue(tokens), "--tokens"),
                PrefillTokens = Positive(parse.GetValue(prefillTokens), "--prefill-tokens"),
                RequestPasses = parse.GetValue(requestPasses),
                Affinity = parse.GetValue(affinity),
                Policies = names,
                NodeLocalPolicies = localNames,
                Backend = EplbRuntime.ResolveBackend(parse.GetValue(backend)),
                WindowSize = Positive(parse.GetValue(window), "--window"),
                StepInterval = Positive(parse.GetValue(interval), "--interval"),
                UseAsync = !parse.GetValue(sync),
                Kernel = parse.GetValue(kernel) == "hash" ? SimulationKernel.Hash : SimulationKernel.Mapping,
                Seed = parse.GetValue(seed),
                Cost = model,
            };
            CheckMemory(options, parse.GetValue(window));
            options.Validate();
            return Run(options, parse.GetValue(plot), parse.GetValue(json));
        });
        return command;
    }

    private static int Positive(int value, string name) =>
        value >= 1 ? value : throw new ArgumentException($"{name} must be >= 1 (got {value})");

    /// <summary>Refuses a run whose estimated memory exceeds the share of what this process may use, before anything is allocated.</summary>
    private static void CheckMemory(SimulationOptions options, int window)
    {
        var need = options.EstimateMemoryBytes();
        var available = (double)GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        var limit = available * MemoryShare;
        if (need <= limit) return;
        throw new ArgumentException(
            $"--ranks {options.Ranks} --slots {options.Slots} --window {window} --tokens {options.DecodeTokens} " +
            $"--prefill-tokens {options.PrefillTokens} --decode-passes/--prefill-passes {string.Join("/", options.Phases.Select(p => p.Passes).Distinct())}: " +
            $"the run would need about {Size(need)} (estimated from the arguments), more than the {Size(limit)} it may use " +
            $"({MemoryShare:P0} of the {Size(available)} available to this process)");
    }

    private static string Size(double bytes) => bytes >= 1L << 40 ? $"{bytes / (1L << 40):N1} TiB"
        : bytes >= 1L << 30 ? $"{bytes / (1L << 30):N1} GiB"
        : $"{bytes / (1L << 20):N1} MiB";

    /// <summary>The phases: the given dumps (or the built-in ones), MoE layers only.</summary>
    internal static IReadOnlyList<SimulationPhase> ReadPhases(IReadOnlyList<string> loads, int decodePasses, int prefillPasses)
    {
        var phases = new List<SimulationPhase>();
        foreach (var entry in loads.Count > 0 ? loads : BuiltInLoads)
        {
            var (kind, path) = entry.StartsWith("decode:", StringComparison.OrdinalIgnoreCase) ? (PhaseKind.Decode, entry["decode:".Length..])
                : entry.StartsWith("prefill:", StringComparison.OrdinalIgnoreCase) ? (PhaseKind.Prefill, entry["prefill:".Length..])
                : ((PhaseKind?)null, entry);
            var name = Path.GetFileNameWithoutExtension(path);
            ExpertLoad load;
            if (!File.Exists(path) && BuiltInLoads.Contains(path))
                load = ReadBuiltIn(path);
            else
                load = ExpertLoadFile.Read(path).Planned;
            var phase = SimulationPhase.FromName(name, load, decodePasses, prefillPasses);
            if (kind.HasValue && kind != phase.Kind)
                phase = phase with { Kind = kind.Value, Passes = kind == PhaseKind.Prefill ? prefillPasses : decodePasses };
            phases.Add(phase);
        }
        return phases;
    }

    /// <summary>A dump the tool carries as a resource (data/load-data/sglang-deepseek-v3-r1), MoE layers only.</summary>
    internal static ExpertLoad ReadBuiltIn(string name)
    {
        using var stream = Assembly.GetExecutingAssembly().GetManifestResourceStream($"loads/{name}.json")
                           ?? throw new InvalidOperationException($"the built-in load {name} is missing from the eplb assembly");
        using var memory = new MemoryStream();
        stream.CopyTo(memory);
        return ExpertLoad.Parse(memory.ToArray(), name).WithoutEmptyLayers(out _);
    }

    private static int Run(SimulationOptions options, string? plotPath, string? jsonPath)
    {
        // Every output is checked before the run and written to a temporary file; all move into
        // place only when all were written, so a failure leaves none of them (OutputFiles).
        using var outputs = OutputFiles.Prepare(("--json", jsonPath), ("--plot", plotPath));
        var clock = Stopwatch.StartNew();
        var result = RunWithProgress(new ServingSimulation(options));
        var wall = clock.Elapsed.TotalSeconds;
        Console.Out.Write(SimulationTable.Format(options, result, wall));
        if (jsonPath != null) outputs.Write(jsonPath, stream => stream.Write(Encoding.UTF8.GetBytes(Json(options, result))));
        if (plotPath != null) outputs.WriteFile(plotPath, temporary => SimulationPlot.Save(options, result, temporary));
        outputs.Commit();
        return 0;
    }

    // One bar with an ETA on stderr when it is a terminal; on a pipe, a line every few seconds.
    private static SimulationResult RunWithProgress(ServingSimulation simulation)
    {
        if (!Console.IsErrorRedirected)
        {
            var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
            SimulationResult? result = null;
            console.Progress().AutoClear(true)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(context =>
                {
                    var task = context.AddTask("simulating", autoStart: true);
                    result = simulation.Run((done, all) =>
                    {
                        task.MaxValue = all;
                        task.Value = done;
                    });
                });
            return result!;
        }
        var clock = Stopwatch.StartNew();
        var next = 5.0;
        return simulation.Run((done, all) =>
        {
            var seconds = clock.Elapsed.TotalSeconds;
            if (seconds < next || done == all) return;
            next = seconds + 5;
            var eta = seconds / done * (all - done);
            Console.Error.WriteLine($"eplb simulate: pass {done}/{all} ({(double)done / all:P0}), about {eta:F0} s left");
        });
    }

    /// <summary>The JSON document: the effective settings and one object per run (no wall time: the same seed gives the same bytes).</summary>
    internal static string Json(SimulationOptions options, SimulationResult result)
    {
        var first = options.Phases[0].Load;
        static JsonNode? Pair(SteadyAndWhole value) => new JsonObject { ["steady"] = value.Steady, ["whole"] = value.Whole };
        static JsonNode? Steps(StepPercentiles? value) => value is { } v ? new JsonObject { ["p50"] = v.P50, ["p99"] = v.P99 } : null;
        var costs = new JsonObject();
        foreach (var (name, value) in options.Cost.Values()) costs[name] = value;
        var document = new JsonObject
        {
            ["settings"] = new JsonObject
            {
                ["phases"] = new JsonArray(options.Phases.Select(p => (JsonNode)new JsonObject
                {
                    ["load"] = p.Name,
                    ["kind"] = p.Kind.ToString().ToLowerInvariant(),
                    ["passes"] = p.Passes,
                    ["prompt_tokens"] = p.Kind == PhaseKind.Prefill ? p.PromptTokens : null,
                }).ToArray()),
                ["layers"] = first.Layers,
                ["logical_experts"] = first.LogicalExperts,
                ["ranks"] = options.Ranks,
                ["nodes"] = options.Nodes,
                ["slots"] = options.Slots,
                ["no_eplb_slots"] = options.NoEplbSlots,
                ["groups"] = options.Groups,
                ["topk_groups"] = options.TopKGroups,
                ["top_k"] = options.TopK,
                ["decode_tokens_per_gpu"] = options.DecodeTokens,
                ["prefill_tokens_per_gpu"] = options.PrefillTokens,
                ["request_passes"] = options.RequestPasses,
                ["affinity"] = options.Affinity,
                ["policies"] = new JsonArray(options.Policies.Select(p => (JsonNode)p).ToArray()),
                ["node_local_policies"] = new JsonArray(options.NodeLocalPolicies.Select(p => (JsonNode)p).ToArray()),
                ["window"] = options.WindowSize,
                ["interval"] = options.StepInterval,
                ["async"] = options.UseAsync,
                ["seed"] = options.Seed,
                ["backend"] = result.Backend.ToString().ToLowerInvariant(),
                ["routing"] = "per-request draws from the loads (group limited), through the EPLB epilogue of libeplb",
                ["kernel"] = options.Kernel == SimulationKernel.Hash ? "hash" : "mapping",
                ["passes"] = result.Passes,
                ["steady_from_pass"] = result.SteadyFromPass,
                ["step_ms_over"] = "decode passes",
                ["requests_started"] = result.RequestsStarted,
                ["cost_model"] = costs,
            },
            ["runs"] = new JsonArray(result.Runs.Select(run => (JsonNode)new JsonObject
            {
                ["name"] = run.Name,
                ["slots"] = run.Slots,
                ["balancedness"] = Pair(run.Balancedness),
                ["cross_node_fraction"] = Pair(run.CrossNodeFraction),
                ["remote_nodes_per_token"] = Pair(run.RemoteNodesPerToken),
                ["tokens_per_s"] = Pair(run.TokensPerSecond),
                ["gain_vs_no_eplb"] = Pair(run.GainVsNoEplb),
                ["step_ms"] = new JsonObject { ["p50"] = run.StepMs.P50, ["p99"] = run.StepMs.P99, ["steady"] = Steps(run.SteadyStepMs) },
                ["stall_s"] = run.StallSeconds,
                ["rearrangements"] = new JsonObject
                {
                    ["completed"] = run.RearrangementsCompleted,
                    ["failed"] = run.RearrangementsFailed,
                    ["unfinished_at_end"] = run.Rearrangements.Count(r => !r.Completed),
                },
                ["slots_moved"] = run.SlotsMoved,
                ["bytes_moved_per_gpu"] = run.BytesMovedPerGpu,
                ["phases"] = new JsonArray(run.Phases.Select(phase => (JsonNode)new JsonObject
                {
                    ["load"] = phase.Phase,
                    ["balancedness"] = Pair(phase.Balancedness),
                    ["tokens_per_s"] = Pair(phase.TokensPerSecond),
                }).ToArray()),
            }).ToArray()),
        };
        return document.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }
}
