using System.Numerics;
using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// DeepSeek's expert-parallel load balancer (deepseek-ai/EPLB <c>rebalance_experts</c>) with exact
/// parity (docs/design.md §2.1): when <c>groups % nodes == 0</c> (and N is a multiple of groups) the
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
        var phy2log = GC.AllocateUninitializedArray<int>(checked(load.Layers * request.Slots));  // every slot is written
        // Layers go in batches of a few node packings each (Workspace); a batch is planned exactly
        // as its layers would be one by one.
        var perBatch = shape.LayersPerBatch;
        LayerParallel.For((load.Layers + perBatch - 1) / perBatch, request.MaxDegreeOfParallelism, () => new Workspace(shape),
            (b, ws) => ws.Rebalance(load, b * perBatch, Math.Min(perBatch, load.Layers - b * perBatch), phy2log));
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

        /// <summary>Layers planned together: enough for about four independent node packings.</summary>
        public int LayersPerBatch => Math.Max(1, Workspace.PackingsInFlight / Nodes);

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

    /// <summary>Scratch for one thread; <see cref="Rebalance"/> plans a batch of layers.</summary>
    /// <remarks>
    /// Speed (issue 14): each node sorts its experts by load once, and that order serves both later
    /// steps. Replication takes experts that have no extra replica yet from it in order (for them
    /// ratio = load, so the greedy never picks a lighter one first) and keeps only the replicated
    /// ones in a small heap. For packing, the experts without an extra replica are already in the
    /// order the packing needs; only the replicas of the replicated experts (a few dozen) are sorted
    /// and merged in. The packing itself, a chain of choices that each wait for the one before,
    /// runs for all (layer, node) pairs of a batch at once.
    /// </remarks>
    internal sealed class Workspace
    {
        /// <summary>Independent node packings a batch aims at (hides most of one choice's latency).</summary>
        public const int PackingsInFlight = 4;

        private readonly Shape _shape;
        private readonly float[] _weight;
        private readonly float[] _groupWeight;
        private readonly int[] _groupPack;
        private readonly int[] _groupRank;
        private readonly int[] _mlog2log;     // [layers of the batch][N]
        private readonly float[] _mlogWeight;  // the loads in node-local order
        private readonly int[] _byWeight;
        private readonly int[] _count;
        private readonly float[] _ratio;
        private readonly int[] _heap;
        private readonly int[] _replicaItem;     // the replicas of replicated experts: physical index
        private readonly float[] _replicaWeight;  // and ratio
        private readonly int[] _replicaOrder;
        private readonly int[] _phy2mlog;     // [jobs][R/nodes], a job being one node of one layer
        private readonly float[] _phyWeight;  // [jobs][R/nodes]
        private readonly int[] _phyOrder;     // [jobs][R/nodes]
        private readonly int[] _pack;         // [jobs][R/nodes]
        private readonly int[] _rank;         // [jobs][R/nodes]
        private readonly BalancedPacking _packing = new();

        public Workspace(Shape shape)
        {
            _shape = shape;
            var jobs = shape.LayersPerBatch * shape.Nodes;
            _weight = new float[shape.Experts];
            _groupWeight = new float[shape.Groups];
            _groupPack = new int[shape.Groups];
            _groupRank = new int[shape.Groups];
            _mlog2log = new int[shape.LayersPerBatch * shape.Experts];
            _mlogWeight = new float[shape.Experts];
            _byWeight = new int[shape.ExpertsPerNode];
            _count = new int[shape.ExpertsPerNode];
            _ratio = new float[shape.ExpertsPerNode];
            _heap = new int[shape.ExpertsPerNode];
            _replicaItem = new int[shape.SlotsPerNode];
            _replicaWeight = new float[shape.SlotsPerNode];
            _replicaOrder = new int[shape.SlotsPerNode];
            _phy2mlog = new int[jobs * shape.SlotsPerNode];
            _phyWeight = new float[jobs * shape.SlotsPerNode];
            _phyOrder = new int[jobs * shape.SlotsPerNode];
            _pack = new int[jobs * shape.SlotsPerNode];
            _rank = new int[jobs * shape.SlotsPerNode];
        }

        /// <summary>Plans layers <c>[first, first + layers)</c>: writes their rows of <paramref name="phy2log"/> (<c>[L][R]</c>).</summary>
        public void Rebalance(ExpertLoad load, int first, int layers, Span<int> phy2log)
        {
            var s = _shape;
            var perNode = s.SlotsPerNode;
            for (var i = 0; i < layers; i++)
            {
                ToFloat32(load.Layer(first + i), _weight);

                // Step 1: groups to nodes. With one group per node the packing is the identity
                // whatever the loads, so the group loads are only summed when they decide something.
                if (s.GroupsPerNode > 1) SumGroups(_weight, s.GroupSize, _groupWeight);
                _packing.Pack(_groupWeight, s.Nodes, _groupPack, _groupRank);
                // Node-local order: node k owns positions [k*N/nodes, (k+1)*N/nodes), groups in
                // pack-rank order, experts in original order inside a group.
                var mlog2log = _mlog2log.AsSpan(i * s.Experts, s.Experts);
                for (var g = 0; g < s.Groups; g++)
                {
                    var position = (_groupPack[g] * s.GroupsPerNode + _groupRank[g]) * s.GroupSize;
                    Sequence(mlog2log.Slice(position, s.GroupSize), g * s.GroupSize);
                    _weight.AsSpan(g * s.GroupSize, s.GroupSize).CopyTo(_mlogWeight.AsSpan(position));
                }

                for (var node = 0; node < s.Nodes; node++)
                {
                    var job = i * s.Nodes + node;
                    var nodeWeight = _mlogWeight.AsSpan(node * s.ExpertsPerNode, s.ExpertsPerNode);
                    var phy2mlog = _phy2mlog.AsSpan(job * perNode, perNode);
                    var phyWeight = _phyWeight.AsSpan(job * perNode, perNode);
                    // Step 2: replicate inside the node.
                    _packing.Order(nodeWeight, _byWeight);
                    var replicated = Replicate(nodeWeight, phy2mlog, s.ReplicaCap);
                    // Step 3 (below for all jobs at once): replicas to the node's GPUs, each
                    // weighing load / replicas (originals first: physical item p < n is expert p).
                    _ratio.CopyTo(phyWeight);
                    for (var p = s.ExpertsPerNode; p < perNode; p++) phyWeight[p] = _ratio[phy2mlog[p]];
                    if (s.NoDuplicate)
                        _packing.Pack(phyWeight, s.GpusPerNode, _pack.AsSpan(job * perNode, perNode), _rank.AsSpan(job * perNode, perNode), phy2mlog);
                    else
                        OrderReplicas(phy2mlog, replicated, _phyOrder.AsSpan(job * perNode, perNode));
                }
            }

            var jobs = layers * s.Nodes;
            if (!s.NoDuplicate)
                _packing.PackInOrder(_phyOrder.AsSpan(0, jobs * perNode), _phyWeight.AsSpan(0, jobs * perNode), jobs, s.GpusPerNode,
                    _pack.AsSpan(0, jobs * perNode), _rank.AsSpan(0, jobs * perNode));
            for (var job = 0; job < jobs; job++)
            {
                var i = job / s.Nodes;
                var node = job % s.Nodes;
                var mlog = _mlog2log.AsSpan(i * s.Experts + node * s.ExpertsPerNode, s.ExpertsPerNode);
                var phy2mlog = _phy2mlog.AsSpan(job * perNode, perNode);
                var pack = _pack.AsSpan(job * perNode, perNode);
                var rank = _rank.AsSpan(job * perNode, perNode);
                var nodeSlots = phy2log.Slice((first + i) * s.Slots + node * perNode, perNode);
                for (var p = 0; p < perNode; p++) nodeSlots[pack[p] * s.SlotsPerGpu + rank[p]] = mlog[phy2mlog[p]];
            }
        }

        /// <summary>The loads as float32, as the reference's <c>weight.float()</c>; -0 becomes +0.</summary>
        private static void ToFloat32(ReadOnlySpan<double> load, Span<float> weight)
        {
            var i = 0;
            var lanes = Vector<double>.Count;
            if (Vector.IsHardwareAccelerated)
            {
                // Narrow rounds to nearest even, as the scalar conversion does.
                for (; i + 2 * lanes <= load.Length; i += 2 * lanes)
                    (Vector.Narrow(new Vector<double>(load[i..]), new Vector<double>(load[(i + lanes)..])) + Vector<float>.Zero).CopyTo(weight[i..]);
            }
            for (; i < load.Length; i++) weight[i] = (float)load[i] + 0f;  // + 0f: -0 -> +0
        }

        /// <summary>Writes <c>first, first + 1, ...</c> into <paramref name="target"/>.</summary>
        private static void Sequence(Span<int> target, int first)
        {
            var i = 0;
            var lanes = Vector<int>.Count;
            for (; i + lanes <= target.Length; i += lanes) (Vector<int>.Indices + new Vector<int>(first + i)).CopyTo(target[i..]);
            for (; i < target.Length; i++) target[i] = first + i;
        }

        /// <summary>
        /// Group load: the float32 rounding of the double sum of its float32 loads in expert order
        /// (torch's float32 sum agrees except in the last bit beyond 2^24). Four groups at a time,
        /// each in its own order, so four additions are in flight instead of one.
        /// </summary>
        private static void SumGroups(ReadOnlySpan<float> weight, int groupSize, Span<float> groupWeight)
        {
            var g = 0;
            for (; g + 4 <= groupWeight.Length; g += 4)
            {
                var w0 = weight.Slice(g * groupSize, groupSize);
                var w1 = weight.Slice((g + 1) * groupSize, groupSize);
                var w2 = weight.Slice((g + 2) * groupSize, groupSize);
                var w3 = weight.Slice((g + 3) * groupSize, groupSize);
                double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                for (var j = 0; j < groupSize; j++)
                {
                    s0 += w0[j];
                    s1 += w1[j];
                    s2 += w2[j];
                    s3 += w3[j];
                }
                groupWeight[g] = (float)s0;
                groupWeight[g + 1] = (float)s1;
                groupWeight[g + 2] = (float)s2;
                groupWeight[g + 3] = (float)s3;
            }
            for (; g < groupWeight.Length; g++)
            {
                var sum = 0.0;
                foreach (var w in weight.Slice(g * groupSize, groupSize)) sum += w;
                groupWeight[g] = (float)sum;
            }
        }

        /// <summary>
        /// DeepSeek's <c>replicate_experts</c> on the node's experts (<paramref name="weight"/>, heaviest
        /// first in <c>_byWeight</c>): one replica each, then each extra replica to the expert with
        /// the largest float32 <c>load / replicas</c> (ties: lowest position), skipping experts at
        /// <paramref name="cap"/>. Physical item p &lt; n is the original of expert p; extras follow
        /// in creation order. An expert without an extra has ratio = load, so the best of them is the
        /// next one in <c>_byWeight</c>; only replicated experts need the heap. Leaves <c>_count</c>,
        /// <paramref name="phy2mlog"/> and the final ratios in <c>_ratio</c>; returns how many experts got an
        /// extra replica (the first ones of <c>_byWeight</c>).
        /// </summary>
        private int Replicate(ReadOnlySpan<float> weight, Span<int> phy2mlog, int cap)
        {
            var n = weight.Length;
            var count = _count.AsSpan();
            var ratio = _ratio.AsSpan();
            count.Fill(1);
            weight.CopyTo(ratio);
            for (var i = 0; i < n; i++) phy2mlog[i] = i;
            var heap = _heap.AsSpan();
            var size = 0;
            var next = 0;  // the heaviest expert without an extra replica is _byWeight[next]
            for (var p = n; p < phy2mlog.Length; p++)
            {
                int best;
                if (cap > 1 && next < n && (size == 0 || PriorityHeap.Above(_byWeight[next], heap[0], ratio)))
                {
                    best = _byWeight[next++];
                    if (++count[best] < cap)
                    {
                        ratio[best] = weight[best] / count[best];
                        heap[size++] = best;
                        PriorityHeap.SiftUpMax(heap[..size], ratio, size - 1);
                    }
                }
                else
                {
                    best = heap[0];
                    if (++count[best] < cap) ratio[best] = weight[best] / count[best];
                    else heap[0] = heap[--size];  // at the cap: leaves the heap
                    if (size > 0) PriorityHeap.SiftDownMax(heap[..size], ratio, 0);
                }
                phy2mlog[p] = best;
            }
            // An expert that reached the cap left the heap with its previous ratio.
            for (var k = 0; k < next; k++)
            {
                var e = _byWeight[k];
                ratio[e] = weight[e] / count[e];
            }
            return next;
        }

        /// <summary>
        /// The order in which the packing takes the node's replicas: by ratio descending, equal
        /// ratios by physical index (the stable sort of the reference). The experts without an
        /// extra replica are already in that order (<c>_byWeight</c> after the first
        /// <paramref name="replicated"/>: ratio = load, physical index = position); the replicas of
        /// the others, a few dozen at most, are ordered apart and merged in.
        /// </summary>
        private void OrderReplicas(ReadOnlySpan<int> phy2mlog, int replicated, Span<int> order)
        {
            var n = _ratio.Length;
            var ratio = _ratio.AsSpan(0, n);
            var byWeight = _byWeight.AsSpan(0, n);
            // The replicated experts' replicas in physical order: originals (ascending position),
            // then the extras.
            var items = replicated + phy2mlog.Length - n;
            var physical = _replicaItem.AsSpan(0, items);
            var weight = _replicaWeight.AsSpan(0, items);
            var m = 0;
            var count = _count.AsSpan(0, n);
            for (var e = 0; m < replicated; e++)
            {
                if (count[e] == 1) continue;
                physical[m] = e;
                weight[m++] = ratio[e];
            }
            for (var p = n; p < phy2mlog.Length; p++)
            {
                physical[m] = p;
                weight[m++] = ratio[phy2mlog[p]];
            }
            var byRatio = _replicaOrder.AsSpan(0, items);
            _packing.Order(weight, byRatio);

            // Merge by (ratio bits descending, physical index ascending).
            var q = 0;
            var b = replicated;
            var keyB = b < n ? Key(ratio[byWeight[b]], byWeight[b]) : ulong.MaxValue;
            foreach (var r in byRatio)
            {
                var key = Key(weight[r], physical[r]);
                while (keyB < key)
                {
                    order[q++] = byWeight[b++];
                    keyB = b < n ? Key(ratio[byWeight[b]], byWeight[b]) : ulong.MaxValue;
                }
                order[q++] = physical[r];
            }
            byWeight[b..].CopyTo(order[q..]);

            static ulong Key(float ratio, int p) => (ulong)~BitConverter.SingleToUInt32Bits(ratio) << 32 | (uint)p;
        }
    }
}
