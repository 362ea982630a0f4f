using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>docs/design.md §1 written out independently of <see cref="ExpertPlacement"/>: invariants and metrics from phy2log alone.</summary>
internal static class PlacementOracle
{
    /// <summary>Every invariant of docs/design.md §1, checked from the raw tables.</summary>
    public static void AssertValid(ExpertPlacement p, int layers, int experts, int slots, int gpus)
    {
        Assert.That((p.Layers, p.LogicalExperts, p.Slots, p.Ranks), Is.EqualTo((layers, experts, slots, gpus)));
        Assert.That(p.SlotsPerRank * gpus, Is.EqualTo(slots));
        for (var l = 0; l < layers; l++)
        {
            var row = p.Phy2Log(l).ToArray();
            Assert.That(row, Has.Length.EqualTo(slots));
            Assert.That(row, Is.All.InRange(0, experts - 1), $"layer {l}: phy2log out of range");
            var count = new int[experts];
            foreach (var e in row) count[e]++;
            Assert.That(count, Is.All.GreaterThanOrEqualTo(1), $"layer {l}: an expert has no replica");
            Assert.That(p.LogCnt(l).ToArray(), Is.EqualTo(count), $"layer {l}: logcnt");
            Assert.That(count.Max(), Is.LessThanOrEqualTo(p.MaxReplicas), $"layer {l}: Kmax");
            var log2phy = p.Log2Phy(l);
            Assert.That(log2phy.Length, Is.EqualTo(experts * p.MaxReplicas));
            for (var e = 0; e < experts; e++)
            {
                var expected = Enumerable.Range(0, slots).Where(s => row[s] == e)
                    .Concat(Enumerable.Repeat(-1, p.MaxReplicas - count[e])).ToArray();
                Assert.That(log2phy.Slice(e * p.MaxReplicas, p.MaxReplicas).ToArray(), Is.EqualTo(expected), $"layer {l}: log2phy of expert {e}");
            }
        }
    }

    /// <summary>Each rank's load: the sum over its slots of weight / replicas.</summary>
    public static double[] RankLoads(int[] phy2log, ReadOnlySpan<double> weight, int gpus)
    {
        var count = new int[weight.Length];
        foreach (var e in phy2log) count[e]++;
        var perGpu = phy2log.Length / gpus;
        var loads = new double[gpus];
        for (var s = 0; s < phy2log.Length; s++) loads[s / perGpu] += weight[phy2log[s]] / count[phy2log[s]];
        return loads;
    }

    /// <summary>Sum over layers of mean / sum over layers of max.</summary>
    public static double Balancedness(ExpertPlacement p, ExpertLoad load)
    {
        double mean = 0, max = 0;
        for (var l = 0; l < p.Layers; l++)
        {
            var loads = RankLoads(p.Phy2Log(l).ToArray(), load.Layer(l), p.Ranks);
            mean += loads.Average();
            max += loads.Max();
        }
        return max > 0 ? mean / max : 0;
    }

    public static bool HasDuplicateOnGpu(ExpertPlacement p)
    {
        for (var l = 0; l < p.Layers; l++)
        {
            var row = p.Phy2Log(l).ToArray();
            for (var g = 0; g < p.Ranks; g++)
            {
                var mine = row.Skip(g * p.SlotsPerRank).Take(p.SlotsPerRank).ToArray();
                if (mine.Distinct().Count() != mine.Length) return true;
            }
        }
        return false;
    }

    /// <summary>Whether, in every layer, each group has a node that holds a replica of every one of its experts.</summary>
    public static bool GroupsHaveAHomeNode(ExpertPlacement p, int groups)
    {
        var groupSize = p.LogicalExperts / groups;
        var slotsPerNode = p.Slots / p.Nodes;
        for (var l = 0; l < p.Layers; l++)
        {
            var row = p.Phy2Log(l).ToArray();
            for (var g = 0; g < groups; g++)
            {
                var home = Enumerable.Range(0, p.Nodes).Any(node =>
                    Enumerable.Range(g * groupSize, groupSize).All(e => row.Skip(node * slotsPerNode).Take(slotsPerNode).Contains(e)));
                if (!home) return false;
            }
        }
        return true;
    }

    /// <summary>Random loads of assorted shapes: heavy-tailed, with zeros, flat, all zero.</summary>
    public static ExpertLoad RandomLoad(Random random, int layers, int experts)
    {
        var values = new double[layers * experts];
        var kind = random.Next(4);
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = kind switch
            {
                0 => Math.Round(Math.Exp(random.NextDouble() * 8)),
                1 => random.Next(3) == 0 ? 0 : random.Next(1, 1000),
                2 => 7,
                _ => 0,
            };
        }
        return new ExpertLoad(layers, experts, values);
    }
}
