using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Paths, the real load files, GPU gating and random inputs shared by the tests.</summary>
internal static class TestSupport
{
    /// <summary>The repository root (the folder holding Eplb.sln).</summary>
    public static string RepoRoot { get; } = FindRepoRoot();

    /// <summary>The real SGLang DeepSeek-V3 dumps (override with EPLB_LOAD_DATA).</summary>
    public static string LoadDataDir =>
        Environment.GetEnvironmentVariable("EPLB_LOAD_DATA") is { Length: > 0 } custom
            ? custom
            : Path.Combine(RepoRoot, "data", "load-data", "sglang-deepseek-v3-r1");

    public static IEnumerable<string> LoadFileNames =>
        Directory.GetFiles(LoadDataDir, "*.json").Select(Path.GetFileNameWithoutExtension).OfType<string>().Order();

    /// <summary>One real dump with its dense (all-zero) layers dropped: 58 MoE layers x 256 experts.</summary>
    public static ExpertLoad RealLoad(string name) =>
        ExpertLoad.Read(Path.Combine(LoadDataDir, name + ".json")).WithoutEmptyLayers(out _);

    /// <summary>Skips the calling test (NUnit "ignored") unless the CUDA backend can run here.</summary>
    public static void RequireCuda()
    {
        var reason = EplbRuntime.UnavailableReason(Backend.Cuda);
        if (reason != null) Assert.Ignore(reason);
    }

    /// <summary>A fresh seed per run, printed so a failure can be replayed with EPLB_TEST_SEED.</summary>
    public static Random NewRandom()
    {
        var seed = Environment.GetEnvironmentVariable("EPLB_TEST_SEED") is { Length: > 0 } fixedSeed
            ? int.Parse(fixedSeed)
            : Random.Shared.Next();
        TestContext.Out.WriteLine($"EPLB_TEST_SEED={seed}");
        return new Random(seed);
    }

    /// <summary>
    /// One forward pass of routing on simulated ranks: each rank maps <paramref name="tokensPerRank"/>
    /// tokens per layer, their top-k drawn from <paramref name="load"/> (<see cref="SampleTopK"/>),
    /// through the real mapping kernel into its EPLB layer state, which records the load.
    /// </summary>
    public static void Forward(IEnumerable<SimulatedRank> ranks, Random random, Func<int, double[]> load, int tokensPerRank, int topK)
    {
        foreach (var rank in ranks)
        {
            using var idBuffer = new DeviceBuffer<int>(rank.Backend, (long)tokensPerRank * topK);
            using var physical = new DeviceBuffer<int>(rank.Backend, (long)tokensPerRank * topK);
            for (var layer = 0; layer < rank.Layers; layer++)
            {
                idBuffer.CopyFrom(SampleTopK(random, load(layer), tokensPerRank, topK), 0, rank.Stream);
                ExpertMapping.MapToPhysical(rank.Stream, idBuffer, topK, rank.LayerStates![layer], physical);
            }
            rank.Stream.Synchronize();
        }
    }

    /// <summary>Draws top-k distinct experts per token, proportional to a load row.</summary>
    public static int[] SampleTopK(Random random, ReadOnlySpan<double> load, int tokens, int topK)
    {
        var ids = new int[tokens * topK];
        var weights = new double[load.Length];
        for (var t = 0; t < tokens; t++)
        {
            load.CopyTo(weights);
            var total = weights.Sum();
            for (var k = 0; k < topK; k++)
            {
                var pick = random.NextDouble() * total;
                var e = 0;
                for (; e < weights.Length - 1; e++)
                {
                    pick -= weights[e];
                    if (pick < 0 && weights[e] > 0) break;
                }
                while (weights[e] == 0) e = (e + 1) % weights.Length;
                ids[t * topK + k] = e;
                total -= weights[e];
                weights[e] = 0;
            }
        }
        return ids;
    }

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Eplb.sln"))) return dir.FullName;
        throw new InvalidOperationException("cannot find the repository root (Eplb.sln) above " + AppContext.BaseDirectory);
    }
}

/// <summary>Host copies of one layer's placement tables, built from phy2log.</summary>
internal sealed record HostTables(int LogicalExperts, int Slots, int MaxReplicas, int[] Phy2Log, int[] Log2Phy, int[] LogCnt)
{
    public static HostTables FromPhy2Log(int[] phy2log, int numLogical, int maxReplicas = 0)
    {
        var logcnt = new int[numLogical];
        foreach (var e in phy2log) logcnt[e]++;
        var kmax = maxReplicas > 0 ? maxReplicas : logcnt.Max();
        var log2phy = Enumerable.Repeat(-1, numLogical * kmax).ToArray();
        var filled = new int[numLogical];
        for (var s = 0; s < phy2log.Length; s++)
        {
            var e = phy2log[s];
            if (filled[e] < kmax) log2phy[e * kmax + filled[e]] = s;
            filled[e]++;
        }
        return new HostTables(numLogical, phy2log.Length, kmax, phy2log, log2phy, logcnt);
    }

    /// <summary>Every expert at least once, the remaining slots random, shuffled.</summary>
    public static HostTables Random(Random random, int numLogical, int numPhysical, int extraCapacity = 0)
    {
        var phy2log = new int[numPhysical];
        for (var s = 0; s < numPhysical; s++) phy2log[s] = s < numLogical ? s : random.Next(numLogical);
        random.Shuffle(phy2log);
        var tables = FromPhy2Log(phy2log, numLogical);
        return extraCapacity > 0 ? FromPhy2Log(phy2log, numLogical, tables.MaxReplicas + extraCapacity) : tables;
    }
}
