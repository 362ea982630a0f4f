using Eplb.Simulation;
using ScottPlot;

namespace Eplb.Cli;

/// <summary>The --plot figure: per-rank load without and with EPLB, and balancedness pass by pass.</summary>
internal static class SimulationPlot
{
    public static void Save(SimulationResult result, string path)
    {
        var multiplot = new Multiplot();
        multiplot.AddPlots(2);
        var loads = multiplot.GetPlot(0);
        var ranks = Enumerable.Range(0, result.NoEplb.RankLoad.Length).Select(g => (double)g).ToArray();
        foreach (var run in result.Runs)
        {
            var line = loads.Add.Scatter(ranks, run.RankLoad);
            line.LegendText = run.Name == "no EPLB" ? "no EPLB" : $"{run.Name} (after its first rearrangement)";
        }
        loads.Title("Tokens routed to each rank per pass (mean over layers)");
        loads.XLabel("rank");
        loads.YLabel("tokens per pass");
        loads.ShowLegend(Alignment.UpperRight);

        var timeline = multiplot.GetPlot(1);
        foreach (var run in result.Runs)
        {
            var signal = timeline.Add.Signal(Smooth(run.BalancednessPerStep, 8));
            signal.LegendText = run.Name;
        }
        timeline.Title("Balancedness per pass (moving mean of 8)");
        timeline.XLabel("pass");
        timeline.YLabel("mean / max rank load");
        timeline.Axes.SetLimitsY(0, 1);
        timeline.ShowLegend(Alignment.LowerRight);
        multiplot.SavePng(path, 1200, 1000);
    }

    private static double[] Smooth(double[] values, int window)
    {
        var smoothed = new double[values.Length];
        double sum = 0;
        for (var i = 0; i < values.Length; i++)
        {
            sum += values[i];
            if (i >= window) sum -= values[i - window];
            smoothed[i] = sum / Math.Min(i + 1, window);
        }
        return smoothed;
    }
}
