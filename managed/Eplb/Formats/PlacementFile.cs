using System.Text.Json;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>
/// The placement file SGLang's <c>--init-expert-location FILE</c> loads (docs/design.md §8), and the reader for
/// the placement in force (<c>--old</c>).
/// </summary>
/// <remarks>
/// SGLang's rules (<c>python/sglang/srt/eplb/expert_location.py</c>): <c>compute_initial_expert_location_metadata</c>
/// reads a <c>.pt</c> file with <c>torch.load(weights_only=True)</c> and anything else as JSON; a dict
/// with <c>physical_to_logical_map</c> goes to <c>ExpertLocationMetadata.init_by_mapping(server_args,
/// model_config, **data)</c>, whose only other parameter is <c>physical_to_logical_map</c>, so any other key
/// is a <c>TypeError</c>. The map becomes <c>torch.tensor(map)</c> of shape <c>[num_layers][num_physical_experts]</c>;
/// layers are looked up by model layer id (<c>ExpertLocationDispatchInfo.init_new(layer_id)</c>) and the
/// row count is never checked against <c>num_hidden_layers</c>, and <c>_compute_logical_to_all_physical_map</c>
/// uses each entry as a list index (a float fails, a negative one silently wraps). So the file holds only
/// that key, integers, one row per model layer with <c>N + redundant</c> columns, and every logical
/// expert in every row.
/// </remarks>
public sealed class PlacementFile
{
    /// <summary>The one key SGLang's <c>init_by_mapping</c> accepts.</summary>
    public const string MapKey = "physical_to_logical_map";

    private PlacementFile(IReadOnlyList<int[]> rows, IReadOnlyList<int>? layerIds, string description)
    {
        Rows = rows;
        LayerIds = layerIds;
        Description = description;
    }

    /// <summary>The <c>physical_to_logical_map</c> rows, as in the file.</summary>
    public IReadOnlyList<int[]> Rows { get; }

    /// <summary>The model layer id of each row, when the file says (files written by <c>eplb plan</c> before SGLang's layout); else null.</summary>
    public IReadOnlyList<int>? LayerIds { get; }

    /// <summary>What the file was read as, for people.</summary>
    public string Description { get; }

    /// <summary>SGLang's trivial row (<c>ExpertLocationMetadata.init_trivial</c>): slot <c>s</c> holds logical expert <c>s mod N</c>.</summary>
    public static int[] TrivialRow(int slots, int experts)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(experts, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, experts);
        return Enumerable.Range(0, slots).Select(s => s % experts).ToArray();
    }

    /// <summary>
    /// The placement of every model layer: the planned layers' rows at their model layer ids, SGLang's
    /// trivial row everywhere else (dense layers, layers without load).
    /// </summary>
    /// <param name="planned">The plan of the layers with load.</param>
    /// <param name="plannedLayerIds">The model layer id of each planned layer.</param>
    /// <param name="modelLayers">M, the model's layer count (<c>num_hidden_layers</c>).</param>
    /// <param name="maxReplicas">Kmax of the result; 0 derives it.</param>
    /// <exception cref="ArgumentException">The ids are not distinct, not in <c>[0, M)</c>, or not one per planned layer.</exception>
    public static ExpertPlacement ForModel(ExpertPlacement planned, IReadOnlyList<int> plannedLayerIds, int modelLayers, int maxReplicas = 0)
    {
        ArgumentNullException.ThrowIfNull(planned);
        ArgumentNullException.ThrowIfNull(plannedLayerIds);
        if (plannedLayerIds.Count != planned.Layers)
            throw new ArgumentException($"{plannedLayerIds.Count} layer ids for {planned.Layers} planned layers", nameof(plannedLayerIds));
        var rows = new int[modelLayers][];
        for (var i = 0; i < planned.Layers; i++)
        {
            var id = plannedLayerIds[i];
            if ((uint)id >= (uint)modelLayers) throw new ArgumentException($"layer id {id} is outside the model's {modelLayers} layers", nameof(plannedLayerIds));
            if (rows[id] != null) throw new ArgumentException($"layer id {id} is planned twice", nameof(plannedLayerIds));
            rows[id] = planned.Phy2Log(i).ToArray();
        }
        var trivial = TrivialRow(planned.Slots, planned.LogicalExperts);
        for (var l = 0; l < modelLayers; l++) rows[l] ??= trivial;
        return ExpertPlacement.FromPhy2Log(rows, planned.LogicalExperts, planned.Ranks, planned.Nodes, maxReplicas);
    }

    /// <summary>Writes <c>{"physical_to_logical_map": [[...], ...]}</c>: only that key, integers, one row per layer of <paramref name="model"/>.</summary>
    public static void WriteJson(Stream stream, ExpertPlacement model)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(model);
        using var w = new Utf8JsonWriter(stream);
        w.WriteStartObject();
        w.WriteStartArray(MapKey);
        for (var l = 0; l < model.Layers; l++)
        {
            w.WriteStartArray();
            foreach (var e in model.Phy2Log(l)) w.WriteNumberValue(e);
            w.WriteEndArray();
        }
        w.WriteEndArray();
        w.WriteEndObject();
    }

    /// <summary>
    /// Writes the same map as a <c>torch.save</c> archive: <c>{"physical_to_logical_map": int64 tensor [M][R]}</c>,
    /// which SGLang reads for a <c>.pt</c> path.
    /// </summary>
    public static void WriteTorch(Stream stream, ExpertPlacement model)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(model);
        var values = new long[(long)model.Layers * model.Slots];
        for (var i = 0; i < values.Length; i++) values[i] = model.Phy2LogTable[i];
        TorchArchive.Save(stream, new Dictionary<string, object?> { [MapKey] = TorchTensor.FromInt64(values, model.Layers, model.Slots) });
    }

    /// <summary>
    /// Reads a placement: SGLang's <c>physical_to_logical_map</c> as JSON or as a <c>torch.save</c> archive,
    /// or a file an older <c>eplb plan</c> wrote (JSON with more keys, rows of MoE layers only, <c>layer_ids</c>).
    /// </summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file holds no integer <c>physical_to_logical_map</c> rows; the message says why.</exception>
    public static PlacementFile Read(string path, TorchArchiveLimits? limits = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"placement file '{path}' does not exist", path);
        var head = new byte[8];
        int length;
        using (var stream = File.OpenRead(path)) length = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        return ExpertLoadFile.Sniff(head.AsSpan(0, length), path) == ExpertLoadFile.FileKind.Zip ? ReadTorch(path, limits) : ReadJson(path);
    }

    private static PlacementFile ReadTorch(string path, TorchArchiveLimits? limits)
    {
        using var archive = TorchArchive.Open(path, limits);
        if (archive.Root is not IReadOnlyDictionary<string, object?> dict || !dict.TryGetValue(MapKey, out var value))
            throw new InvalidDataException($"{path}: the archive holds no {MapKey}");
        if (value is not TorchTensor tensor || tensor.Shape.Count != 2)
            throw new InvalidDataException($"{path}: {MapKey} is not a [layers][slots] tensor");
        if (tensor.ElementCount > int.MaxValue) throw new InvalidDataException($"{path}: {MapKey} has {tensor.ElementCount} entries");
        long[] values;
        try
        {
            values = tensor.ToInt64s();
        }
        catch (InvalidDataException e) when (!e.Message.StartsWith(path, StringComparison.Ordinal))
        {
            throw new InvalidDataException($"{path}: {MapKey}: {e.Message}", e);
        }
        var (layers, slots) = ((int)tensor.Shape[0], (int)tensor.Shape[1]);
        var rows = new int[layers][];
        for (var l = 0; l < layers; l++)
        {
            rows[l] = new int[slots];
            for (var s = 0; s < slots; s++)
            {
                var v = values[(long)l * slots + s];
                if (v is < int.MinValue or > int.MaxValue) throw new InvalidDataException($"{path}: {MapKey}[{l}][{s}] = {v} is out of range");
                rows[l][s] = (int)v;
            }
        }
        return new PlacementFile(rows, null, $"SGLang placement, torch.save archive ({layers} layers x {slots} slots)");
    }

    private static PlacementFile ReadJson(string path)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllBytes(path));
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: malformed JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty(MapKey, out var map) || map.ValueKind != JsonValueKind.Array)
                throw new InvalidDataException($"{path}: expected an object with a \"{MapKey}\" array");
            var rows = new List<int[]>();
            foreach (var row in map.EnumerateArray())
            {
                if (row.ValueKind != JsonValueKind.Array) throw new InvalidDataException($"{path}: {MapKey}[{rows.Count}] is not an array");
                var values = new int[row.GetArrayLength()];
                var i = 0;
                foreach (var cell in row.EnumerateArray())
                {
                    if (cell.ValueKind != JsonValueKind.Number || !cell.TryGetInt32(out values[i]))
                        throw new InvalidDataException($"{path}: {MapKey}[{rows.Count}][{i}] is not an integer ({cell.GetRawText()})");
                    i++;
                }
                rows.Add(values);
            }
            List<int>? ids = null;
            if (root.TryGetProperty("layer_ids", out var idList))
            {
                if (idList.ValueKind != JsonValueKind.Array || idList.GetArrayLength() != rows.Count
                    || idList.EnumerateArray().Any(v => v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out _)))
                    throw new InvalidDataException($"{path}: layer_ids must be {rows.Count} integers, one per {MapKey} row");
                ids = idList.EnumerateArray().Select(v => v.GetInt32()).ToList();
            }
            var extra = root.EnumerateObject().Count() > 1;
            var kind = extra ? "an older eplb plan file (JSON with more keys)" : "SGLang placement, JSON";
            return new PlacementFile(rows, ids, $"{kind} ({rows.Count} layers x {(rows.Count > 0 ? rows[0].Length : 0)} slots)");
        }
    }

    /// <summary>
    /// The rows of the given model layers as a placement: by <see cref="LayerIds"/> when the file has
    /// them, by model layer id when it has one row per model layer (SGLang's layout), else by position
    /// when it has one row per planned layer (older files).
    /// </summary>
    /// <param name="layerIds">The model layer ids wanted (the planned layers).</param>
    /// <param name="modelLayers">M, the model's layer count.</param>
    /// <param name="experts">N.</param>
    /// <param name="slots">R, the slots every row must have.</param>
    /// <param name="gpus">G.</param>
    /// <param name="nodes">Nodes.</param>
    /// <param name="source">The name used in messages (the path).</param>
    /// <exception cref="InvalidDataException">The rows do not fit: other counts, a missing layer, a bad id; the message says which.</exception>
    public ExpertPlacement ForLayers(IReadOnlyList<int> layerIds, int modelLayers, int experts, int slots, int gpus, int nodes, string source)
    {
        ArgumentNullException.ThrowIfNull(layerIds);
        List<int[]> selected;
        if (LayerIds != null)
        {
            var byId = new Dictionary<int, int[]>();
            for (var i = 0; i < Rows.Count; i++) byId[LayerIds[i]] = Rows[i];
            selected = [];
            foreach (var id in layerIds)
            {
                if (!byId.TryGetValue(id, out var row)) throw new InvalidDataException($"{source}: has no row for layer {id} of the load");
                selected.Add(row);
            }
        }
        else if (Rows.Count == modelLayers)
        {
            selected = layerIds.Select(id => Rows[id]).ToList();
        }
        else if (Rows.Count == layerIds.Count)
        {
            selected = [.. Rows];
        }
        else
        {
            throw new InvalidDataException($"{source}: {Rows.Count} layers, but the load has {modelLayers} ({layerIds.Count} with load)");
        }
        if (selected.FirstOrDefault(row => row.Length != slots) is { } bad)
            throw new InvalidDataException($"{source}: {bad.Length} slots per layer, but R = {slots} slots were asked for");
        try
        {
            return ExpertPlacement.FromPhy2Log(selected, experts, gpus, nodes);
        }
        catch (ArgumentException e)
        {
            throw new InvalidDataException($"{source}: {e.Message}", e);
        }
    }
}
