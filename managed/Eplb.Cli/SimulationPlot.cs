using Eplb.Simulation;
using ScottPlot;

namespace Eplb.Cli;

/// <summary>
/// The --plot figure: per pass, the model step time (the slowest GPU of each layer, summed) of every
/// run with y from 0, rearrangements marked under the curves (one strip per EPLB run, from the pass of
/// its first committed layer to its last) and phase changes as dashed lines; below it, tokens/s per pass.
/// </summary>
internal static class SimulationPlot
{
    public static void Save(SimulationOptions options, SimulationResult result, string path)
    {
        var multiplot = new Multiplot();
        multiplot.AddPlots(2);
        var steps = multiplot.GetPlot(0);
        var throughput = multiplot.GetPlot(1);
        var passes = Enumerable.Range(0, (int)result.Passes).Select(p => (double)p).ToArray();
        var maxMs = result.Runs.Max(r => r.StepSeconds.Max()) * 1000;
        var maxK = result.Runs.Max(r => r.TokensPerPass.Zip(r.StepSeconds, (t, s) => t / s).Max()) / 1000;
        var strip = 0;
        foreach (var run in result.Runs)
        {
            var line = steps.Add.Scatter(passes, run.StepSeconds.Select(s => s * 1000).ToArray());
            line.LegendText = run.Name;
            line.MarkerSize = 0;
            var rate = throughput.Add.Scatter(passes, run.TokensPerPass.Zip(run.StepSeconds, (t, s) => t / s / 1000).ToArray());
            rate.LegendText = run.Name;
            rate.MarkerSize = 0;
            rate.Color = line.Color;
            if (run.Policy is null) continue;
            // One strip per EPLB run just above 0: where its rearrangements committed layers.
            var y = maxMs * (0.015 + 0.02 * strip++);
            foreach (var rearrangement in run.Rearrangements)
            {
                var mark = steps.Add.Line(rearrangement.FirstPass, y, rearrangement.LastPass + 0.9, y);
                mark.Color = line.Color;
                mark.LineWidth = 4;
            }
        }
        for (var i = 0; i < result.PhaseStarts.Count; i++)
        {
            foreach (var plot in new[] { steps, throughput })
            {
                var change = plot.Add.VerticalLine(result.PhaseStarts[i]);
                change.LinePattern = LinePattern.Dashed;
                change.Color = Colors.Gray;
                change.Text = options.Phases[i].Name;
            }
        }
        steps.Title("Step time per pass (cost model); bars near 0: rearrangements of each EPLB run");
        steps.XLabel("pass");
        steps.YLabel("ms (slowest GPU per layer, summed)");
        steps.Axes.SetLimitsY(0, maxMs * 1.08);
        steps.ShowLegend(Alignment.UpperRight);
        throughput.Title("Tokens per second over all GPUs, per pass (cost model)");
        throughput.XLabel("pass");
        throughput.YLabel("thousand tokens/s");
        throughput.Axes.SetLimitsY(0, maxK * 1.08);
        throughput.ShowLegend(Alignment.UpperRight);
        multiplot.SavePng(path, 1400, 1000);
    }
}
