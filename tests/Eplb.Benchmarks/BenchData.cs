namespace Eplb.Benchmarks;

/// <summary>The real SGLang DeepSeek-V3 dumps shipped in data/load-data.</summary>
internal static class BenchData
{
    public static string LoadDataDir
    {
        get
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
                if (File.Exists(Path.Combine(dir.FullName, "Eplb.sln")))
                    return Path.Combine(dir.FullName, "data", "load-data", "sglang-deepseek-v3-r1");
            throw new InvalidOperationException("cannot find the repository root (Eplb.sln)");
        }
    }

    /// <summary>A dump's 58 MoE layers (dense layers dropped).</summary>
    public static ExpertLoad Load(string name) =>
        ExpertLoad.Read(Path.Combine(LoadDataDir, name + ".json")).WithoutEmptyLayers(out _);
}
