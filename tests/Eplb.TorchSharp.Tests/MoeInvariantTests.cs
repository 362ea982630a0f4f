using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Runtime;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace Eplb.TorchSharp.Tests;

/// <summary>
/// A small MoE model in TorchSharp over several in-process expert-parallel ranks, its expert weights
/// in torch tensors that EPLB rearranges in place: every MoE layer routes each rank's tokens with
/// <see cref="Router"/> (EPLB epilogue: physical slots, load recorded), computes every routed (token, k)
/// pair with the weights of the slot it was sent to, on whichever rank holds it (gate-and-up with its
/// scale, SwiGLU, down with its scale), and combines the K rows per token in ascending k with
/// <see cref="ExpertDispatch.Combine{TIn, TOut}(ComputeStream, DeviceSlice{TIn}, int, DeviceSlice{int}, int, DeviceSlice{float}, DeviceSlice{TOut})"/>.
/// </summary>
internal sealed class TinyMoeModel : IDisposable
{
    public const int Hidden = 16, Intermediate = 8;
    private readonly Tensor[] _gates;
    private readonly Tensor[][] _expertWeights;  // [layer][tensor]: [N, ...] one row per logical expert
    private Router[][]? _routers;

    public TinyMoeModel(Random random, int ranks, int layers, int logicalExperts, int slots, int topK)
    {
        (Ranks, Layers, LogicalExperts, Slots, TopK) = (ranks, layers, logicalExperts, slots, topK);
        SlotsPerRank = slots / ranks;
        _gates = Enumerable.Range(0, layers).Select(_ => TestSupport.Uniform(random, 0.5f, Hidden, logicalExperts)).ToArray();
        Skew = Enumerable.Range(0, layers).Select(_ => zeros(logicalExperts)).ToArray();
        // Every tensor of an expert, scales included: gate-and-up [2I, H] with a per-row scale, down [H, I] with a per-row scale.
        _expertWeights = Enumerable.Range(0, layers).Select(_ => new[]
        {
            TestSupport.Uniform(random, 0.5f, logicalExperts, 2 * Intermediate, Hidden),
            TestSupport.Uniform(random, 0.5f, logicalExperts, 2 * Intermediate).add(1f),
            TestSupport.Uniform(random, 0.5f, logicalExperts, Hidden, Intermediate),
            TestSupport.Uniform(random, 0.5f, logicalExperts, Hidden).add(1f),
        }).ToArray();
        // Rank g's tensors hold the experts of EPLB's initial placement: local slot j is expert (g * R/G + j) mod N.
        Experts = Enumerable.Range(0, ranks).Select(g => new TorchMixtureOfExperts(g, logicalExperts, slots,
            Enumerable.Range(0, layers).Select(l => new TorchExpertLayer(Names.Select((name, t) =>
                (name, stack(Enumerable.Range(0, SlotsPerRank).Select(j => _expertWeights[l][t][(g * SlotsPerRank + j) % logicalExperts]).ToArray())))))
                .ToArray())).ToArray();
    }

    public static readonly string[] Names = ["w13", "w13_scale", "w2", "w2_scale"];

    public int Ranks { get; }
    public int Layers { get; }
    public int LogicalExperts { get; }
    public int Slots { get; }
    public int SlotsPerRank { get; }
    public int TopK { get; }

    /// <summary>Added to each layer's router logits: makes experts hot.</summary>
    public Tensor[] Skew { get; }

    /// <summary>Rank g's expert tensors as EPLB sees them.</summary>
    public TorchMixtureOfExperts[] Experts { get; }

    /// <summary>The original weights of logical expert <paramref name="expert"/>: tensor <paramref name="tensor"/> of layer <paramref name="layer"/>.</summary>
    public Tensor ExpertWeights(int layer, int tensor, int expert) => _expertWeights[layer][tensor][expert];

    /// <summary>After <see cref="EplbState.AddModel"/>: one router per rank and layer over the rank's EPLB views.</summary>
    public void ConnectRouters()
    {
        var options = new RouterOptions { LogicalExperts = LogicalExperts, TopK = TopK, Score = RoutingScore.Softmax };
        _routers = Experts.Select(rank => rank.LayerStates!.Select(state => new Router(options, state)).ToArray()).ToArray();
    }

    /// <summary>One forward pass of every rank's tokens <c>[T, H]</c>; returns each rank's hidden states and the physical slots of the first layer.</summary>
    public (Tensor[] Output, int[][] FirstLayerSlots) Forward(Tensor[] inputs)
    {
        using var scope = NewDisposeScope();
        var x = inputs.Select(t => t.clone()).ToArray();
        var firstSlots = new int[Ranks][];
        for (var layer = 0; layer < Layers; layer++)
        {
            for (var g = 0; g < Ranks; g++)
            {
                var logits = x[g].matmul(_gates[layer]).add(Skew[layer]).contiguous();
                var (ids, weights) = _routers![g][layer].Route(logits);
                var slots = ids.data<int>().ToArray();
                if (layer == 0) firstSlots[g] = slots;
                var tokens = (int)x[g].shape[0];
                // Each pair on the rank that holds its slot, with that slot's weights.
                var rows = new Tensor[slots.Length];
                for (var p = 0; p < slots.Length; p++)
                    rows[p] = Expert(slots[p] / SlotsPerRank, layer, slots[p] % SlotsPerRank, x[g][p / TopK]);
                var y = stack(rows).contiguous();
                var output = empty(tokens, Hidden);
                var positions = arange(slots.Length, dtype: ScalarType.Int32);
                using (var yView = TensorMemory.Wrap<float>(y))
                using (var positionView = TensorMemory.Wrap<int>(positions))
                using (var weightView = TensorMemory.Wrap<float>(weights))
                using (var outputView = TensorMemory.Wrap<float>(output))
                    ExpertDispatch.Combine<float, float>(ComputeStream.Cpu, yView, Hidden, positionView, TopK, weightView, outputView);
                x[g] = x[g].add(output);
            }
        }
        foreach (var t in x) t.MoveToOuterDisposeScope();
        return (x, firstSlots);
    }

    // Expert of local slot j on rank g: down(silu(gate) * up), each projection scaled per row.
    private Tensor Expert(int rank, int layer, int slot, Tensor token)
    {
        var experts = Experts[rank].Layer(layer);
        var h = experts["w13"][slot].mv(token).mul(experts["w13_scale"][slot]);
        var activated = h[..Intermediate].silu().mul(h[Intermediate..]);
        return experts["w2"][slot].mv(activated).mul(experts["w2_scale"][slot]);
    }

    public void Dispose()
    {
        foreach (var rank in Experts) rank.Dispose();
    }
}

/// <summary>
/// The invariant every host relies on (issue 16 §4): rearrangements — sync and async, with redundant
/// experts — change where experts live (the placement and the rows of the model's own weight
/// tensors) and not one bit of what the model computes.
/// </summary>
public class MoeInvariantTests
{
    [TestCase(false)]
    [TestCase(true)]
    public void RearrangementsMoveTheWeightsInsideTheTensorsAndChangeNoBitOfTheOutput(bool useAsync)
    {
        var random = TestSupport.NewRandom();
        const int ranks = 4, layers = 3, experts = 8, slots = 12, topK = 2, tokens = 16;
        using var model = new TinyMoeModel(random, ranks, layers, experts, slots, topK);
        var options = new EplbOptions
        {
            UseAsync = useAsync, WindowSize = 4, StepInterval = 8, RedundantExperts = slots - experts, Policy = "deepseek",
        };
        using var transport = new InProcessTransport(ranks);
        using var eplb = new EplbState(options, transport);
        var eplbModel = eplb.AddModel("tiny", model.Experts);
        model.ConnectRouters();
        var updates = 0;
        foreach (var rank in model.Experts) rank.ExpertMapUpdated += (_, _) => updates++;

        var probe = Enumerable.Range(0, ranks).Select(_ => TestSupport.Uniform(random, 1f, tokens, TinyMoeModel.Hidden)).ToArray();
        var (before, slotsBefore) = model.Forward(probe);
        var bitsBefore = before.Select(TestSupport.Bytes).ToArray();
        var initial = eplbModel.Placement;
        var tensorsBefore = Snapshot(model);

        // Hot experts differ per phase, so each rearrangement has work: experts 6 and 7 first (both on
        // rank 2 at the start), then 1 and 4.
        int[][] hot = [[6, 7], [1, 4]];
        for (var phase = 0; phase < hot.Length; phase++)
        {
            for (var layer = 0; layer < layers; layer++)
            {
                model.Skew[layer].zero_();
                model.Skew[layer][hot[phase][0]] = tensor(2.5f);
                model.Skew[layer][hot[phase][1]] = tensor(1.5f);
            }
            var completed = eplb.CompletedRearrangements;
            for (var step = 0; step < 40 && eplb.CompletedRearrangements == completed; step++)
            {
                model.Forward(Enumerable.Range(0, ranks).Select(_ => TestSupport.Uniform(random, 1f, tokens, TinyMoeModel.Hidden)).ToArray());
                eplb.Step();
                if (eplb.IsRearranging) eplb.WaitForStagedLayer(TimeSpan.FromSeconds(30));
                // Between commits (async: some layers new, some old) the model computes the same bits.
                var during = Skewless(model, () => model.Forward(probe).Output);
                Assert.That(during.Select(TestSupport.Bytes), Is.EqualTo(bitsBefore), $"phase {phase}, step {step}: output changed");
            }
            Assert.That(eplb.CompletedRearrangements, Is.EqualTo(completed + 1), $"phase {phase}: a rearrangement completed");
            Assert.That(eplb.FailedRearrangements, Is.Zero);
            AssertWeightsFollowThePlacement(model, eplbModel);
        }

        // The placement changed, and with it the rows of the model's tensors...
        var moved = Enumerable.Range(0, layers).Count(l => !initial.Phy2Log(l).SequenceEqual(eplbModel.Placement.Phy2Log(l)));
        Assert.That(moved, Is.GreaterThan(0), "the placement changed");
        var tensorsAfter = Snapshot(model);
        Assert.That(tensorsAfter, Is.Not.EqualTo(tensorsBefore), "the weights moved inside the model's tensors");
        Assert.That(eplb.SlotsMoved, Is.GreaterThan(0));
        Assert.That(updates, Is.EqualTo(ranks * (int)eplb.LayersCommitted), "every rank heard of every committed layer");
        // ...the probe's tokens go to other slots now...
        var (after, slotsAfter) = Skewless(model, () => model.Forward(probe));
        Assert.That(slotsAfter, Is.Not.EqualTo(slotsBefore), "tokens are routed to other physical slots");
        // ...and the output is the same, bit for bit.
        Assert.That(after.Select(TestSupport.Bytes), Is.EqualTo(bitsBefore));
    }

    // Runs the probe with the skew of its first pass (none), so only the placement differs between runs.
    private static T Skewless<T>(TinyMoeModel model, Func<T> run)
    {
        var saved = model.Skew.Select(s => s.clone()).ToArray();
        foreach (var s in model.Skew) s.zero_();
        try
        {
            return run();
        }
        finally
        {
            for (var l = 0; l < saved.Length; l++) model.Skew[l].copy_(saved[l]);
        }
    }

    // Every slot of every rank holds, in all four tensors, exactly the original weights of the expert
    // the placement in force puts there; each rank's model map says the same.
    private static void AssertWeightsFollowThePlacement(TinyMoeModel model, EplbModel eplbModel)
    {
        for (var layer = 0; layer < model.Layers; layer++)
        {
            var phy2log = eplbModel.Placement.Phy2Log(layer).ToArray();
            foreach (var rank in model.Experts)
            {
                Assert.That(rank.ExpertMap(layer).ToArray(), Is.EqualTo(phy2log), $"rank {rank.Rank}, layer {layer}: model map");
                for (var j = 0; j < model.SlotsPerRank; j++)
                {
                    var expert = phy2log[rank.Rank * model.SlotsPerRank + j];
                    for (var t = 0; t < TinyMoeModel.Names.Length; t++)
                        Assert.That(TestSupport.Bytes(rank.Layer(layer)[TinyMoeModel.Names[t]][j]), Is.EqualTo(TestSupport.Bytes(model.ExpertWeights(layer, t, expert))),
                            $"rank {rank.Rank}, layer {layer}, slot {j}, {TinyMoeModel.Names[t]}: expert {expert}'s weights");
                }
            }
        }
    }

    private static byte[][] Snapshot(TinyMoeModel model) =>
        model.Experts.SelectMany(rank => Enumerable.Range(0, model.Layers)
            .SelectMany(l => TinyMoeModel.Names.Select(name => TestSupport.Bytes(rank.Layer(l)[name])))).ToArray();
}
