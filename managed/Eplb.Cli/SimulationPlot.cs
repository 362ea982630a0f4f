using Eplb.Simulation;
using ScottPlot;

namespace Eplb.Cli;

/// <summary>
/// The --plot figure: per pass, the model step time (the slowest GPU of each layer, summed) of every
/// run with y from 0 and, below it, tokens/s per pass with each EPLB run's rearrangements marked near 0
/// (one strip per run, from the pass of its first committed layer to its last); phase changes are
/// dashed lines in both.
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
        var palette = new ScottPlot.Palettes.Category10();
        var strip = 0;
        for (var i = 0; i < result.Runs.Count; i++)
        {
            var run = result.Runs[i];
            var color = palette.GetColor(i);
            var line = steps.Add.Scatter(passes, run.StepSeconds.Select(s => s * 1000).ToArray());
            line.LegendText = run.Name;
            line.MarkerSize = 0;
            line.Color = color;
            var rate = throughput.Add.Scatter(passes, run.TokensPerPass.Zip(run.StepSeconds, (t, s) => t / s / 1000).ToArray());
            rate.LegendText = run.Name;
            rate.MarkerSize = 0;
            rate.Color = color;
            if (run.Policy is null) continue;
            // One strip per EPLB run near the bottom of the tokens/s panel: the passes its rearrangements committed layers in.
            var y = maxK * (0.02 + 0.025 * strip++);
            foreach (var rearrangement in run.Rearrangements)
            {
                var mark = throughput.Add.Line(rearrangement.FirstPass, y, rearrangement.LastPass + 0.9, y);
                mark.Color = color;
                mark.LineWidth = 3;
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
        steps.Title("Step time per pass: the slowest GPU of each layer, summed (cost model)");
        steps.XLabel("pass");
        steps.YLabel("ms");
        steps.Axes.SetLimitsY(0, maxMs * 1.08);
        steps.ShowLegend(Alignment.UpperRight);
        throughput.Title("Tokens per second over all GPUs, per pass (cost model); bars near 0: each EPLB run's rearrangements");
        throughput.XLabel("pass");
        throughput.YLabel("thousand tokens/s");
        throughput.Axes.SetLimitsY(0, maxK * 1.08);
        throughput.ShowLegend(Alignment.UpperRight);
        multiplot.SavePng(path, 1400, 1000);
    }
}
