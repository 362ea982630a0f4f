using Eplb.Load;

namespace Eplb.Balancing;

/// <summary>
/// Records which logical experts the tokens chose, per MoE layer, for offline planning: every
/// layer's forward runs inside <c>using (recorder.CurrentLayer(i)) { ... }</c>, so counts can never be
/// attributed to a missing or wrong layer (SGLang's DeepSeek-V4 fix: without the scope the layer
/// index was None, which crashed prefill and skewed decode statistics). Dumps SGLang's format,
/// <c>{"logical_count": [L][N]}</c>, which <c>eplb plan</c> and SGLang's --init-expert-location read.
/// </summary>
public sealed class ExpertDistributionRecorder
{
    [ThreadStatic] private static Scope? t_current;
    private readonly long[] _counts;

    /// <summary>A recorder for <paramref name="layers"/> layers of <paramref name="logicalExperts"/> logical experts.</summary>
    public ExpertDistributionRecorder(int layers, int logicalExperts)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(layers);
        ArgumentOutOfRangeException.ThrowIfLessThan(logicalExperts, 1);
        Layers = layers;
        LogicalExperts = logicalExperts;
        _counts = new long[(long)layers * logicalExperts];
    }

    /// <summary>L.</summary>
    public int Layers { get; }

    /// <summary>N.</summary>
    public int LogicalExperts { get; }

    /// <summary>Tokens recorded for one expert (64-bit).</summary>
    public long this[int layer, int expert] => _counts[(long)layer * LogicalExperts + expert];

    /// <summary>The layer of the innermost open scope on this thread, or null.</summary>
    public int? CurrentLayerIndex => t_current is { } scope && scope.Recorder == this ? scope.Layer : null;

    /// <summary>Opens the scope of one layer's forward pass on this thread; dispose it when the layer is done.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The layer is outside [0, L).</exception>
    /// <exception cref="InvalidOperationException">Another layer's scope is still open on this thread.</exception>
    public Scope CurrentLayer(int layer)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(layer);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(layer, Layers);
        if (t_current is { } open && open.Recorder == this)
            throw new InvalidOperationException($"layer {open.Layer}'s recording scope is still open; close it before entering layer {layer}");
        var scope = new Scope(this, layer, t_current);
        t_current = scope;
        return scope;
    }

    /// <summary>
    /// Counts the logical ids a router selected (<c>[T][K]</c>, any shape) for the current layer; ids
    /// outside <c>[0, N)</c> (padding, -1) are skipped.
    /// </summary>
    /// <exception cref="InvalidOperationException">No layer scope is open on this thread.</exception>
    public void OnSelectExperts(ReadOnlySpan<int> logicalIds)
    {
        var layer = CurrentLayerIndex ?? throw new InvalidOperationException(
            "no current layer: wrap each MoE layer's forward in `using (recorder.CurrentLayer(i))` so counts land on the right layer");
        var row = _counts.AsSpan((int)((long)layer * LogicalExperts), LogicalExperts);
        foreach (var id in logicalIds)
            if ((uint)id < (uint)LogicalExperts) row[id]++;
    }

    /// <summary>Adds a layer's logical counts directly (e.g. the EPLB window folded to logical experts).</summary>
    public void Add(int layer, ReadOnlySpan<long> logicalCounts)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(layer);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(layer, Layers);
        if (logicalCounts.Length != LogicalExperts) throw new ArgumentException($"{logicalCounts.Length} counts for {LogicalExperts} experts", nameof(logicalCounts));
        var row = _counts.AsSpan((int)((long)layer * LogicalExperts), LogicalExperts);
        for (var e = 0; e < LogicalExperts; e++) row[e] += logicalCounts[e];
    }

    /// <summary>Forgets every count.</summary>
    public void Reset() => Array.Clear(_counts);

    /// <summary>The counts as an <see cref="ExpertLoad"/>.</summary>
    public ExpertLoad ToLoad() => new(Layers, LogicalExperts, _counts.Select(c => (double)c).ToArray());

    /// <summary>Writes SGLang's dump format to <paramref name="path"/>.</summary>
    public void Dump(string path) => File.WriteAllText(path, ToLoad().ToSglangJson());

    /// <summary>Reads a dump back into a recorder (counts rounded to integers).</summary>
    public static ExpertDistributionRecorder Load(string path)
    {
        var load = ExpertLoad.Read(path);
        var recorder = new ExpertDistributionRecorder(load.Layers, load.LogicalExperts);
        for (var l = 0; l < load.Layers; l++)
            for (var e = 0; e < load.LogicalExperts; e++)
                recorder._counts[(long)l * load.LogicalExperts + e] = (long)Math.Round(load[l, e]);
        return recorder;
    }

    /// <summary>An open layer scope; disposing it restores the enclosing one.</summary>
    public sealed class Scope : IDisposable
    {
        private readonly Scope? _previous;
        private bool _disposed;

        internal Scope(ExpertDistributionRecorder recorder, int layer, Scope? previous)
        {
            Recorder = recorder;
            Layer = layer;
            _previous = previous;
        }

        internal ExpertDistributionRecorder Recorder { get; }

        /// <summary>The layer this scope records into.</summary>
        public int Layer { get; }

        /// <summary>Closes the scope.</summary>
        public void Dispose()
        {
            if (_disposed) return;
            _disposed = true;
            if (t_current == this) t_current = _previous;
        }
    }
}
