using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The fast sorts and the vectorised greedy of <see cref="BalancedPacking"/> against the plain
/// definitions (a stable sort, a linear scan for the lightest open pack), on every code path:
/// counting rank, buckets, radix; one and four registers of packs, packs in memory; 128- and
/// 256-bit vectors; jobs in fours and the rest.
/// </summary>
public class BalancedPackingTests
{
    private static readonly int[] Sizes = [1, 2, 3, 7, 8, 9, 31, 32, 33, 64, 72, 127, 128, 129, 256, 288, 1000];

    /// <summary>Weights of one kind: spread, many ties, one value, zeros and +inf, or a range too wide for the buckets.</summary>
    private static float[] Weights(Random random, int n, int kind) => kind switch
    {
        0 => Enumerable.Range(0, n).Select(_ => (float)(random.NextDouble() * 1e5)).ToArray(),
        1 => Enumerable.Range(0, n).Select(_ => (float)random.Next(0, 4)).ToArray(),
        2 => Enumerable.Repeat(7f, n).ToArray(),
        3 => Enumerable.Range(0, n).Select(_ => random.Next(3) switch { 0 => 0f, 1 => float.PositiveInfinity, _ => (float)random.NextDouble() }).ToArray(),
        _ => Enumerable.Range(0, n).Select(i => i == 0 ? 1e30f : 100f + random.Next(0, 50)).ToArray(),
    };

    /// <summary>The definition: weight bits descending as unsigned integers, equal ones by ascending index.</summary>
    private static int[] StableDescending(float[] weight) =>
        Enumerable.Range(0, weight.Length).OrderByDescending(i => BitConverter.SingleToUInt32Bits(weight[i])).ThenBy(i => i).ToArray();

    [Test]
    public void EverySortGivesTheStableDescendingOrder()
    {
        var random = TestSupport.NewRandom();
        var packing = new BalancedPacking();
        var usedBuckets = 0;
        var refusedBuckets = 0;
        foreach (var n in Sizes)
            for (var kind = 0; kind < 5; kind++)
            {
                var weight = Weights(random, n, kind);
                var expected = StableDescending(weight);
                var order = new int[n];
                packing.Order(weight, order);
                Assert.That(order, Is.EqualTo(expected), $"Order n={n} kind={kind}");
                Array.Fill(order, -1);
                packing.RankOrder(weight, order);
                Assert.That(order, Is.EqualTo(expected), $"rank n={n} kind={kind}");
                Array.Fill(order, -1);
                packing.RadixOrder(weight, order);
                Assert.That(order, Is.EqualTo(expected), $"radix n={n} kind={kind}");
                Array.Fill(order, -1);
                if (n > 1 && packing.BucketOrder(weight, order))
                {
                    usedBuckets++;
                    Assert.That(order, Is.EqualTo(expected), $"buckets n={n} kind={kind}");
                }
                else if (n > 1)
                {
                    refusedBuckets++;
                }
            }
        // Both outcomes of the bucket sort were seen: spread loads sort in buckets, a lone outlier does not.
        Assert.That(usedBuckets, Is.GreaterThan(0));
        Assert.That(refusedBuckets, Is.GreaterThan(0));
    }

    /// <summary>The definition of the greedy: each item in order into the lightest pack with room (float32 sums, ties: lowest id).</summary>
    private static (int[] Pack, int[] Rank) LinearScan(int[] order, float[] weight, int packs)
    {
        var n = order.Length;
        var cap = n / packs;
        var pack = new int[n];
        var rank = new int[n];
        if (cap == 1)
        {
            for (var i = 0; i < n; i++) pack[i] = i;
            return (pack, rank);
        }
        var sum = new float[packs];
        var count = new int[packs];
        foreach (var item in order)
        {
            var best = -1;
            for (var p = 0; p < packs; p++)
                if (count[p] < cap && (best < 0 || sum[p] < sum[best])) best = p;
            pack[item] = best;
            rank[item] = count[best]++;
            sum[best] += weight[item];
        }
        return (pack, rank);
    }

    [TestCase(true)]
    [TestCase(false)]
    public void PackInOrderMakesTheLinearScansChoicesForAnyNumberOfJobsAndPacks(bool wideVectors)
    {
        var random = TestSupport.NewRandom();
        var packing = new BalancedPacking { WideVectors = wideVectors };
        foreach (var packs in new[] { 1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 40, 72 })
            foreach (var cap in new[] { 1, 2, 3, 9 })
                foreach (var jobs in new[] { 1, 3, 4, 5, 8 })
                {
                    var kind = random.Next(4);
                    var n = packs * cap;
                    var order = new int[jobs * n];
                    var weight = new float[jobs * n];
                    var expectedPack = new int[jobs * n];
                    var expectedRank = new int[jobs * n];
                    for (var j = 0; j < jobs; j++)
                    {
                        var w = Weights(random, n, kind);
                        var o = StableDescending(w);
                        var (p, r) = LinearScan(o, w, packs);
                        w.CopyTo(weight, j * n);
                        o.CopyTo(order, j * n);
                        p.CopyTo(expectedPack, j * n);
                        r.CopyTo(expectedRank, j * n);
                    }
                    var pack = Enumerable.Repeat(-1, jobs * n).ToArray();
                    var rank = Enumerable.Repeat(-1, jobs * n).ToArray();
                    packing.PackInOrder(order, weight, jobs, packs, pack, rank);
                    Assert.That(pack, Is.EqualTo(expectedPack), $"packs={packs} cap={cap} jobs={jobs} kind={kind}");
                    Assert.That(rank, Is.EqualTo(expectedRank), $"packs={packs} cap={cap} jobs={jobs} kind={kind}");
                }
    }

    [Test]
    public void PackIsSortThenGreedy()
    {
        var random = TestSupport.NewRandom();
        var packing = new BalancedPacking();
        foreach (var (n, packs) in new[] { (8, 4), (72, 8), (288, 32), (320, 40), (12, 12) })
        {
            var weight = Weights(random, n, random.Next(4));
            var (expectedPack, expectedRank) = LinearScan(StableDescending(weight), weight, packs);
            // Longer outputs than items are allowed; only the first n entries are written.
            var pack = new int[n + 3];
            var rank = new int[n + 3];
            packing.Pack(weight, packs, pack, rank);
            Assert.That(pack[..n], Is.EqualTo(expectedPack));
            Assert.That(rank[..n], Is.EqualTo(expectedRank));
        }
    }

    [Test]
    public void PackInOrderRejectsShapesItCannotFill()
    {
        var packing = new BalancedPacking();
        var e = Assert.Throws<ArgumentException>(() => packing.PackInOrder(new int[7], new float[7], 1, 3, new int[7], new int[7]))!;
        Assert.That(e.Message, Does.Contain("3 packs").And.Contain("order 7"));
        Assert.Throws<ArgumentException>(() => packing.PackInOrder(new int[8], new float[8], 1, 4, new int[6], new int[8]));
        // An item id outside its job is refused before anything is written out of place.
        Assert.Throws<ArgumentOutOfRangeException>(() => packing.PackInOrder([0, 9, 2, 3], new float[4], 1, 2, new int[4], new int[4]));
        int[] fourJobs = [.. Enumerable.Range(0, 16).Select(i => i % 4)];
        fourJobs[13] = 4;
        Assert.Throws<ArgumentOutOfRangeException>(() => packing.PackInOrder(fourJobs, new float[16], 4, 2, new int[16], new int[16]));
    }
}
