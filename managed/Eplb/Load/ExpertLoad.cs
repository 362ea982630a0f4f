using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Eplb.Load;

/// <summary>
/// Expert load <c>weight[L][N]</c>: non-negative token counts routed to each logical expert of each
/// MoE layer (docs/design.md §1). Reads and writes SGLang's expert-distribution dump
/// (<c>{"logical_count": [L][N]}</c> or <c>[T][L][N]</c>, summed over T) and plain <c>[L][N]</c> arrays.
/// </summary>
public sealed class ExpertLoad
{
    private readonly double[] _values;
    private readonly int[] _layerIds;

    /// <summary>Creates a load from row-major values <c>[layers * logicalExperts]</c>.</summary>
    /// <exception cref="ArgumentException">A value is negative, NaN or infinite, or the sizes disagree.</exception>
    public ExpertLoad(int layers, int logicalExperts, ReadOnlySpan<double> values, IReadOnlyList<int>? layerIds = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(layers);
        ArgumentOutOfRangeException.ThrowIfLessThan(logicalExperts, 1);
        if (values.Length != (long)layers * logicalExperts)
            throw new ArgumentException($"expected {layers} x {logicalExperts} = {(long)layers * logicalExperts} values, got {values.Length}", nameof(values));
        for (var i = 0; i < values.Length; i++)
        {
            var v = values[i];
            if (!double.IsFinite(v) || v < 0)
                throw new ArgumentException($"load[{i / logicalExperts}][{i % logicalExperts}] = {v.ToString(CultureInfo.InvariantCulture)}: loads must be finite and >= 0", nameof(values));
        }
        if (layerIds != null && layerIds.Count != layers)
            throw new ArgumentException($"layerIds has {layerIds.Count} entries for {layers} layers", nameof(layerIds));
        Layers = layers;
        LogicalExperts = logicalExperts;
        _values = values.ToArray();
        _layerIds = layerIds?.ToArray() ?? Enumerable.Range(0, layers).ToArray();
    }

    /// <summary>Creates a load from rows <c>[L][N]</c>.</summary>
    public static ExpertLoad FromRows(IReadOnlyList<IReadOnlyList<double>> rows)
    {
        ArgumentNullException.ThrowIfNull(rows);
        if (rows.Count == 0) throw new ArgumentException("the load has no layers", nameof(rows));
        var experts = rows[0].Count;
        var values = new double[rows.Count * experts];
        for (var l = 0; l < rows.Count; l++)
        {
            if (rows[l].Count != experts)
                throw new ArgumentException($"ragged load: layer {l} has {rows[l].Count} experts, layer 0 has {experts}", nameof(rows));
            for (var e = 0; e < experts; e++) values[l * experts + e] = rows[l][e];
        }
        return new ExpertLoad(rows.Count, experts, values);
    }

    /// <summary>L, the number of layers.</summary>
    public int Layers { get; }

    /// <summary>N, logical experts per layer.</summary>
    public int LogicalExperts { get; }

    /// <summary>The id each layer had in the source (for example 3..60 after dropping dense layers).</summary>
    public IReadOnlyList<int> LayerIds => _layerIds;

    /// <summary>The load of one expert.</summary>
    public double this[int layer, int expert] => _values[layer * LogicalExperts + expert];

    /// <summary>One layer's loads <c>[N]</c>.</summary>
    public ReadOnlySpan<double> Layer(int layer)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(layer);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(layer, Layers);
        return _values.AsSpan(layer * LogicalExperts, LogicalExperts);
    }

    /// <summary>All values, row-major <c>[L][N]</c>.</summary>
    public ReadOnlySpan<double> Values => _values;

    /// <summary>Sum of one layer's loads.</summary>
    public double LayerTotal(int layer)
    {
        var sum = 0.0;
        foreach (var v in Layer(layer)) sum += v;
        return sum;
    }

    /// <summary>
    /// The layers whose total load is positive (dense layers of a dump are all zero), and the source
    /// ids of those left out.
    /// </summary>
    public ExpertLoad WithoutEmptyLayers(out IReadOnlyList<int> dropped)
    {
        var keep = new List<int>();
        var drop = new List<int>();
        for (var l = 0; l < Layers; l++) (LayerTotal(l) > 0 ? keep : drop).Add(l);
        dropped = drop.Select(l => _layerIds[l]).ToArray();
        return Select(keep);
    }

    /// <summary>The given layers (indices into this load), in the given order, keeping their source ids.</summary>
    public ExpertLoad Select(IReadOnlyList<int> layers)
    {
        var values = new double[layers.Count * LogicalExperts];
        for (var i = 0; i < layers.Count; i++) Layer(layers[i]).CopyTo(values.AsSpan(i * LogicalExperts, LogicalExperts));
        return new ExpertLoad(layers.Count, LogicalExperts, values, layers.Select(l => _layerIds[l]).ToArray());
    }

    /// <summary>Reads a load file (see <see cref="Parse"/>).</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The content is not a load (the message names the problem).</exception>
    public static ExpertLoad Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"load file '{path}' does not exist", path);
        return Parse(File.ReadAllBytes(path), path);
    }

    /// <summary>
    /// Parses <c>{"logical_count": [L][N]}</c>, <c>{"logical_count": [T][L][N]}</c> (summed over T),
    /// or a bare <c>[L][N]</c> array.
    /// </summary>
    /// <exception cref="InvalidDataException">Malformed JSON, ragged rows, or a negative, NaN or non-numeric load.</exception>
    public static ExpertLoad Parse(ReadOnlySpan<byte> json, string source = "input")
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json.ToArray(), new JsonDocumentOptions { AllowTrailingCommas = false });
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: malformed JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            JsonElement counts;
            if (root.ValueKind == JsonValueKind.Object)
            {
                if (!root.TryGetProperty("logical_count", out counts))
                    throw new InvalidDataException($"{source}: expected a \"logical_count\" key (SGLang's expert distribution dump)");
            }
            else if (root.ValueKind == JsonValueKind.Array)
            {
                counts = root;
            }
            else
            {
                throw new InvalidDataException($"{source}: expected a JSON object or array, found {root.ValueKind}");
            }
            return FromElement(counts, source);
        }
    }

    private static ExpertLoad FromElement(JsonElement counts, string source)
    {
        if (counts.ValueKind != JsonValueKind.Array || counts.GetArrayLength() == 0)
            throw new InvalidDataException($"{source}: logical_count must be a non-empty array");
        var depth = Depth(counts);
        if (depth is not (2 or 3))
            throw new InvalidDataException($"{source}: logical_count must be [L][N] or [T][L][N] (found {depth} nested levels)");
        var slices = depth == 3 ? counts.EnumerateArray().ToList() : [counts];
        int layers = -1, experts = -1;
        double[]? sum = null;
        for (var t = 0; t < slices.Count; t++)
        {
            var slice = slices[t];
            var where = depth == 3 ? $"[{t}]" : "";
            if (slice.ValueKind != JsonValueKind.Array)
                throw new InvalidDataException($"{source}: logical_count{where} is not an array");
            var rows = slice.EnumerateArray().ToList();
            if (layers < 0)
            {
                layers = rows.Count;
                if (layers == 0) throw new InvalidDataException($"{source}: logical_count{where} has no layers");
            }
            else if (rows.Count != layers)
            {
                throw new InvalidDataException($"{source}: logical_count{where} has {rows.Count} layers, the first step has {layers}");
            }
            for (var l = 0; l < layers; l++)
            {
                var row = rows[l];
                if (row.ValueKind != JsonValueKind.Array)
                    throw new InvalidDataException($"{source}: logical_count{where}[{l}] is not an array");
                var n = row.GetArrayLength();
                if (experts < 0)
                {
                    experts = n;
                    if (experts == 0) throw new InvalidDataException($"{source}: logical_count{where}[{l}] is empty");
                    sum = new double[layers * experts];
                }
                else if (n != experts)
                {
                    throw new InvalidDataException($"{source}: ragged rows: logical_count{where}[{l}] has {n} experts, expected {experts}");
                }
                var e = 0;
                foreach (var cell in row.EnumerateArray())
                {
                    if (cell.ValueKind != JsonValueKind.Number || !cell.TryGetDouble(out var value))
                        throw new InvalidDataException($"{source}: logical_count{where}[{l}][{e}] is not a number ({cell.GetRawText()})");
                    if (!double.IsFinite(value) || value < 0)
                        throw new InvalidDataException($"{source}: logical_count{where}[{l}][{e}] = {cell.GetRawText()}: loads must be finite and >= 0");
                    sum![l * experts + e] += value;
                    e++;
                }
            }
        }
        return new ExpertLoad(layers, experts, sum!);
    }

    private static int Depth(JsonElement element)
    {
        var depth = 0;
        while (element.ValueKind == JsonValueKind.Array && element.GetArrayLength() > 0)
        {
            depth++;
            element = element[0];
        }
        return element.ValueKind == JsonValueKind.Array ? depth + 1 : depth;
    }

    /// <summary>Writes SGLang's dump format, <c>{"logical_count": [L][N]}</c>.</summary>
    public string ToSglangJson()
    {
        var text = new StringBuilder("{\"logical_count\": [");
        for (var l = 0; l < Layers; l++)
        {
            if (l > 0) text.Append(", ");
            text.Append('[');
            var row = Layer(l);
            for (var e = 0; e < LogicalExperts; e++)
            {
                if (e > 0) text.Append(", ");
                text.Append(row[e].ToString("R", CultureInfo.InvariantCulture));
            }
            text.Append(']');
        }
        return text.Append("]}").ToString();
    }
}
