using Eplb.Load;

namespace Eplb.Placement;

/// <summary>
/// <c>incremental</c> (docs/design.md §2.3, vLLM #24069): transfer-aware rebalancing. It first plans afresh
/// with a reference policy (<see cref="LocalityPolicy"/> by default) to learn what balancedness B is
/// reachable, then starts from the current placement and changes as few slots as it can to come
/// within <see cref="PlacementRequest.BalancednessTolerance"/> of B. Aggregate balancedness is
/// <c>sum(mean) / sum(max)</c> over layers, so the goal is a sum of layer maxima of at most
/// <c>freshSum * B / (B - tolerance)</c>, and moves compete across layers: a local search per layer
/// (<see cref="LayerSearch"/>: swaps and retargets) offers its best move, and the move with the most
/// load taken off a heaviest rank per slot changed wins, until the goal is met. Layers the search
/// leaves short take the fresh plan's layer (slot-preserved), most load saved per slot first, when
/// that fits <see cref="PlacementRequest.MaxChangedSlotsPerLayer"/>. With
/// <see cref="PlacementRequest.NoDuplicateOnRank"/>, duplicates of the current placement are removed
/// first. Without a current placement it starts from the initial one. When groups are split over
/// nodes, every expert keeps a replica on its group's home node (the node holding most of the
/// group's slots now).
/// </summary>
public sealed class IncrementalPolicy : IPlacementPolicy
{
    /// <summary>Creates the policy over a reference policy for the fresh plan (default: <see cref="LocalityPolicy"/>).</summary>
    public IncrementalPolicy(IPlacementPolicy? reference = null) => Reference = reference ?? new LocalityPolicy();

    /// <inheritdoc/>
    public string Name => "incremental";

    /// <summary>The policy whose fresh plan sets the balancedness to reach.</summary>
    public IPlacementPolicy Reference { get; }

    /// <inheritdoc/>
    public ExpertPlacement Plan(ExpertLoad load, PlacementRequest request, ExpertPlacement? current = null)
    {
        ArgumentNullException.ThrowIfNull(request);
        request.Validate(load, current);
        var n = load.LogicalExperts;
        current ??= ExpertPlacement.Initial(load.Layers, n, request.Slots, request.Ranks, request.Nodes, request.MaxReplicas);
        var fresh = Reference.Plan(load, request with { PreserveSlots = true }, current);

        var freshMax = new double[load.Layers];
        var rankLoads = new double[request.Ranks];
        var freshBalancedness = new Balancedness();
        for (var l = 0; l < load.Layers; l++)
        {
            fresh.RankLoads(load, l, rankLoads);
            freshMax[l] = Balancedness.MeanAndMax(rankLoads).Max;
            freshBalancedness.Add(rankLoads);
        }
        // Aggregate balancedness is sum(mean) / sum(max): a sum of maxima at most
        // freshSum * B / (B - tol) keeps it at or above B - tol.
        var freshSum = freshBalancedness.SumOfMaxima;
        var b = freshBalancedness.Value;
        var tolerance = request.BalancednessTolerance;
        var goal = b > tolerance ? freshSum * b / (b - tolerance) * (1 - 1e-12) : double.PositiveInfinity;
        var budget = request.MaxChangedSlotsPerLayer > 0 ? request.MaxChangedSlotsPerLayer : int.MaxValue;
        var cap = LocalityPolicy.ReplicaCap(request, n);
        var localized = request.Nodes > 1 && request.IsHierarchical(n);
        var layers = load.Layers;
        var searches = new LayerSearch?[layers];
        LayerParallel.For(layers, request.MaxDegreeOfParallelism, () => new int[n], (l, home) =>
        {
            var search = new LayerSearch(n, request.Slots, request.Ranks, request.Nodes);
            var now = current.Phy2Log(l);
            search.Reset(load.Layer(l), now, localized ? Homes(current, l, request.Groups, home) : default, cap, request.NoDuplicateOnRank);
            search.CountChangesFrom(now);
            // A duplicate the search cannot remove within the budget leaves the layer to the fresh plan (below).
            if (request.NoDuplicateOnRank && HasDuplicate(current, l) && (!search.RemoveDuplicates() || search.Changed > budget)) return;
            search.FindMove(0, budget);
            searches[l] = search;
        });

        // The aggregate depends on the layers only through the sum of their maxima, so moves compete
        // across layers: always take the one with the most load off a heaviest GPU per slot changed.
        var sumMax = 0.0;
        var queue = new PriorityQueue<int, (double, int)>();
        for (var l = 0; l < layers; l++)
        {
            var search = searches[l];
            sumMax += search?.MaxLoad ?? freshMax[l];
            if (search != null && search.MoveGain > 0) queue.Enqueue(l, (Priority(search), l));
        }
        // (Each layer's search descends lexicographically, so this ends; the count is only a guard.)
        for (var moves = 0L; moves < 16L * request.Slots * layers && sumMax > goal && queue.TryDequeue(out var layer, out _); moves++)
        {
            var search = searches[layer]!;
            var before = search.MaxLoad;
            search.ApplyMove();
            sumMax += search.MaxLoad - before;
            if (search.FindMove(0, budget)) queue.Enqueue(layer, (Priority(search), layer));
        }

        var phy2log = new int[(long)layers * request.Slots];
        var fallbacks = new List<(double Gain, int Layer)>();
        for (var l = 0; l < layers; l++)
        {
            var row = phy2log.AsSpan(l * request.Slots, request.Slots);
            if (searches[l] is { } search)
            {
                search.CopyTo(row);
                if (fresh.SlotsChanged(current, l) <= budget && search.MaxLoad > freshMax[l])
                    fallbacks.Add(((search.MaxLoad - freshMax[l]) / Math.Max(1, fresh.SlotsChanged(current, l) - search.Changed), l));
            }
            else if (fresh.SlotsChanged(current, l) <= budget) fresh.Phy2Log(l).CopyTo(row);
            else throw new ArgumentException($"incremental: layer {l} of the current placement has an expert twice on a GPU, " +
                                             $"and removing that needs more than maxChangedSlotsPerLayer = {budget} changes");
        }
        // Stuck short of the goal: replace layers by the fresh plan's, most load saved per extra slot first.
        fallbacks.Sort((x, y) => x.Gain != y.Gain ? y.Gain.CompareTo(x.Gain) : x.Layer.CompareTo(y.Layer));
        foreach (var (_, l) in fallbacks)
        {
            if (sumMax <= goal) break;
            sumMax += freshMax[l] - searches[l]!.MaxLoad;
            fresh.Phy2Log(l).CopyTo(phy2log.AsSpan(l * request.Slots, request.Slots));
        }
        return ExpertPlacement.Create(layers, n, request.Slots, request.Ranks, request.Nodes, request.MaxReplicas, phy2log, Name);
    }

    private static double Priority(LayerSearch search) => -search.MoveGain / Math.Max(search.MoveCost, 0.25);

    /// <summary>Each expert's home node: the node holding most slots of its group in the layer (lowest on ties).</summary>
    private static int[] Homes(ExpertPlacement placement, int layer, int groups, int[] home)
    {
        var n = placement.LogicalExperts;
        var groupSize = n / groups;
        Span<int> slots = stackalloc int[placement.Nodes];
        var row = placement.Phy2Log(layer);
        for (var g = 0; g < groups; g++)
        {
            slots.Clear();
            for (var s = 0; s < row.Length; s++)
                if (row[s] / groupSize == g) slots[placement.NodeOfRank(placement.RankOfSlot(s))]++;
            var best = 0;
            for (var k = 1; k < slots.Length; k++)
                if (slots[k] > slots[best]) best = k;
            home.AsSpan(g * groupSize, groupSize).Fill(best);
        }
        return home;
    }

    private static bool HasDuplicate(ExpertPlacement placement, int layer)
    {
        var row = placement.Phy2Log(layer);
        var perGpu = placement.SlotsPerRank;
        for (var g = 0; g < placement.Ranks; g++)
        {
            var mine = row.Slice(g * perGpu, perGpu);
            for (var i = 1; i < perGpu; i++)
                if (mine[..i].Contains(mine[i])) return true;
        }
        return false;
    }
}
