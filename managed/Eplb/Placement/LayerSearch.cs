namespace Eplb.Placement;

/// <summary>
/// Local search on one layer's placement that lowers the heaviest GPU's load (docs/design.md §1: balancedness
/// is mean / max, and the mean is fixed by the load). Two moves, both keeping R/G slots per GPU:
/// <list type="bullet">
/// <item><b>swap</b> a slot of the heaviest GPU with a lighter slot of another GPU;</item>
/// <item><b>retarget</b> a slot from an expert with several replicas to an expert on the heaviest GPU,
/// which shrinks that expert's share on every GPU holding it (and grows the donor's).</item>
/// </list>
/// A move is taken only when every GPU it touches ends below the old maximum, so the sorted vector
/// of GPU loads decreases lexicographically and the search ends. Constraints: every expert keeps a
/// replica, at most <c>cap</c> replicas, optionally no expert twice on a GPU, and optionally every
/// expert keeps one replica on its home node (<c>locality</c>); load served away from home can be
/// priced (<see cref="AwayPrice"/>). With an original placement, moves are charged the slots they
/// change against it (a slot changed back is a refund), ranked by load removed per slot changed,
/// and the search stops at a target maximum or a budget (<c>incremental</c>). Loads are double; a
/// touched GPU's load is summed afresh after each move, so no error accumulates. Deterministic:
/// candidates are scanned in slot order and the first best wins.
/// </summary>
internal sealed class LayerSearch
{
    private readonly int _experts, _slots, _gpus, _perGpu, _gpusPerNode, _capacity;
    private readonly int[] _slot;        // [R] expert of each slot
    private readonly int[] _count;       // [N] replicas
    private readonly int[] _replicas;    // [N][capacity] slots of each expert, unordered
    private readonly int[] _onGpu;       // [G][N] replicas of an expert on a GPU
    private readonly int[] _home;        // [N] home node, -1 for none
    private readonly int[] _homeCopies;  // [N] replicas on the home node
    private readonly double[] _weight;   // [N]
    private readonly double[] _share;    // [R] weight / count of the slot's expert
    private readonly double[] _load;     // [G]
    private readonly int[] _original;    // [R] what changes are counted against
    private readonly int[] _donors;      // scratch: slots that may give up their replica
    private int _cap;
    private bool _noDuplicate, _counting;

    public LayerSearch(int experts, int slots, int gpus, int nodes)
    {
        _experts = experts;
        _slots = slots;
        _gpus = gpus;
        _perGpu = slots / gpus;
        _gpusPerNode = gpus / nodes;
        _capacity = slots - experts + 1;
        _slot = new int[slots];
        _count = new int[experts];
        _replicas = new int[experts * _capacity];
        _onGpu = new int[gpus * experts];
        _home = new int[experts];
        _homeCopies = new int[experts];
        _weight = new double[experts];
        _share = new double[slots];
        _load = new double[gpus];
        _original = new int[slots];
        _donors = new int[slots];
    }

    /// <summary>
    /// Price of load served away from its home node, in units of the heaviest GPU's load: a move
    /// must lower the maximum by more than this times the away load it adds (0: locality is free).
    /// </summary>
    public double AwayPrice { get; set; }

    /// <summary>Slots changed against the placement given to <see cref="CountChangesFrom"/>.</summary>
    public int Changed { get; private set; }

    /// <summary>The heaviest GPU's load.</summary>
    public double MaxLoad
    {
        get
        {
            var max = 0.0;
            foreach (var v in _load) max = Math.Max(max, v);
            return max;
        }
    }

    /// <summary>
    /// Starts from <paramref name="phy2log"/> under <paramref name="weight"/>. <paramref name="home"/>
    /// (empty for none) keeps one replica of each expert on its node; <paramref name="cap"/> bounds
    /// replicas per expert.
    /// </summary>
    public void Reset(ReadOnlySpan<double> weight, ReadOnlySpan<int> phy2log, ReadOnlySpan<int> home, int cap, bool noDuplicate)
    {
        _cap = Math.Min(cap, _capacity);
        _noDuplicate = noDuplicate;
        _counting = false;
        Changed = 0;
        weight.CopyTo(_weight);
        phy2log.CopyTo(_slot);
        Array.Clear(_count);
        Array.Clear(_onGpu);
        Array.Clear(_homeCopies);
        if (home.IsEmpty) _home.AsSpan().Fill(-1);
        else home.CopyTo(_home);
        for (var s = 0; s < _slots; s++)
        {
            var e = _slot[s];
            _replicas[e * _capacity + _count[e]++] = s;
            _onGpu[GpuOf(s) * _experts + e]++;
            if (_home[e] == NodeOf(GpuOf(s))) _homeCopies[e]++;
        }
        for (var s = 0; s < _slots; s++) _share[s] = _weight[_slot[s]] / _count[_slot[s]];
        for (var g = 0; g < _gpus; g++) SumLoad(g);
    }

    /// <summary>From now on, moves are charged the slots they change against <paramref name="original"/>.</summary>
    public void CountChangesFrom(ReadOnlySpan<int> original)
    {
        original.CopyTo(_original);
        _counting = true;
        Changed = 0;
        for (var s = 0; s < _slots; s++)
            if (_slot[s] != _original[s]) Changed++;
    }

    public void CopyTo(Span<int> phy2log) => _slot.CopyTo(phy2log);

    /// <summary>
    /// Moves until none helps, the maximum is at most <paramref name="target"/>, or a move would
    /// exceed <paramref name="budget"/> changed slots (when counting).
    /// </summary>
    public void Improve(double target = 0, int budget = int.MaxValue)
    {
        // Within 0.1% of the mean (balancedness 0.999) the last moves would buy nothing measurable.
        var sum = 0.0;
        foreach (var v in _load) sum += v;
        target = Math.Max(target, sum / _gpus * (1 + GoodEnough));
        for (var moves = 0; moves < MaxMoves && FindMove(target, budget); moves++) ApplyMove();
    }

    /// <summary>
    /// A move must lower every GPU it touches by this fraction of the maximum at least: far above
    /// rounding, so a predicted gain is a real one and the search cannot cycle.
    /// </summary>
    private const double MinGain = 1e-9;

    /// <summary>Relative excess of the maximum over the mean at which a search stops.</summary>
    private const double GoodEnough = 1e-3;

    /// <summary>Moves per search; the lexicographic descent ends long before (a guard, not a tuning knob).</summary>
    private int MaxMoves => 16 * _slots;

    /// <summary>
    /// Finds the best move (kept for <see cref="ApplyMove"/>); false when none helps or the maximum
    /// is already at most <paramref name="target"/>. <see cref="MoveGain"/> and <see cref="MoveCost"/>
    /// describe it.
    /// </summary>
    public bool FindMove(double target, int budget)
    {
        var heaviest = 0;
        for (var g = 1; g < _gpus; g++)
            if (_load[g] > _load[heaviest]) heaviest = g;
        var max = _load[heaviest];
        _best = new Move();
        if (max <= target) return false;
        if (_counting) RankTop();
        FindSwap(heaviest, max, target, budget, ref _best);
        FindRetarget(heaviest, max, target, budget, ref _best);
        return _best.Kind != MoveKind.None;
    }

    /// <summary>
    /// The found move's gain: how far the layer's maximum drops (down to the target), plus a small
    /// credit for lowering the heaviest GPU when another GPU is as heavy.
    /// </summary>
    public double MoveGain => _best.Gain;

    /// <summary>Slots the found move changes against the original (negative: a refund).</summary>
    public int MoveCost => _best.Cost;

    /// <summary>Applies the move found by <see cref="FindMove"/>.</summary>
    public void ApplyMove()
    {
        Apply(_best);
        _best = new Move();
    }

    /// <summary>
    /// Brings replicas back to their home node without raising any GPU above <paramref name="ceiling"/>:
    /// swaps a replica that is away from home with a slot of its home node while that lowers the
    /// load served away from home (largest drop first).
    /// </summary>
    public void ImproveLocality(double ceiling)
    {
        var perNode = _gpusPerNode * _perGpu;
        for (var moves = 0; moves < MaxMoves; moves++)
        {
            int bestS = -1, bestT = -1;
            var bestGain = MinGain * ceiling;
            for (var s = 0; s < _slots; s++)
            {
                var e = _slot[s];
                var k = NodeOf(GpuOf(s));
                if (!Away(e, k)) continue;
                var h = _home[e];
                var gs = GpuOf(s);
                for (var t = h * perNode; t < (h + 1) * perNode; t++)
                {
                    var f = _slot[t];
                    if (f == e || (_home[f] == h && _homeCopies[f] < 2)) continue;
                    var gain = _share[s] - (Away(f, k) ? _share[t] : 0);
                    if (gain <= bestGain) continue;
                    var gt = GpuOf(t);
                    if (_load[gs] - _share[s] + _share[t] > ceiling || _load[gt] - _share[t] + _share[s] > ceiling) continue;
                    if (_noDuplicate && (_onGpu[gs * _experts + f] > 0 || _onGpu[gt * _experts + e] > 0)) continue;
                    (bestS, bestT, bestGain) = (s, t, gain);
                }
            }
            if (bestS < 0) return;
            Apply(new Move { Kind = MoveKind.Swap, From = bestS, To = bestT });
        }
    }

    /// <summary>
    /// Makes the placement free of duplicates on a GPU (for noDuplicateOnRank from a placement that
    /// has them): each second copy of an expert on a GPU swaps with a slot of another GPU where
    /// neither expert is yet (the swap with the lowest resulting pair maximum), or, failing that,
    /// becomes a replica of the expert that raises its GPU least. False when neither is possible.
    /// </summary>
    public bool RemoveDuplicates()
    {
        for (var s = 0; s < _slots; s++)
        {
            var e = _slot[s];
            var g = GpuOf(s);
            if (_onGpu[g * _experts + e] < 2) continue;
            int bestT = -1, bestB = -1;
            var bestMax = double.PositiveInfinity;
            for (var t = 0; t < _slots; t++)
            {
                var h = GpuOf(t);
                var f = _slot[t];
                if (h == g || f == e || _onGpu[g * _experts + f] > 0 || _onGpu[h * _experts + e] > 0) continue;
                if (NodeOf(g) != NodeOf(h) && ((_home[e] == NodeOf(g) && _homeCopies[e] < 2) || (_home[f] == NodeOf(h) && _homeCopies[f] < 2))) continue;
                var pairMax = Math.Max(_load[g] - _share[s] + _share[t], _load[h] - _share[t] + _share[s]);
                if (pairMax < bestMax) (bestT, bestMax) = (t, pairMax);
            }
            if (bestT < 0)
            {
                for (var b = 0; b < _experts; b++)
                {
                    if (_onGpu[g * _experts + b] > 0 || _count[b] >= _cap) continue;
                    var v = _load[g] - _share[s] + _weight[b] / (_count[b] + 1);
                    if (v < bestMax) (bestB, bestMax) = (b, v);
                }
                if (bestB < 0) return false;
            }
            Apply(bestT >= 0 ? new Move { Kind = MoveKind.Swap, From = s, To = bestT } : new Move { Kind = MoveKind.Retarget, From = s, To = bestB });
        }
        return true;
    }

    private enum MoveKind : byte { None, Swap, Retarget }

    private struct Move
    {
        public MoveKind Kind;
        public int From, To;  // swap: two slots; retarget: the slot and its new expert
        public double Rank;   // lower is better
        public double Gain;
        public int Cost;
    }

    private Move _best;

    // Counting mode ranks moves by how far the layer's maximum really drops, which needs the
    // heaviest GPU a move leaves untouched: the few heaviest GPUs are kept sorted for that.
    private const int TopCount = 8;
    private readonly int[] _top = new int[TopCount];
    private int _topCount;

    /// <summary>Weight of the heaviest GPU's own drop next to the layer maximum's (ties at the top would stall).</summary>
    private const double ProxyWeight = 0.05;

    /// <summary>The <see cref="TopCount"/> heaviest GPUs, heaviest first (lowest id on ties).</summary>
    private void RankTop()
    {
        _topCount = 0;
        for (var g = 0; g < _gpus; g++)
        {
            if (_topCount == TopCount && _load[g] <= _load[_top[TopCount - 1]]) continue;
            var i = _topCount < TopCount ? _topCount++ : TopCount - 1;
            for (; i > 0 && _load[_top[i - 1]] < _load[g]; i--) _top[i] = _top[i - 1];
            _top[i] = g;
        }
    }

    /// <summary>The heaviest load among GPUs a swap of GPUs x and y (or a retarget of a to b) leaves alone.</summary>
    private double UntouchedMax(int x, int y, int a, int b)
    {
        for (var i = 0; i < _topCount; i++)
        {
            var g = _top[i];
            if (g == x || g == y) continue;
            if (a >= 0 && (_onGpu[g * _experts + a] > 0 || _onGpu[g * _experts + b] > 0)) continue;
            return _load[g];
        }
        var max = 0.0;
        for (var g = 0; g < _gpus; g++)
        {
            if (g == x || g == y || (a >= 0 && (_onGpu[g * _experts + a] > 0 || _onGpu[g * _experts + b] > 0))) continue;
            max = Math.Max(max, _load[g]);
        }
        return max;
    }

    private void FindSwap(int heaviest, double max, double target, int budget, ref Move best)
    {
        var heavyNode = NodeOf(heaviest);
        for (var s = heaviest * _perGpu; s < (heaviest + 1) * _perGpu; s++)
        {
            var a = _slot[s];
            var shareA = _share[s];
            // The last home replica of a can only move inside its home node.
            var pinned = _home[a] == heavyNode && _homeCopies[a] < 2;
            var begin = pinned ? heavyNode * _gpusPerNode * _perGpu : 0;
            var end = pinned ? (heavyNode + 1) * _gpusPerNode * _perGpu : _slots;
            for (var t = begin; t < end; t++)
            {
                var shareB = _share[t];
                if (shareB >= shareA) continue;
                var h = GpuOf(t);
                var other = _load[h] - shareB + shareA;
                if (other >= max || h == heaviest) continue;
                var b = _slot[t];
                if (b == a) continue;
                var hNode = NodeOf(h);
                var away = 0.0;
                if (hNode != heavyNode)
                {
                    if (_home[b] == hNode && _homeCopies[b] < 2) continue;
                    away = shareA * (Flag(Away(a, hNode)) - Flag(Away(a, heavyNode)))
                         + shareB * (Flag(Away(b, heavyNode)) - Flag(Away(b, hNode)));
                }
                if (_noDuplicate && (_onGpu[heaviest * _experts + b] > 0 || _onGpu[h * _experts + a] > 0)) continue;
                var cost = _counting ? SlotCost(s, b) + SlotCost(t, a) : 0;
                if (_counting && Changed + cost > budget) continue;
                Consider(ref best, MoveKind.Swap, s, t, Math.Max(max - shareA + shareB, other), max, target, cost, away,
                    _counting ? UntouchedMax(heaviest, h, -1, -1) : 0);
            }
        }
    }

    private void FindRetarget(int heaviest, double max, double target, int budget, ref Move best)
    {
        // Slots that may give up their replica: its expert keeps another one (and one at home).
        var donors = 0;
        for (var s = 0; s < _slots; s++)
        {
            var a = _slot[s];
            if (_count[a] >= 2 && !(_home[a] == NodeOf(GpuOf(s)) && _homeCopies[a] < 2)) _donors[donors++] = s;
        }
        var first = heaviest * _perGpu;
        for (var i = first; i < first + _perGpu && donors > 0; i++)
        {
            var b = _slot[i];
            if (_count[b] >= _cap || _slot.AsSpan(first, i - first).Contains(b)) continue;
            var shareB = _weight[b] / _count[b];
            var shrunkB = _weight[b] / (_count[b] + 1);
            var dB = shrunkB - shareB;
            var replicasB = _replicas.AsSpan(b * _capacity, _count[b]);
            for (var d = 0; d < donors; d++)
            {
                var s = _donors[d];
                var a = _slot[s];
                var gs = GpuOf(s);
                if (a == b || (_noDuplicate && _onGpu[gs * _experts + b] > 0)) continue;
                var shareA = _weight[a] / _count[a];
                var dA = _weight[a] / (_count[a] - 1) - shareA;
                // After the move, GPU g carries: a's remaining replicas grown by dA each, b's replicas
                // shrunk by dB each, and on gs the new replica of b instead of the old one of a. A GPU
                // visited twice gets the same value twice.
                var newMax = 0.0;
                foreach (var r in _replicas.AsSpan(a * _capacity, _count[a]))
                {
                    var g = GpuOf(r);
                    var v = _load[g] + _onGpu[g * _experts + a] * dA + _onGpu[g * _experts + b] * dB;
                    if (g == gs) v += shrunkB - shareA - dA;
                    newMax = Math.Max(newMax, v);
                }
                if (newMax >= max) continue;
                foreach (var r in replicasB)
                {
                    var g = GpuOf(r);
                    if (_onGpu[g * _experts + a] == 0) newMax = Math.Max(newMax, _load[g] + _onGpu[g * _experts + b] * dB);
                }
                var cost = _counting ? SlotCost(s, b) : 0;
                if (_counting && Changed + cost > budget) continue;
                var away = 0.0;
                if (_home[a] >= 0 || _home[b] >= 0)
                {
                    var node = NodeOf(gs);
                    var awayA = _home[a] >= 0 ? _count[a] - _homeCopies[a] - Flag(Away(a, node)) : 0;
                    var awayB = _home[b] >= 0 ? _count[b] - _homeCopies[b] : 0;
                    away = awayA * dA - (Away(a, node) ? shareA : 0) + awayB * dB + (Away(b, node) ? shrunkB : 0);
                }
                // The heaviest GPU holds b, so it is among the GPUs above: all end below max.
                Consider(ref best, MoveKind.Retarget, s, b, newMax, max, target, cost, away,
                    _counting ? UntouchedMax(-1, -1, a, b) : 0);
            }
        }
    }

    /// <summary>Change in the changed-slot count if slot <paramref name="s"/> becomes expert <paramref name="e"/>.</summary>
    private int SlotCost(int s, int e) => Flag(e != _original[s]) - Flag(_slot[s] != _original[s]);

    private void Consider(ref Move best, MoveKind kind, int from, int to, double newMax, double max, double target, int cost, double away,
        double untouched)
    {
        var priced = newMax + AwayPrice * away;
        var bar = max * (1 - MinGain);
        if (newMax > bar || priced > bar) return;
        // Counting: how much the layer's maximum drops (down to the target), plus a little credit for
        // lowering the heaviest GPU when another one is as heavy, per slot changed; refunds and free
        // moves first. Otherwise: the lowest (priced) new maximum.
        var gain = max - Math.Max(Math.Max(priced, untouched), target) + ProxyWeight * (max - Math.Max(priced, target));
        var rank = _counting ? -gain / Math.Max(cost, 0.25) : priced;
        if (best.Kind == MoveKind.None || rank < best.Rank)
            best = new Move { Kind = kind, From = from, To = to, Rank = rank, Gain = gain, Cost = cost };
    }

    private void Apply(in Move move)
    {
        var s = move.From;
        var a = _slot[s];
        if (move.Kind == MoveKind.Swap)
        {
            var t = move.To;
            var b = _slot[t];
            Repoint(a, s, t);
            Repoint(b, t, s);
            Place(s, b);
            Place(t, a);
            _share[s] = _weight[b] / _count[b];
            _share[t] = _weight[a] / _count[a];
            SumLoad(GpuOf(s));
            SumLoad(GpuOf(t));
        }
        else
        {
            var e = move.To;
            var replicasA = _replicas.AsSpan(a * _capacity, _count[a]);
            replicasA[replicasA.IndexOf(s)] = replicasA[^1];
            _count[a]--;
            _replicas[e * _capacity + _count[e]++] = s;
            Place(s, e);
            foreach (var x in (ReadOnlySpan<int>)[a, e])
                foreach (var r in _replicas.AsSpan(x * _capacity, _count[x])) _share[r] = _weight[x] / _count[x];
            foreach (var x in (ReadOnlySpan<int>)[a, e])
                foreach (var r in _replicas.AsSpan(x * _capacity, _count[x])) SumLoad(GpuOf(r));
        }
    }

    private void Repoint(int e, int from, int to)
    {
        var replicas = _replicas.AsSpan(e * _capacity, _count[e]);
        replicas[replicas.IndexOf(from)] = to;
    }

    /// <summary>Puts expert <paramref name="e"/> into slot <paramref name="s"/>; replica lists are the caller's.</summary>
    private void Place(int s, int e)
    {
        var old = _slot[s];
        var g = GpuOf(s);
        var node = NodeOf(g);
        if (_counting) Changed += SlotCost(s, e);
        _onGpu[g * _experts + old]--;
        _onGpu[g * _experts + e]++;
        if (_home[old] == node) _homeCopies[old]--;
        if (_home[e] == node) _homeCopies[e]++;
        _slot[s] = e;
    }

    private void SumLoad(int g)
    {
        var sum = 0.0;
        foreach (var v in _share.AsSpan(g * _perGpu, _perGpu)) sum += v;
        _load[g] = sum;
    }

    private bool Away(int e, int node) => _home[e] >= 0 && _home[e] != node;

    private int GpuOf(int slot) => slot / _perGpu;

    private int NodeOf(int gpu) => gpu / _gpusPerNode;

    private static int Flag(bool value) => value ? 1 : 0;
}
