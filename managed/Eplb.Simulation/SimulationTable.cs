using System.Globalization;
using System.Text;

namespace Eplb.Simulation;

/// <summary>The text table of <c>eplb simulate</c>: one row per run, at most 80 columns wide.</summary>
public static class SimulationTable
{
    /// <summary>The widest line the table writes.</summary>
    public const int Width = 80;

    /// <summary>The report: what ran, one row per run, what the columns mean, and the wall time.</summary>
    public static string Format(SimulationOptions options, SimulationResult result, double wallSeconds)
    {
        var text = new StringBuilder();
        var first = options.Phases[0].Load;
        var groups = options.TopKGroups < options.Groups ? $" in {options.TopKGroups} of {options.Groups} groups" : "";
        Wrap(text, $"eplb simulate: {first.Layers} MoE layers x {first.LogicalExperts} experts, top-{options.TopK}{groups}, " +
                   $"{options.Ranks} GPUs in {options.Nodes} nodes, R = {options.Slots} slots (no EPLB: {options.NoEplbSlots}" +
                   (options.NoEplbSlots != first.LogicalExperts
                       ? $", as N = {first.LogicalExperts} does not split over {options.Ranks} GPUs: its extra slots duplicate experts 0-{options.NoEplbSlots - first.LogicalExperts - 1}"
                       : "") + ")");
        Wrap(text, "phases: " + string.Join(" -> ", options.Phases.Select(p =>
            $"{p.Name} ({p.Kind.ToString().ToLowerInvariant()}, {(p.Kind == PhaseKind.Decode ? options.DecodeTokens : options.PrefillTokens)} tokens/GPU, {p.Passes} passes)")));
        Wrap(text, result.SteadyFromPass is { } steady
            ? $"steady state: passes {steady}-{result.Passes - 1}, after every policy's first rearrangement"
            : "steady state: none (no policy completed a rearrangement); steady columns show the whole run");
        text.AppendLine();

        string[] head1 = ["", "balanced", "k tok/s", "gain", "cross", "rem.", "decode ms", "stall", "re-", "moved"];
        string[] head2 = ["run", "st./all", "st./all", "steady", "node", "nodes", "p50/p99", "s/rea", "arr", "GB/GPU"];
        var rows = result.Runs.Select(run => new[]
        {
            run.Name,
            $"{F(run.Balancedness.Steady ?? run.Balancedness.Whole, "0.00")}/{F(run.Balancedness.Whole, "0.00")}",
            $"{Kilo(run.TokensPerSecond.Steady ?? run.TokensPerSecond.Whole)}/{Kilo(run.TokensPerSecond.Whole)}",
            run.Policy is null && run == result.NoEplb ? "-" : Percent(run.GainVsNoEplb.Steady ?? run.GainVsNoEplb.Whole, signed: true),
            Percent(run.CrossNodeFraction.Steady ?? run.CrossNodeFraction.Whole, signed: false),
            F(run.RemoteNodesPerToken.Steady ?? run.RemoteNodesPerToken.Whole, "0.00"),
            $"{F((run.SteadyStepMs ?? run.StepMs).P50, "0.0")}/{F((run.SteadyStepMs ?? run.StepMs).P99, "0.0")}",
            run.Policy is null ? "-" : F(run.StallSeconds, "0.00"),
            run.Policy is null ? "-" : run.RearrangementsCompleted.ToString(CultureInfo.InvariantCulture) + (run.RearrangementsFailed > 0 ? "!" : ""),
            run.Policy is null ? "-" : F(run.BytesMovedPerGpu / 1e9, "0.0"),
        }).ToList();
        var widths = Enumerable.Range(0, head1.Length).Select(c => rows.Select(r => r[c].Length).Append(head1[c].Length).Append(head2[c].Length).Max()).ToArray();
        void Row(string[] cells)
        {
            var line = new StringBuilder();
            for (var c = 0; c < cells.Length; c++)
            {
                if (c > 0) line.Append(' ');
                line.Append(c == 0 ? cells[c].PadRight(widths[c]) : cells[c].PadLeft(widths[c]));
            }
            text.AppendLine(line.ToString().TrimEnd());
        }
        Row(head1);
        Row(head2);
        foreach (var row in rows) Row(row);
        text.AppendLine();
        var unfinished = result.Runs.SelectMany(run => run.Rearrangements.Where(r => !r.Completed).Select(r => (run.Name, r.Layers))).ToList();
        if (unfinished.Count > 0)
            Wrap(text, "still rearranging at the end, left out of stall, re-arr and moved: " +
                       string.Join(", ", unfinished.Select(u => $"{u.Name} ({u.Layers} layers committed)")) + ".");
        Wrap(text, "balanced: mean/max of the GPUs' routed (token, expert) pairs per layer (1 is perfect); st./all: steady " +
                   "state / whole run; k tok/s: thousand " +
                   "tokens per second over all GPUs and gain over no EPLB, from the cost model (DeepSeek-V3 FP8 on H200, " +
                   "docs/cost-model.md); steady: after every policy's first rearrangement; cross node: pairs served on " +
                   "another node than the token's GPU; rem. nodes: other nodes a token reaches; decode ms: decode step time; stall: " +
                   "seconds each rearrangement cost (sync: a stall; async: its staging traffic); re-arr: completed rearrangements; " +
                   "moved: expert weights received per GPU. Model figures, not measurements.");
        Wrap(text, $"{result.Backend.ToString().ToLowerInvariant()} backend, seed {options.Seed}, {(options.UseAsync ? "async" : "sync")} EPLB " +
                   $"(window {options.WindowSize}, interval {options.StepInterval}), affinity {F(options.Affinity, "0.##")}, requests live " +
                   $"{F(options.RequestPasses, "0.#")} passes on average; {result.Passes} passes in {F(wallSeconds, "0.0")} s.");
        return text.ToString();
    }

    private static string F(double value, string format) => value.ToString(format, CultureInfo.InvariantCulture);

    private static string Kilo(double tokensPerSecond) => (tokensPerSecond / 1000) switch
    {
        >= 1000 => F(tokensPerSecond / 1000, "0"),
        >= 100 => F(tokensPerSecond / 1000, "0"),
        var k => F(k, "0.0"),
    };

    private static string Percent(double fraction, bool signed) =>
        (signed && fraction >= 0 ? "+" : "") + F(fraction * 100, Math.Abs(fraction) >= 0.995 ? "0" : "0.0") + "%";

    // Words filled into lines of at most Width columns.
    private static void Wrap(StringBuilder text, string words)
    {
        var line = new StringBuilder();
        foreach (var word in words.Split(' ', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.Length > 0 && line.Length + 1 + word.Length > Width)
            {
                text.AppendLine(line.ToString());
                line.Clear();
            }
            if (line.Length > 0) line.Append(' ');
            line.Append(word);
        }
        if (line.Length > 0) text.AppendLine(line.ToString());
    }
}
