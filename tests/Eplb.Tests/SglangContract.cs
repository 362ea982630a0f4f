using System.Text.Json;
using System.Text.RegularExpressions;
using Eplb.Formats;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// What SGLang does with <c>--init-expert-location FILE</c>, step by step, as assertions
/// (<c>python/sglang/srt/eplb/expert_location.py</c>): a placement that passes here is one SGLang
/// loads and serves with. The steps name the SGLang function each one stands for.
/// </summary>
internal static class SglangContract
{
    /// <summary>What <c>ExpertLocationMetadata</c> ends up holding.</summary>
    /// <param name="Phy2Log">physical_to_logical_map, <c>[num_layers][num_physical_experts]</c>.</param>
    /// <param name="LogicalToAllPhysical">The replica list of each logical expert of each layer (padding removed).</param>
    /// <param name="Width">The X of <c>logical_to_all_physical_map</c> before <c>_init_raw</c> pads it: the longest list over all layers.</param>
    public sealed record Metadata(long[][] Phy2Log, int[][][] LogicalToAllPhysical, int Width);

    /// <summary>Loads a placement file as SGLang would for a model of <paramref name="modelLayers"/> layers.</summary>
    /// <param name="path">The file; <c>.pt</c> is read as torch.load does, anything else as JSON (compute_initial_expert_location_metadata).</param>
    /// <param name="modelLayers">num_hidden_layers (61 for DeepSeek-V3).</param>
    /// <param name="experts">num_logical_experts (n_routed_experts, 256).</param>
    /// <param name="redundant">--ep-num-redundant-experts.</param>
    /// <param name="epSize">--ep-size.</param>
    public static Metadata Load(string path, int modelLayers, int experts, int redundant, int epSize)
    {
        // compute_initial_expert_location_metadata: data.endswith(".pt") -> torch.load(weights_only=True), else json.
        long[][] map;
        if (path.EndsWith(".pt", StringComparison.Ordinal))
        {
            using var archive = TorchArchive.Open(path);
            var dict = archive.Root as IReadOnlyDictionary<string, object?>;
            Assert.That(dict, Is.Not.Null, "torch.load must give a dict");
            // "physical_to_logical_map" in data_dict -> init_by_mapping(server_args, model_config, **data_dict):
            // its only keyword parameter is physical_to_logical_map, any other key is a TypeError.
            Assert.That(dict!.Keys, Is.EqualTo(new[] { PlacementFile.MapKey }), "init_by_mapping(**data_dict) accepts no other key");
            var tensor = dict[PlacementFile.MapKey] as TorchTensor;
            Assert.That(tensor, Is.Not.Null, "physical_to_logical_map must be a tensor");
            // _compute_logical_to_all_physical_map uses .item() as a list index: an integer dtype is needed.
            Assert.That(tensor!.DType, Is.AnyOf(TorchDType.Int32, TorchDType.Int64), "the map's entries are list indices");
            Assert.That(tensor.Shape, Has.Count.EqualTo(2));
            var values = tensor.ToInt64s();
            var width = (int)tensor.Shape[1];
            map = Enumerable.Range(0, (int)tensor.Shape[0]).Select(l => values.AsSpan(l * width, width).ToArray()).ToArray();
        }
        else
        {
            using var json = JsonDocument.Parse(File.ReadAllBytes(path));
            var root = json.RootElement;
            Assert.That(root.ValueKind, Is.EqualTo(JsonValueKind.Object));
            Assert.That(root.EnumerateObject().Select(p => p.Name), Is.EqualTo(new[] { PlacementFile.MapKey }),
                "init_by_mapping(**data_dict) accepts no other key");
            // init_by_mapping: torch.tensor(list). Ragged rows fail there; a float literal makes a float
            // tensor whose .item() is no list index; so every entry must be an integer literal.
            map = root.GetProperty(PlacementFile.MapKey).EnumerateArray().Select(row => row.EnumerateArray().Select(cell =>
            {
                Assert.That(cell.ValueKind, Is.EqualTo(JsonValueKind.Number));
                Assert.That(cell.GetRawText(), Does.Match(new Regex(@"^-?\d+$")), "an integer literal");
                return cell.GetInt64();
            }).ToArray()).ToArray();
        }

        // The shape SGLang assumes without checking: one row per model layer (ExpertLocationDispatchInfo.init_new
        // indexes logical_to_all_physical_map[layer_id] by model layer id) and num_logical + redundant
        // columns (_init_common's num_physical_experts), a multiple of ep_size (num_local_physical_experts).
        Assert.That(map, Has.Length.EqualTo(modelLayers), "one row per model layer (num_hidden_layers)");
        var physical = experts + redundant;
        Assert.That(map, Is.All.Length.EqualTo(physical), "num_logical_experts + ep_num_redundant_experts columns");
        Assert.That(physical % epSize, Is.Zero, "num_physical_experts % ep_size == 0 (_init_common)");

        // _compute_logical_to_all_physical_map: for each layer, physical ids in ascending order are
        // appended to the list of their logical expert. A negative id would silently wrap (Python
        // indexing), one >= num_logical_experts raises IndexError.
        var lists = new int[modelLayers][][];
        for (var l = 0; l < modelLayers; l++)
        {
            var perExpert = Enumerable.Range(0, experts).Select(_ => new List<int>()).ToArray();
            for (var p = 0; p < physical; p++)
            {
                var e = map[l][p];
                Assert.That(e, Is.InRange(0, experts - 1), $"layer {l} slot {p}: a logical expert id");
                perExpert[e].Add(p);
            }
            lists[l] = perExpert.Select(list => list.ToArray()).ToArray();
        }
        // _pad_nested_array pads to the longest list of any layer; _init_raw then to num_physical_experts.
        var widest = lists.SelectMany(layer => layer).Max(list => list.Length);
        Assert.That(widest, Is.LessThanOrEqualTo(physical));
        // logical_to_all_physical_map_num_valid >= 1 everywhere: the dynamic dispatch takes a random
        // index modulo it, and compute_logical_to_rank_dispatch_physical_map's _fair_choices divides by it.
        for (var l = 0; l < modelLayers; l++)
            for (var e = 0; e < experts; e++)
                Assert.That(lists[l][e], Is.Not.Empty, $"layer {l}: logical expert {e} has no physical replica");
        return new Metadata(map, lists, widest);
    }

    /// <summary>Asserts that SGLang's replica lists are our log2phy rows (ascending slots, -1 padding dropped) in every layer.</summary>
    public static void AssertSameReplicas(Metadata metadata, ExpertPlacement model)
    {
        Assert.That(model.Layers, Is.EqualTo(metadata.Phy2Log.Length));
        for (var l = 0; l < model.Layers; l++)
        {
            var table = model.Log2Phy(l);
            for (var e = 0; e < model.LogicalExperts; e++)
            {
                var ours = table.Slice(e * model.MaxReplicas, model.MaxReplicas).ToArray().Where(s => s >= 0).ToArray();
                if (!ours.SequenceEqual(metadata.LogicalToAllPhysical[l][e]))
                    Assert.Fail($"layer {l} expert {e}: SGLang derives replicas [{string.Join(", ", metadata.LogicalToAllPhysical[l][e])}], " +
                        $"our log2phy has [{string.Join(", ", ours)}]");
            }
        }
    }
}
