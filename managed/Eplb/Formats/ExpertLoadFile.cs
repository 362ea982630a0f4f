using System.Globalization;
using System.Text.Json;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>The expert-load file formats <see cref="ExpertLoadFile"/> reads.</summary>
public enum ExpertLoadFormat
{
    /// <summary>SGLang's recorder dump in <c>stat</c> or <c>stat_approx</c> mode (a <c>torch.save</c> archive with <c>logical_count</c>).</summary>
    SglangRecorderStat,

    /// <summary>SGLang's per-rank recorder dump in <c>per_pass</c> or <c>per_token</c> mode (physical counts per pass, folded to logical).</summary>
    SglangRecorderPerPass,

    /// <summary>JSON <c>{"logical_count": [L][N]}</c> or <c>[T][L][N]</c> (summed over T), as SGLang's <c>--init-expert-location</c> takes it.</summary>
    JsonLogicalCount,

    /// <summary>A bare JSON <c>[L][N]</c> array.</summary>
    JsonArray,
}

/// <summary>Options of <see cref="ExpertLoadFile.Read(IReadOnlyList{string}, ExpertLoadReadOptions?)"/>.</summary>
public sealed record ExpertLoadReadOptions
{
    /// <summary>
    /// The model's layer count (<c>num_hidden_layers</c>, 61 for DeepSeek-V3); 0 takes the file's rows,
    /// which SGLang's dumps always have one of per model layer. A file with fewer rows holds the last
    /// layers (dense layers come first, as DeepSeek's <c>first_k_dense_replace</c>); the rest are zero.
    /// </summary>
    public int ModelLayers { get; init; }

    /// <summary>Size limits for <c>torch.save</c> archives; <see cref="TorchArchiveLimits.Default"/> when null.</summary>
    public TorchArchiveLimits? Limits { get; init; }
}

/// <summary>One file that went into an <see cref="ExpertLoadFile"/>.</summary>
/// <param name="Path">The file.</param>
/// <param name="Format">What it was read as.</param>
/// <param name="Description">The format and what was summed or folded, for people.</param>
public sealed record ExpertLoadSource(string Path, ExpertLoadFormat Format, string Description);

/// <summary>
/// An expert load read from the files of other systems (docs/design.md §8): SGLang's recorder dumps
/// (<c>torch.save</c> archives) and the JSON forms, told apart by their first bytes. The load has one
/// row per model layer, each keeping its model layer id; layers whose load is zero (dense layers)
/// are reported as unplanned, never dropped from the numbering.
/// </summary>
public sealed class ExpertLoadFile
{
    private const long MaxJsonBytes = 1L << 30;

    private ExpertLoadFile(ExpertLoad load, IReadOnlyList<ExpertLoadSource> sources, int paddedLayers)
    {
        Load = load;
        Sources = sources;
        PaddedLayers = paddedLayers;
        Planned = load.WithoutEmptyLayers(out var unplanned);
        UnplannedLayerIds = unplanned;
    }

    /// <summary>The load, <c>[model layers][N]</c>; <see cref="ExpertLoad.LayerIds"/> are the model layer ids 0..M-1.</summary>
    public ExpertLoad Load { get; }

    /// <summary>The layers with load, keeping their model layer ids (what a policy plans).</summary>
    public ExpertLoad Planned { get; }

    /// <summary>M, the model's layer count: the rows a placement for SGLang must have.</summary>
    public int ModelLayers => Load.Layers;

    /// <summary>Model layer ids of the layers with load.</summary>
    public IReadOnlyList<int> PlannedLayerIds => Planned.LayerIds;

    /// <summary>Model layer ids of the layers without load (dense layers), which keep SGLang's trivial row.</summary>
    public IReadOnlyList<int> UnplannedLayerIds { get; }

    /// <summary>Zero rows added in front because the files had fewer rows than <see cref="ExpertLoadReadOptions.ModelLayers"/>.</summary>
    public int PaddedLayers { get; }

    /// <summary>The files read, in order, with the format of each.</summary>
    public IReadOnlyList<ExpertLoadSource> Sources { get; }

    /// <summary>Reads one load file (see <see cref="Read(IReadOnlyList{string}, ExpertLoadReadOptions?)"/>).</summary>
    public static ExpertLoadFile Read(string path, ExpertLoadReadOptions? options = null) => Read([path], options);

    /// <summary>
    /// Reads load files and sums them (SGLang's <c>per_pass</c> recorder writes one file per rank):
    /// a <c>torch.save</c> archive (zip) is read as SGLang's recorder dump, anything starting with
    /// <c>{</c> or <c>[</c> as JSON.
    /// </summary>
    /// <exception cref="FileNotFoundException">A file does not exist.</exception>
    /// <exception cref="InvalidDataException">A file is not a load, or the files disagree in shape; the message names the file and what was wrong.</exception>
    /// <exception cref="ArgumentException">No paths, or a negative model layer count.</exception>
    public static ExpertLoadFile Read(IReadOnlyList<string> paths, ExpertLoadReadOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(paths);
        if (paths.Count == 0) throw new ArgumentException("no load file given", nameof(paths));
        options ??= new ExpertLoadReadOptions();
        if (options.ModelLayers < 0) throw new ArgumentException($"the model layer count must be >= 0 (got {options.ModelLayers})", nameof(options));
        var sources = new List<ExpertLoadSource>();
        double[]? sum = null;
        int layers = 0, experts = 0, padded = 0;
        foreach (var path in paths)
        {
            var (load, format, details) = ReadOne(path, options);
            var (model, added) = ToModelLayers(load, options.ModelLayers, path);
            if (sum == null)
            {
                (layers, experts, padded) = (model.Layers, model.LogicalExperts, added);
                sum = new double[layers * experts];
            }
            else if (model.Layers != layers || model.LogicalExperts != experts)
            {
                throw new InvalidDataException($"{path}: {model.Layers} layers x {model.LogicalExperts} experts, but {paths[0]} has {layers} x {experts}");
            }
            var values = model.Values;
            for (var i = 0; i < sum.Length; i++) sum[i] += values[i];
            var description = FormatName(format) + (details.Length > 0 ? ": " + details : "");
            if (added > 0) description += $"; its {load.Layers} rows are layers {added}..{model.Layers - 1} of {model.Layers}";
            sources.Add(new ExpertLoadSource(path, format, description));
        }
        return new ExpertLoadFile(new ExpertLoad(layers, experts, sum!), sources, padded);
    }

    /// <summary>A short name of a format, for people.</summary>
    public static string FormatName(ExpertLoadFormat format) => format switch
    {
        ExpertLoadFormat.SglangRecorderStat => "SGLang recorder dump, stat/stat_approx mode (torch.save archive)",
        ExpertLoadFormat.SglangRecorderPerPass => "SGLang recorder dump, per_pass/per_token mode (torch.save archive)",
        ExpertLoadFormat.JsonLogicalCount => "JSON {\"logical_count\": ...}",
        ExpertLoadFormat.JsonArray => "JSON [L][N] array",
        _ => throw new ArgumentOutOfRangeException(nameof(format)),
    };

    private static (ExpertLoad, ExpertLoadFormat, string) ReadOne(string path, ExpertLoadReadOptions options)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"load file '{path}' does not exist", path);
        var head = new byte[8];
        int length;
        using (var stream = File.OpenRead(path)) length = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        var kind = Sniff(head.AsSpan(0, length), path);
        if (kind == FileKind.Zip)
        {
            using var archive = TorchArchive.Open(path, options.Limits);
            try
            {
                return SglangRecorderDump.Read(archive.Root);
            }
            catch (InvalidDataException e) when (!e.Message.StartsWith(path, StringComparison.Ordinal))
            {
                // Storage records are read here, lazily; their errors already name the file.
                throw new InvalidDataException($"{path}: {e.Message}", e);
            }
        }
        if (new FileInfo(path).Length > MaxJsonBytes) throw new InvalidDataException($"{path}: a JSON load of more than {MaxJsonBytes} bytes");
        var json = File.ReadAllBytes(path);
        var (format, details) = DescribeJson(json, path);
        return (ExpertLoad.Parse(json, path), format, details);
    }

    internal enum FileKind { Zip, Json }

    /// <summary>Tells a <c>torch.save</c> archive from JSON by the first bytes, naming what else it might be.</summary>
    internal static FileKind Sniff(ReadOnlySpan<byte> head, string path)
    {
        if (head.Length == 0) throw new InvalidDataException($"{path}: the file is empty");
        if (TorchArchive.IsZip(head)) return FileKind.Zip;
        var text = head.StartsWith("\uFEFF"u8) ? head[3..] : head;
        text = text.TrimStart(" \t\r\n"u8);
        if (text.Length == 0 || text[0] is (byte)'{' or (byte)'[') return FileKind.Json;
        // torch.save before PyTorch 1.6 (or with _use_new_zipfile_serialization=False) starts with a pickled magic number.
        if (head.Length >= 2 && head[0] == 0x80 && head[1] <= PickleGuard.HighestProtocol)
            throw new InvalidDataException($"{path}: a legacy (pre-zip) torch.save file or a bare pickle; only torch.save's zip archives (PyTorch >= 1.6) are read");
        throw new InvalidDataException(
            $"{path}: neither a torch.save archive (zip) nor JSON (it starts with bytes {Convert.ToHexString(head[..Math.Min(head.Length, 4)]).ToLowerInvariant()})");
    }

    private static (ExpertLoadFormat, string) DescribeJson(byte[] json, string path)
    {
        JsonElement counts;
        ExpertLoadFormat format;
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json);
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: malformed JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind == JsonValueKind.Object && root.TryGetProperty(PlacementFile.MapKey, out _) && !root.TryGetProperty("logical_count", out _))
                throw new InvalidDataException($"{path}: a placement ({PlacementFile.MapKey}), not an expert load");
            if (root.ValueKind == JsonValueKind.Object && root.TryGetProperty("logical_count", out counts)) format = ExpertLoadFormat.JsonLogicalCount;
            else if (root.ValueKind == JsonValueKind.Array) (counts, format) = (root, ExpertLoadFormat.JsonArray);
            else return (ExpertLoadFormat.JsonLogicalCount, "");  // ExpertLoad.Parse names the problem
            var steps = counts.ValueKind == JsonValueKind.Array && counts.GetArrayLength() > 0 && counts[0].ValueKind == JsonValueKind.Array
                && counts[0].GetArrayLength() > 0 && counts[0][0].ValueKind == JsonValueKind.Array
                ? counts.GetArrayLength()
                : 0;
            return (format, steps > 0 ? string.Create(CultureInfo.InvariantCulture, $"{steps} steps summed") : "");
        }
    }

    private static (ExpertLoad Load, int Added) ToModelLayers(ExpertLoad load, int modelLayers, string path)
    {
        if (modelLayers == 0 || modelLayers == load.Layers) return (load, 0);
        if (load.Layers > modelLayers)
            throw new InvalidDataException($"{path}: {load.Layers} layers, more than the model's {modelLayers}");
        var added = modelLayers - load.Layers;
        var values = new double[modelLayers * load.LogicalExperts];
        load.Values.CopyTo(values.AsSpan(added * load.LogicalExperts));
        return (new ExpertLoad(modelLayers, load.LogicalExperts, values), added);
    }
}
