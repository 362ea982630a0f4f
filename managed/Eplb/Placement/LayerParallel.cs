namespace Eplb.Placement;

/// <summary>Runs independent per-layer work across threads, with one workspace per thread.</summary>
internal static class LayerParallel
{
    /// <summary>
    /// Calls <paramref name="body"/> for every layer. Layers share nothing but their workspace, which
    /// each thread creates once, so the results are the same for any degree of parallelism.
    /// </summary>
    public static void For<TWorkspace>(int layers, int maxDegreeOfParallelism, Func<TWorkspace> workspace, Action<int, TWorkspace> body)
    {
        var degree = maxDegreeOfParallelism > 0 ? maxDegreeOfParallelism : Environment.ProcessorCount;
        if (degree == 1 || layers < 2)
        {
            var single = workspace();
            for (var l = 0; l < layers; l++) body(l, single);
            return;
        }
        var options = new ParallelOptions { MaxDegreeOfParallelism = degree };
        try
        {
            Parallel.For(0, layers, options, workspace, (l, _, ws) =>
            {
                body(l, ws);
                return ws;
            }, static _ => { });
        }
        catch (AggregateException e) when (e.InnerExceptions.Count == 1)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
            throw;
        }
    }
}
