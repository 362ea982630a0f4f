using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Runtime;

namespace Eplb.Balancing;

/// <summary>
/// What EPLB needs from one rank of an MoE model (vLLM's <c>MixtureOfExperts</c>, docs/design.md §3.3): its MoE
/// layers and their local expert weights, a place to hang the EPLB tables, and a hook when a layer's
/// placement changes. A pipeline stage may own no MoE layer (<see cref="Layers"/> = 0).
/// </summary>
public interface IMixtureOfExperts
{
    /// <summary>This instance's expert-parallel rank, in [0, G).</summary>
    int Rank { get; }

    /// <summary>L, the MoE layers this stage owns (0 is valid).</summary>
    int Layers { get; }

    /// <summary>N, logical (checkpoint) routed experts per layer.</summary>
    int LogicalExperts { get; }

    /// <summary>R, physical slots per layer over all ranks (N + redundant).</summary>
    int Slots { get; }

    /// <summary>R / G, the slots on this rank.</summary>
    int SlotsPerRank { get; }

    /// <summary>The backend the weights and tables live on.</summary>
    Backend Backend { get; }

    /// <summary>The stream the rank's forward passes run on: table updates are ordered on it.</summary>
    ComputeStream Stream { get; }

    /// <summary>
    /// The weight tensors of one layer's local experts (weights and scales, any count and shape),
    /// each holding <see cref="SlotsPerRank"/> experts; the same names and sizes every call. Called
    /// while a layer is staged, from EPLB's background worker in async mode; an exception stops the
    /// rearrangement (nothing of the layer is changed) and is logged.
    /// </summary>
    IReadOnlyList<ExpertTensor> GetExpertWeights(int layer);

    /// <summary>Hands the model the EPLB views of each of its MoE layers (for its routers).</summary>
    void SetEplbState(IReadOnlyList<EplbLayerState> layers);

    /// <summary>
    /// Called on the <see cref="EplbState.Step"/> thread when a layer's new placement is being switched
    /// (weights in place, tables updated). If the switch is then undone (this or another rank's hook
    /// threw, a copy failed, another process failed), it is called again with the previous map, so
    /// the last map the model heard always describes the placement in force. A hook that throws while
    /// being told the previous map is told it again at every step until it accepts it.
    /// </summary>
    void UpdateExpertMap(int layer, ReadOnlySpan<int> phy2Log);
}

/// <summary>Helpers over a layer's slot assignment.</summary>
public static class ExpertMap
{
    /// <summary>
    /// The local slots of <paramref name="rank"/> that hold <paramref name="logicalExpert"/> — a list,
    /// because a rank can hold two replicas of one expert (the weight loader fills all of them).
    /// </summary>
    public static IReadOnlyList<int> LocalSlots(ReadOnlySpan<int> phy2Log, int rank, int slotsPerRank, int logicalExpert)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(slotsPerRank, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        if ((long)(rank + 1) * slotsPerRank > phy2Log.Length)
            throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} has no slots in a layer of {phy2Log.Length}");
        var slots = new List<int>();
        var local = phy2Log.Slice(rank * slotsPerRank, slotsPerRank);
        for (var s = 0; s < local.Length; s++)
            if (local[s] == logicalExpert) slots.Add(s);
        return slots;
    }
}
