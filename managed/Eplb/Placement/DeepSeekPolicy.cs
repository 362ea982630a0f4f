using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// DeepSeek's expert-parallel load balancer (deepseek-ai/EPLB <c>rebalance_experts</c>) with exact
/// parity (SPEC 2.1): when <c>groups % nodes == 0</c> (and N is a multiple of groups) the
/// hierarchical policy packs groups to nodes, replicates inside each node and packs replicas to the
/// node's GPUs; otherwise the global policy does the same with one group on one node. Loads are
/// float32, ratios and pack sums float32, sorts stable, ties to the lowest index; so on tie-free
/// input <c>phy2log</c> and <c>logcnt</c> equal the reference's. Its known properties are kept:
/// one GPU may hold two replicas of an expert (unless <see cref="PlacementRequest.NoDuplicateOnRank"/>),
/// and the hierarchical result can be worse than the initial placement.
/// </summary>
public sealed class DeepSeekPolicy : IPlacementPolicy
{
    /// <inheritdoc/>
    public string Name => "deepseek";

    /// <inheritdoc/>
    /// <remarks>
    /// With <see cref="PlacementRequest.MaxReplicas"/> set, replication skips experts at the cap;
    /// with <see cref="PlacementRequest.NoDuplicateOnRank"/>, an expert gets at most one replica per
    /// GPU of its node and packing skips GPUs that hold it. Both leave the result equal to the
    /// reference whenever the reference already satisfies them.
    /// </remarks>
    public ExpertPlacement Plan(ExpertLoad load, PlacementRequest request, ExpertPlacement? current = null)
    {
        ArgumentNullException.ThrowIfNull(request);
        request.Validate(load, current);
        var shape = Shape.For(load.LogicalExperts, request);
        var phy2log = new int[(long)load.Layers * request.Slots];
        LayerParallel.For(load.Layers, request.MaxDegreeOfParallelism, () => new Workspace(shape),
            (l, ws) => ws.Rebalance(load.Layer(l), phy2log.AsSpan(l * shape.Slots, shape.Slots)));
        var placement = ExpertPlacement.Create(load.Layers, load.LogicalExperts, request.Slots, request.Ranks, request.Nodes, request.MaxReplicas, phy2log, Name);
        return current != null && request.PreserveSlots ? placement.WithSlotsPreservedFrom(current) : placement;
    }

    /// <summary>The sizes of one rebalance: the global policy is the hierarchical one with groups = nodes = 1.</summary>
    internal readonly record struct Shape(int Experts, int Slots, int Gpus, int Groups, int Nodes, int ReplicaCap, bool NoDuplicate)
    {
        public int GroupSize => Experts / Groups;
        public int GroupsPerNode => Groups / Nodes;
        public int ExpertsPerNode => Experts / Nodes;
        public int SlotsPerNode => Slots / Nodes;
        public int GpusPerNode => Gpus / Nodes;
        public int SlotsPerGpu => Slots / Gpus;

        public static Shape For(int experts, PlacementRequest request)
        {
            var hierarchical = request.IsHierarchical(experts);
            var groups = hierarchical ? request.Groups : 1;
            var nodes = hierarchical ? request.Nodes : 1;
            // Every replica of an expert stays on its node: at most one per GPU of the node.
            var cap = request.MaxReplicas > 0 ? request.MaxReplicas : int.MaxValue;
            if (request.NoDuplicateOnRank) cap = Math.Min(cap, request.Ranks / nodes);
            var shape = new Shape(experts, request.Slots, request.Ranks, groups, nodes, cap, request.NoDuplicateOnRank);
            if ((long)cap * shape.ExpertsPerNode < shape.SlotsPerNode)
                throw new ArgumentException(
                    $"{(hierarchical ? "hierarchical" : "global")} policy: the {shape.ExpertsPerNode} experts of a node can fill at most " +
                    $"{(long)cap * shape.ExpertsPerNode} of its {shape.SlotsPerNode} slots with at most {cap} replicas each " +
                    $"(maxReplicas = {request.MaxReplicas}, noDuplicateOnRank = {request.NoDuplicateOnRank}, G/nodes = {shape.GpusPerNode})");
            return shape;
        }
    }

    /// <summary>Scratch for one thread; <see cref="Rebalance"/> plans one layer.</summary>
    internal sealed class Workspace(Shape shape)
    {
        private readonly float[] _weight = new float[shape.Experts];
        private readonly float[] _groupWeight = new float[shape.Groups];
        private readonly int[] _groupPack = new int[shape.Groups];
        private readonly int[] _groupRank = new int[shape.Groups];
        private readonly int[] _mlog2log = new int[shape.Experts];
        private readonly float[] _nodeWeight = new float[shape.ExpertsPerNode];
        private readonly int[] _count = new int[shape.ExpertsPerNode];
        private readonly float[] _ratio = new float[shape.ExpertsPerNode];
        private readonly int[] _heap = new int[shape.ExpertsPerNode];
        private readonly int[] _phy2mlog = new int[shape.SlotsPerNode];
        private readonly float[] _phyWeight = new float[shape.SlotsPerNode];
        private readonly int[] _pack = new int[shape.SlotsPerNode];
        private readonly int[] _rank = new int[shape.SlotsPerNode];
        private readonly BalancedPacking _packing = new();

        /// <summary>Plans one layer: writes its <c>phy2log</c> (R slots).</summary>
        public void Rebalance(ReadOnlySpan<double> load, Span<int> phy2log)
        {
            var s = shape;
            for (var e = 0; e < s.Experts; e++) _weight[e] = (float)load[e] + 0f;  // + 0f: -0 -> +0

            // Step 1: groups to nodes. Group load is the float32 rounding of the exact sum of the
            // float32 loads (torch's float32 sum agrees except in the last bit beyond 2^24).
            for (var g = 0; g < s.Groups; g++)
            {
                var sum = 0.0;
                for (var j = 0; j < s.GroupSize; j++) sum += _weight[g * s.GroupSize + j];
                _groupWeight[g] = (float)sum;
            }
            _packing.Pack(_groupWeight, s.Nodes, _groupPack, _groupRank);
            // Node-local order: node k owns positions [k*N/nodes, (k+1)*N/nodes), groups in
            // pack-rank order, experts in original order inside a group.
            for (var g = 0; g < s.Groups; g++)
            {
                var position = (_groupPack[g] * s.GroupsPerNode + _groupRank[g]) * s.GroupSize;
                for (var j = 0; j < s.GroupSize; j++) _mlog2log[position + j] = g * s.GroupSize + j;
            }

            for (var node = 0; node < s.Nodes; node++)
            {
                var mlog = _mlog2log.AsSpan(node * s.ExpertsPerNode, s.ExpertsPerNode);
                for (var i = 0; i < mlog.Length; i++) _nodeWeight[i] = _weight[mlog[i]];
                // Step 2: replicate inside the node.
                Replicate(_nodeWeight, _count, _phy2mlog, s.ReplicaCap);
                // Step 3: replicas to the node's GPUs, each weighing load / replicas.
                for (var p = 0; p < s.SlotsPerNode; p++) _phyWeight[p] = _nodeWeight[_phy2mlog[p]] / _count[_phy2mlog[p]];
                _packing.Pack(_phyWeight, s.GpusPerNode, _pack, _rank, s.NoDuplicate ? _phy2mlog : default);
                var nodeSlots = phy2log.Slice(node * s.SlotsPerNode, s.SlotsPerNode);
                for (var p = 0; p < s.SlotsPerNode; p++) nodeSlots[_pack[p] * s.SlotsPerGpu + _rank[p]] = mlog[_phy2mlog[p]];
            }
        }

        /// <summary>
        /// DeepSeek's <c>replicate_experts</c>: one replica each, then each extra replica to the
        /// expert with the largest float32 <c>load / replicas</c> (ties: lowest position), skipping
        /// experts at <paramref name="cap"/>. Physical item p &lt; n is the original of expert p;
        /// extras follow in creation order.
        /// </summary>
        private void Replicate(ReadOnlySpan<float> weight, Span<int> count, Span<int> phy2mlog, int cap)
        {
            var n = weight.Length;
            var ratio = _ratio.AsSpan(0, n);
            var heap = _heap.AsSpan(0, n);
            count.Fill(1);
            for (var i = 0; i < n; i++)
            {
                phy2mlog[i] = i;
                ratio[i] = weight[i];
                heap[i] = i;
            }
            // The heap's top is the linear scan's pick: the largest ratio, lowest position on ties.
            var size = cap > 1 ? n : 0;
            PriorityHeap.BuildMax(heap[..size], ratio);
            for (var p = n; p < phy2mlog.Length; p++)
            {
                var best = heap[0];
                phy2mlog[p] = best;
                var c = ++count[best];
                if (c < cap) ratio[best] = weight[best] / c;
                else heap[0] = heap[--size];  // at the cap: leaves the heap
                if (size > 0) PriorityHeap.SiftDownMax(heap[..size], ratio, 0);
            }
        }
    }
}
