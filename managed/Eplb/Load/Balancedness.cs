namespace Eplb.Load;

/// <summary>
/// Balancedness (docs/design.md §1), the one figure every log, test and benchmark uses. Per layer: the mean
/// over ranks of the rank loads divided by their maximum. Over layers: the sum of the layers' means
/// divided by the sum of their maxima (the token-weighted form vLLM logs, reduced over ranks). 0
/// when every maximum is 0; 1 is the ideal. Accumulate layers with <see cref="Add(ReadOnlySpan{double})"/>
/// and read <see cref="Value"/>, or use the static forms.
/// </summary>
public struct Balancedness
{
    /// <summary>Σ over the added layers of the mean rank load.</summary>
    public double SumOfMeans { get; private set; }

    /// <summary>Σ over the added layers of the largest rank load.</summary>
    public double SumOfMaxima { get; private set; }

    /// <summary>The aggregate balancedness of the layers added so far.</summary>
    public readonly double Value => SumOfMaxima > 0 ? SumOfMeans / SumOfMaxima : 0;

    /// <summary>Adds one layer's rank loads (an empty layer adds nothing).</summary>
    public void Add(ReadOnlySpan<double> rankLoads)
    {
        if (rankLoads.IsEmpty) return;
        var (mean, max) = MeanAndMax(rankLoads);
        SumOfMeans += mean;
        SumOfMaxima += max;
    }

    /// <summary>Adds the sums of another accumulation (for example a pass's layers to a run).</summary>
    public void Add(Balancedness other)
    {
        SumOfMeans += other.SumOfMeans;
        SumOfMaxima += other.SumOfMaxima;
    }

    /// <summary>The mean and the largest of one layer's rank loads (loads are non-negative).</summary>
    public static (double Mean, double Max) MeanAndMax(ReadOnlySpan<double> rankLoads)
    {
        double sum = 0, max = 0;
        foreach (var load in rankLoads)
        {
            sum += load;
            max = Math.Max(max, load);
        }
        return (sum / rankLoads.Length, max);
    }

    /// <summary>One layer's balancedness: mean / max of its rank loads (0 when the max is 0).</summary>
    public static double OfLayer(ReadOnlySpan<double> rankLoads)
    {
        var (mean, max) = MeanAndMax(rankLoads);
        return max > 0 ? mean / max : 0;
    }

    /// <summary>The aggregate balancedness of rank loads <c>[L][G]</c>.</summary>
    public static double Of(IEnumerable<IReadOnlyList<double>> rankLoads)
    {
        ArgumentNullException.ThrowIfNull(rankLoads);
        var result = new Balancedness();
        foreach (var layer in rankLoads) result.Add(layer as double[] ?? layer.ToArray());
        return result.Value;
    }
}
