using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// <c>locality</c> (docs/design.md §2.3): the primary copy of every expert stays on its group's node, as in
/// DeepSeek's hierarchical policy, but redundant replicas may go to any node. The hierarchical policy
/// gives each node exactly (R-N)/nodes spare slots for its own hot experts, which caps it at
/// 0.75-0.89 balancedness on the real DeepSeek-V3 loads; letting extras cross nodes removes the cap
/// while most traffic stays on the group's node.
/// <para>Per layer: (1) groups to nodes by DeepSeek's balanced packing; (2) replica counts by the
/// global greedy (largest load per replica first); (3) extras to nodes, heaviest first: to the
/// expert's home node while that node is below the mean node load, else to the lightest node with a
/// spare slot; (4) each node's replicas to its GPUs by balanced packing; (5) a local search
/// (swaps and retargets) lowers the heaviest GPU, keeping one replica of every expert at home and
/// pricing load served away from home at <see cref="AwayPrice"/>; (6) replicas away from home swap
/// back home wherever that raises no GPU above the maximum.</para>
/// When the groups cannot be split evenly over the nodes (or there is one node), no expert has a
/// home and the same steps give a global plan.
/// </summary>
public sealed class LocalityPolicy : IPlacementPolicy
{
    /// <inheritdoc/>
    public string Name => "locality";

    /// <summary>
    /// Price of load served away from its group's node, in units of the heaviest GPU's load: the
    /// search accepts a move that sends load x away only if it lowers the maximum by more than
    /// <c>AwayPrice * x</c>. 0 optimises balancedness alone; larger values keep more traffic
    /// node-local. The default 0.2 gives 0.961-0.981 balancedness with 91-96% node-local traffic on
    /// the real DeepSeek-V3 loads at 4 nodes x 8 GPUs, R = 288 (docs/benchmarks.md).
    /// </summary>
    public double AwayPrice { get; init; } = 0.2;

    /// <inheritdoc/>
    public ExpertPlacement Plan(ExpertLoad load, PlacementRequest request, ExpertPlacement? current = null)
    {
        ArgumentNullException.ThrowIfNull(request);
        request.Validate(load, current);
        var n = load.LogicalExperts;
        var cap = ReplicaCap(request, n);
        var phy2log = new int[(long)load.Layers * request.Slots];
        LayerParallel.For(load.Layers, request.MaxDegreeOfParallelism, () => new Workspace(n, request, cap, AwayPrice),
            (l, ws) => ws.Plan(load.Layer(l), phy2log.AsSpan(l * request.Slots, request.Slots)));
        var placement = ExpertPlacement.Create(load.Layers, n, request.Slots, request.Ranks, request.Nodes, request.MaxReplicas, phy2log, Name);
        return current != null && request.PreserveSlots ? placement.WithSlotsPreservedFrom(current) : placement;
    }

    /// <summary>Replicas per expert: Kmax when set, and one per GPU with noDuplicateOnRank.</summary>
    internal static int ReplicaCap(PlacementRequest request, int experts)
    {
        var cap = request.MaxReplicas > 0 ? request.MaxReplicas : int.MaxValue;
        return request.NoDuplicateOnRank ? Math.Min(cap, request.Ranks) : cap;
    }

    /// <summary>Scratch for one thread; <see cref="Plan"/> plans one layer.</summary>
    internal sealed class Workspace
    {
        private readonly int _experts, _slots, _gpus, _nodes, _groups, _cap;
        private readonly bool _localized, _noDuplicate;
        private readonly float[] _groupWeight;
        private readonly int[] _groupNode, _groupRank;
        private readonly int[] _home;
        private readonly double[] _weight;
        private readonly int[] _count;
        private readonly double[] _ratio;
        private readonly Extra[] _extras;
        private readonly double[] _nodeLoad;
        private readonly int[] _nodeRoom;
        private readonly int[] _onNode;        // [nodes][N]
        private readonly float[] _itemWeight;
        private readonly int[] _itemExpert, _pack, _rank;
        private readonly BalancedPacking _packing = new();
        private readonly LayerSearch _search;

        private record struct Extra(double Share, int Expert, int Node);

        public Workspace(int experts, PlacementRequest request, int cap, double awayPrice)
        {
            _experts = experts;
            _slots = request.Slots;
            _gpus = request.Ranks;
            _cap = cap;
            _noDuplicate = request.NoDuplicateOnRank;
            _localized = request.Nodes > 1 && request.IsHierarchical(experts);
            _nodes = _localized ? request.Nodes : 1;
            _groups = _localized ? request.Groups : 1;
            _groupWeight = new float[_groups];
            _groupNode = new int[_groups];
            _groupRank = new int[_groups];
            _home = new int[experts];
            _weight = new double[experts];
            _count = new int[experts];
            _ratio = new double[experts];
            _extras = new Extra[_slots - experts];
            _nodeLoad = new double[_nodes];
            _nodeRoom = new int[_nodes];
            _onNode = new int[_nodes * experts];
            _itemWeight = new float[_slots / _nodes];
            _itemExpert = new int[_slots / _nodes];
            _pack = new int[_slots / _nodes];
            _rank = new int[_slots / _nodes];
            _search = new LayerSearch(experts, _slots, _gpus, request.Nodes) { AwayPrice = awayPrice };
        }

        public void Plan(ReadOnlySpan<double> load, Span<int> phy2log)
        {
            var total = 0.0;
            for (var e = 0; e < _experts; e++)
            {
                _weight[e] = load[e] + 0.0;
                total += _weight[e];
            }

            // (1) Groups to nodes: DeepSeek's step 1.
            var groupSize = _experts / _groups;
            for (var g = 0; g < _groups; g++)
            {
                var sum = 0.0;
                for (var j = 0; j < groupSize; j++) sum += (float)_weight[g * groupSize + j];
                _groupWeight[g] = (float)sum;
            }
            _packing.Pack(_groupWeight, _nodes, _groupNode, _groupRank);
            for (var e = 0; e < _experts; e++) _home[e] = _groupNode[e / groupSize];

            // (2) Replica counts: the global greedy, largest load per replica first (ties: lowest id).
            var extras = _extras.AsSpan();
            for (var e = 0; e < _experts; e++)
            {
                _count[e] = 1;
                _ratio[e] = _cap > 1 ? _weight[e] : -1;
            }
            for (var x = 0; x < extras.Length; x++)
            {
                var best = 0;
                for (var e = 1; e < _experts; e++)
                    if (_ratio[e] > _ratio[best]) best = e;
                extras[x].Expert = best;
                var c = ++_count[best];
                _ratio[best] = c < _cap ? _weight[best] / c : -1;
            }

            // (3) Extras to nodes, heaviest first (ties: lowest expert): home while the home node is
            // below the mean node load, else the lightest node with a spare slot (and, with
            // noDuplicateOnRank, a GPU without the expert).
            var perNode = _slots / _nodes;
            var gpusPerNode = _gpus / _nodes;
            Array.Clear(_nodeLoad);
            Array.Clear(_onNode);
            for (var e = 0; e < _experts; e++)
            {
                _nodeLoad[_home[e]] += _weight[e] / _count[e];
                _onNode[_home[e] * _experts + e] = 1;
            }
            for (var k = 0; k < _nodes; k++) _nodeRoom[k] = perNode - _experts / _nodes;
            foreach (ref var extra in extras) extra.Share = _weight[extra.Expert] / _count[extra.Expert];
            extras.Sort(static (p, q) => p.Share != q.Share ? q.Share.CompareTo(p.Share) : p.Expert.CompareTo(q.Expert));
            var mean = total / _nodes;
            foreach (ref var extra in extras)
            {
                var e = extra.Expert;
                var h = _home[e];
                var node = -1;
                if (_nodeRoom[h] > 0 && _nodeLoad[h] + extra.Share <= mean && Fits(h, e, gpusPerNode)) node = h;
                for (var k = 0; k < _nodes && node < 0; k++)
                    if (_nodeRoom[k] > 0 && Fits(k, e, gpusPerNode) && (node < 0 || _nodeLoad[k] < _nodeLoad[node])) node = k;
                if (node < 0) node = MakeRoom(e, gpusPerNode, extras);
                extra.Node = node;
                _nodeRoom[node]--;
                _nodeLoad[node] += extra.Share;
                _onNode[node * _experts + e]++;
            }

            // (4) Each node's replicas to its GPUs.
            var perGpu = _slots / _gpus;
            for (var k = 0; k < _nodes; k++)
            {
                var items = 0;
                for (var e = 0; e < _experts; e++)
                {
                    if (_home[e] != k) continue;
                    _itemExpert[items] = e;
                    _itemWeight[items++] = (float)(_weight[e] / _count[e]);
                }
                foreach (var extra in extras)
                {
                    if (extra.Node != k) continue;
                    _itemExpert[items] = extra.Expert;
                    _itemWeight[items++] = (float)extra.Share;
                }
                _packing.Pack(_itemWeight.AsSpan(0, items), gpusPerNode, _pack, _rank, _noDuplicate ? _itemExpert.AsSpan(0, items) : default);
                for (var i = 0; i < items; i++) phy2log[k * perNode + _pack[i] * perGpu + _rank[i]] = _itemExpert[i];
            }

            // (5) Local search with away load priced; (6) then bring replicas home where free.
            _search.Reset(_weight, phy2log, _localized ? _home : default, _cap, _noDuplicate);
            _search.Improve();
            if (_localized) _search.ImproveLocality(_search.MaxLoad);
            _search.CopyTo(phy2log);
        }

        private bool Fits(int node, int e, int gpusPerNode) => !_noDuplicate || _onNode[node * _experts + e] < gpusPerNode;

        /// <summary>
        /// noDuplicateOnRank dead end: every node with a spare slot already has expert e on each of its
        /// GPUs. Some node k2 still has a GPU free of e (e has at most G replicas); move one of k2's
        /// extras that fits a node k with room there, and return k2 for e.
        /// </summary>
        private int MakeRoom(int e, int gpusPerNode, Span<Extra> extras)
        {
            for (var k2 = 0; k2 < _nodes; k2++)
            {
                if (!Fits(k2, e, gpusPerNode)) continue;
                foreach (ref var other in extras)
                {
                    if (other.Node != k2 || other.Expert == e) continue;
                    for (var k = 0; k < _nodes; k++)
                    {
                        if (_nodeRoom[k] == 0 || !Fits(k, other.Expert, gpusPerNode)) continue;
                        _onNode[k2 * _experts + other.Expert]--;
                        _onNode[k * _experts + other.Expert]++;
                        _nodeLoad[k2] -= other.Share;
                        _nodeLoad[k] += other.Share;
                        _nodeRoom[k]--;
                        _nodeRoom[k2]++;
                        other.Node = k;
                        return k2;
                    }
                }
            }
            throw new InvalidOperationException($"locality: no node can take another replica of expert {e} without a duplicate on a GPU");
        }
    }
}
