using System.Globalization;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>
/// SGLang's expert-distribution recorder dumps (<c>python/sglang/srt/eplb/expert_distribution.py</c>),
/// as <c>torch.save</c> writes them to <c>$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR</c> (default <c>/tmp</c>):
/// <list type="bullet">
/// <item><c>stat</c> and <c>stat_approx</c> (<c>_StatAccumulator.dump</c>, rank 0 only, file
/// <c>expert_distribution_recorder_{time}.pt</c>): <c>{"rank": int, "logical_count": int32
/// [buffer_steps][num_layers][num_logical_experts], "average_utilization_rate_over_window": float | None}</c>,
/// the counts already all-reduced over ranks and folded to logical experts; steps the circular buffer
/// never filled are zero.</item>
/// <item><c>per_pass</c> and <c>per_token</c> (<c>_DetailAccumulator.dump</c>, one file per rank,
/// <c>expert_distribution_recorder_{time}_{rank}.pt</c>): <c>{"records": [{"forward_pass_id", "rank",
/// "gatherer_key", "global_physical_count": int [num_layers][num_physical_experts], ...}, ...],
/// "last_physical_to_logical_map": int [num_layers][num_physical_experts]}</c>; each record counts the
/// tokens of this rank's pass per physical slot.</item>
/// </list>
/// Rows are model layers (<c>num_hidden_layers</c>); dense layers are zero rows.
/// </summary>
internal static class SglangRecorderDump
{
    /// <summary>The most layer x expert cells a load may have.</summary>
    private const long MaxCells = 1 << 24;

    /// <summary>Reads a recorder dump out of an archive's root object.</summary>
    /// <exception cref="InvalidDataException">The object is not a recorder dump, or its tensors have wrong shapes or values.</exception>
    public static (ExpertLoad Load, ExpertLoadFormat Format, string Details) Read(object? root)
    {
        if (root is not IReadOnlyDictionary<string, object?> dict)
            throw new InvalidDataException($"the archive holds {Describe(root)}, not an SGLang recorder dump (a dict)");
        if (dict.ContainsKey("logical_count")) return ReadStat(dict);
        if (dict.ContainsKey("records") && dict.ContainsKey("last_physical_to_logical_map")) return ReadPerPass(dict);
        if (dict.ContainsKey(PlacementFile.MapKey))
            throw new InvalidDataException($"the archive holds a placement ({PlacementFile.MapKey}), not an expert load");
        throw new InvalidDataException(
            $"the archive's dict has keys [{string.Join(", ", dict.Keys)}]: an SGLang recorder dump has logical_count (stat, stat_approx) " +
            "or records and last_physical_to_logical_map (per_pass, per_token)");
    }

    private static (ExpertLoad, ExpertLoadFormat, string) ReadStat(IReadOnlyDictionary<string, object?> dict)
    {
        if (dict["logical_count"] is not TorchTensor counts)
            throw new InvalidDataException($"logical_count is {Describe(dict["logical_count"])}, not a tensor");
        // SGLang's init_by_eplb takes [L][N] too (it unsqueezes a missing step dimension).
        if (counts.Shape.Count is not (2 or 3))
            throw new InvalidDataException($"logical_count has shape {counts.ShapeText()}: expected [buffer_steps][layers][experts] or [layers][experts]");
        var steps = counts.Shape.Count == 3 ? counts.Shape[0] : 1;
        var layers = counts.Shape[^2];
        var experts = counts.Shape[^1];
        CheckCells(layers, experts, "logical_count", counts);
        if (steps == 0) throw new InvalidDataException($"logical_count has shape {counts.ShapeText()}: no buffer steps");
        var sum = new double[layers * experts];
        counts.AccumulateCounts(sum, "logical_count");
        var details = new List<string> { string.Create(CultureInfo.InvariantCulture, $"{steps} buffer step{(steps == 1 ? "" : "s")} summed") };
        if (dict.TryGetValue("rank", out var rank) && rank is long r) details.Add($"rank {r}");
        if (dict.TryGetValue("average_utilization_rate_over_window", out var rate) && rate is double u)
            details.Add(string.Create(CultureInfo.InvariantCulture, $"average utilization over the window {u:F3}"));
        return (new ExpertLoad((int)layers, (int)experts, sum), ExpertLoadFormat.SglangRecorderStat, string.Join(", ", details));
    }

    private static (ExpertLoad, ExpertLoadFormat, string) ReadPerPass(IReadOnlyDictionary<string, object?> dict)
    {
        if (dict["last_physical_to_logical_map"] is not TorchTensor mapTensor)
            throw new InvalidDataException($"last_physical_to_logical_map is {Describe(dict["last_physical_to_logical_map"])}, not a tensor");
        if (mapTensor.Shape.Count != 2)
            throw new InvalidDataException($"last_physical_to_logical_map has shape {mapTensor.ShapeText()}: expected [layers][physical experts]");
        var layers = mapTensor.Shape[0];
        var slots = mapTensor.Shape[1];
        CheckCells(layers, slots, "last_physical_to_logical_map", mapTensor);
        var map = mapTensor.ToInt64s();
        // The dump does not say N; SGLang's map gives every logical expert a slot in every layer, so
        // N is one more than the largest id, and every row must hold all of 0..N-1.
        var (lowest, highest) = (map.Min(), map.Max());
        if (lowest < 0 || highest >= slots)
            throw new InvalidDataException($"last_physical_to_logical_map holds the id {(lowest < 0 ? lowest : highest)}, outside [0, {slots}) slots");
        var experts = (int)highest + 1;
        var seen = new bool[experts];
        for (var l = 0; l < layers; l++)
        {
            Array.Clear(seen);
            for (var s = 0; s < slots; s++) seen[map[l * slots + s]] = true;
            var missing = Array.IndexOf(seen, false);
            if (missing >= 0)
                throw new InvalidDataException($"last_physical_to_logical_map[{l}] has no slot for logical expert {missing} of 0..{experts - 1}");
        }

        if (dict["records"] is not IReadOnlyList<object?> records)
            throw new InvalidDataException($"records is {Describe(dict["records"])}, not a list");
        if (records.Count == 0) throw new InvalidDataException("records is empty: the recorder saw no forward pass");
        var physical = new double[layers * slots];
        for (var i = 0; i < records.Count; i++)
        {
            if (records[i] is not IReadOnlyDictionary<string, object?> record || !record.TryGetValue("global_physical_count", out var value))
                throw new InvalidDataException($"records[{i}] is not a dict with global_physical_count");
            if (value is not TorchTensor count || count.Shape.Count != 2 || count.Shape[0] != layers || count.Shape[1] != slots)
                throw new InvalidDataException(
                    $"records[{i}].global_physical_count is {Describe(value)}, expected a [{layers}, {slots}] tensor like last_physical_to_logical_map");
            count.AccumulateCounts(physical, $"records[{i}].global_physical_count");
        }

        // Fold slots to logical experts through the map, as SGLang's
        // _convert_global_physical_count_to_logical_count does (scatter_add over the slot axis).
        var logical = new double[layers * experts];
        for (var l = 0; l < layers; l++)
            for (var s = 0; s < slots; s++)
                logical[l * experts + map[l * slots + s]] += physical[l * slots + s];
        var ranks = records.OfType<IReadOnlyDictionary<string, object?>>().Select(r => r.TryGetValue("rank", out var v) ? v : null).OfType<long>().Distinct().Order().ToList();
        var details = string.Create(CultureInfo.InvariantCulture,
            $"{records.Count} forward pass{(records.Count == 1 ? "" : "es")} summed{(ranks.Count > 0 ? $" (rank {string.Join(", ", ranks)})" : "")}, " +
            $"{slots} physical slots folded to {experts} logical experts through last_physical_to_logical_map");
        return (new ExpertLoad((int)layers, (int)experts, logical), ExpertLoadFormat.SglangRecorderPerPass, details);
    }

    private static void CheckCells(long layers, long columns, string name, TorchTensor tensor)
    {
        if (layers < 1 || columns < 1 || layers * columns > MaxCells)
            throw new InvalidDataException($"{name} has shape {tensor.ShapeText()}: expected 1 to {MaxCells} layer x expert cells");
    }

    private static string Describe(object? value) => value switch
    {
        null => "None",
        TorchTensor tensor => $"a tensor ({tensor.DType.ToString().ToLowerInvariant()}, shape {tensor.ShapeText()})",
        IReadOnlyDictionary<string, object?> => "a dict",
        IReadOnlyList<object?> => "a list",
        _ => $"a {value.GetType().Name.ToLowerInvariant()}",
    };
}
