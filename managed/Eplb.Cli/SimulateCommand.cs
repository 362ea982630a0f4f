using System.CommandLine;
using System.Text.Json;
using Eplb.Simulation;
using Spectre.Console;

namespace Eplb.Cli;

/// <summary><c>eplb simulate</c>: the expert-parallel serving simulation on the real load files.</summary>
internal static class SimulateCommand
{
    public static Command Create()
    {
        var load = new Option<string[]>("--load") { Description = "Load dump(s) to draw routing from (default: the SGLang DeepSeek-V3 files in data/load-data)", AllowMultipleArgumentsPerToken = true };
        var gpus = new Option<int>("--gpus") { Description = "Expert-parallel ranks", DefaultValueFactory = _ => 32 };
        var replicas = new Option<int>("--replicas") { Description = "Physical slots per layer (N + redundant)", DefaultValueFactory = _ => 288 };
        var steps = new Option<int>("--steps") { Description = "Forward passes to simulate", DefaultValueFactory = _ => 64 };
        var tokens = new Option<int>("--tokens") { Description = "Tokens per forward pass", DefaultValueFactory = _ => 2048 };
        var backend = new Option<string>("--backend") { Description = "cpu, cuda or auto", DefaultValueFactory = _ => "auto" };
        var seed = new Option<int>("--seed") { Description = "Seed of the routing sampler", DefaultValueFactory = _ => 1 };
        var json = new Option<string?>("--json") { Description = "Write the final table as JSON to this file" };
        var command = new Command("simulate", "Simulate expert-parallel serving on the real load files and report balancedness")
        {
            load, gpus, replicas, steps, tokens, backend, seed, json,
        };
        command.SetAction(parse => Run(parse.GetValue(load), parse.GetValue(gpus), parse.GetValue(replicas), parse.GetValue(steps),
            parse.GetValue(tokens), parse.GetValue(backend)!, parse.GetValue(seed), parse.GetValue(json)));
        return command;
    }

    private static int Run(string[]? loadFiles, int gpus, int replicas, int steps, int tokens, string backendName, int seed, string? jsonPath)
    {
        if (gpus < 1) throw new ArgumentException($"--gpus must be >= 1 (got {gpus})");
        if (steps < 1) throw new ArgumentException($"--steps must be >= 1 (got {steps})");
        if (tokens < 1) throw new ArgumentException($"--tokens must be >= 1 (got {tokens})");
        var backend = EplbRuntime.ResolveBackend(backendName);
        var files = loadFiles is { Length: > 0 } ? loadFiles : DefaultLoadFiles();
        var loads = files.Select(f => ExpertLoad.Read(f).WithoutEmptyLayers(out _)).ToList();
        var options = new SimulationOptions { Loads = loads, Gpus = gpus, Replicas = replicas, Steps = steps, Tokens = tokens, Backend = backend, Seed = seed };
        var simulation = new ServingSimulation(options);

        SimulationResult? result = null;
        AnsiConsole.Progress().AutoClear(true).Start(context =>
        {
            var task = context.AddTask($"simulating {steps} steps on {backend.ToString().ToLowerInvariant()}", maxValue: steps);
            result = simulation.Run(done => task.Value = done);
        });

        var table = new Table().AddColumns("", "balancedness").AddRow("no EPLB", $"{result!.Balancedness:F3}");
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine($"backend [bold]{backend.ToString().ToLowerInvariant()}[/], {steps} steps, {result.SecondsPerStep * 1000:F1} ms/step, " +
                               $"{loads.Count} load files, {loads[0].Layers} layers x {loads[0].Experts} experts, R = {replicas}, G = {gpus}");
        if (jsonPath != null)
        {
            var document = new
            {
                backend = backend.ToString().ToLowerInvariant(),
                steps,
                seconds_per_step = result.SecondsPerStep,
                no_eplb = new { balancedness = result.Balancedness },
            };
            File.WriteAllText(jsonPath, JsonSerializer.Serialize(document, new JsonSerializerOptions { WriteIndented = true }));
        }
        return 0;
    }

    private static string[] DefaultLoadFiles()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            var data = Path.Combine(dir.FullName, "data", "load-data", "sglang-deepseek-v3-r1");
            if (Directory.Exists(data)) return Directory.GetFiles(data, "*.json").Order().ToArray();
        }
        throw new ArgumentException("no --load given and data/load-data was not found above the eplb binary");
    }
}
