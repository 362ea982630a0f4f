using System.Globalization;
using System.Reflection;
using Eplb.Migration;

namespace Eplb.Simulation;

/// <summary>
/// The time model that turns what the simulated ranks routed into seconds (docs/cost-model.md, where
/// every constant has its source). Per pass and MoE layer, each GPU's time is the larger of reading
/// the weights of its slots that got tokens and computing their (token, expert) pairs, plus its
/// dispatch and combine traffic (intra-node pairs over NVLink, cross-node pairs over the network,
/// the two links in parallel); the layer takes the slowest GPU. A pass adds each MoE layer's dense
/// part (attention and shared expert) and the model's other layers. Rearrangements cost time too:
/// sync stalls every rank for the bytes the busiest rank receives; async adds the staging traffic of
/// the layer committed in a pass to that pass. These are model figures, not measurements. Defaults:
/// DeepSeek-V3 (FP8) on H200 GPUs with DeepEP-class links; every constant can be overridden.
/// </summary>
public sealed record CostModel
{
    /// <summary>HBM copy bandwidth, bytes/s (4.3 TB/s measured on H200, docs/design.md §10).</summary>
    public double HbmBytesPerSecond { get; init; } = 4.3e12;

    /// <summary>Dense FP8 tensor throughput, FLOP/s (2 x the ~790 TFLOP/s bf16 GEMM measured on H200, docs/design.md §10).</summary>
    public double FlopsPerSecond { get; init; } = 1.58e15;

    /// <summary>Intra-node (NVLink) expert-parallel bandwidth per GPU, bytes/s (DeepEP: 153-158 GB/s).</summary>
    public double NvlinkBytesPerSecond { get; init; } = 150e9;

    /// <summary>Cross-node (RDMA) expert-parallel bandwidth per GPU, bytes/s (DeepEP: 43-58 GB/s).</summary>
    public double NetworkBytesPerSecond { get; init; } = 45e9;

    /// <summary>Bytes of one routed expert's weights with block scales (DeepSeek-V3 FP8: 3 x 7168 x 2048 + scales).</summary>
    public double ExpertBytes { get; init; } = MigrationPlanner.DeepSeekV3ExpertBytes;

    /// <summary>FLOPs of one (token, expert) pair: 2 x 3 x hidden 7168 x intermediate 2048.</summary>
    public double FlopsPerPair { get; init; } = 2.0 * 3 * 7168 * 2048;

    /// <summary>Bytes one (token, expert) pair sends in dispatch: 7168 FP8 values + 56 FP32 block scales.</summary>
    public double DispatchBytesPerPair { get; init; } = 7168 + 7168 / 128 * 4;

    /// <summary>Bytes one (token, expert) pair returns in combine: 7168 bf16 values.</summary>
    public double CombineBytesPerPair { get; init; } = 7168 * 2;

    /// <summary>Weight bytes each GPU reads per MoE layer outside the routed experts: MLA attention (187.1M) + shared expert (44.0M), FP8.</summary>
    public double DenseBytesPerLayer { get; init; } = 187_105_280 + 44_040_192;

    /// <summary>FLOPs per token per MoE layer outside the routed experts (2 x the dense weights).</summary>
    public double DenseFlopsPerToken { get; init; } = 2.0 * (187_105_280 + 44_040_192);

    /// <summary>KV-cache bytes per context token per layer a decode step reads (MLA latent 512 + rope 64, FP8).</summary>
    public double KvBytesPerContextToken { get; init; } = 576;

    /// <summary>Mean context of a decode request, tokens (the default decode dump: 1000 in + 1000 out).</summary>
    public double DecodeContextTokens { get; init; } = 1500;

    /// <summary>Weight bytes per pass outside the MoE layers: 3 dense layers and the LM head, FP8 (2.68 GB).</summary>
    public double OtherBytesPerPass { get; init; } = 3.0 * (187_105_280 + 3.0 * 7168 * 18432) + 7168.0 * 129280;

    /// <summary>DeepSeek-V3 (FP8) on H200 GPUs: the defaults.</summary>
    public static CostModel DeepSeekV3OnH200 { get; } = new();

    /// <summary>
    /// The settable constants by their snake_case names (<c>hbm_bytes_per_second</c>, ...), for the
    /// command line (<c>--cost name=value</c>) and the JSON settings.
    /// </summary>
    public static IReadOnlyList<string> Names { get; } = Properties().Select(p => SnakeCase(p.Name)).ToArray();

    /// <summary>The constants with their values, by snake_case name.</summary>
    public IReadOnlyDictionary<string, double> Values() =>
        Properties().ToDictionary(p => SnakeCase(p.Name), p => (double)p.GetValue(this)!);

    /// <summary>A copy with one constant replaced; the value must be finite and positive.</summary>
    /// <exception cref="ArgumentException">Unknown name or a value that is not a positive number.</exception>
    public CostModel With(string name, double value)
    {
        var property = Properties().FirstOrDefault(p => SnakeCase(p.Name) == name)
                       ?? throw new ArgumentException($"unknown cost constant '{name}' (known: {string.Join(", ", Names)})");
        if (!double.IsFinite(value) || value <= 0) throw new ArgumentException($"cost constant {name} must be a positive number (got {value.ToString(CultureInfo.InvariantCulture)})");
        var copy = this with { };
        property.SetValue(copy, value);
        return copy;
    }

    /// <summary>Seconds of one GPU's routed-expert work in one layer: weights of its slots with tokens, or their FLOPs, whichever is longer.</summary>
    public double ExpertSeconds(int activeSlots, long pairs) =>
        Math.Max(activeSlots * ExpertBytes / HbmBytesPerSecond, pairs * FlopsPerPair / FlopsPerSecond);

    /// <summary>
    /// Seconds of one GPU's dispatch plus combine in one layer: the larger of what it sends and
    /// receives on each link (full duplex), NVLink and network in parallel.
    /// </summary>
    public double CommunicationSeconds(long intraSent, long intraReceived, long crossSent, long crossReceived)
    {
        var intra = Math.Max(intraSent, intraReceived);
        var cross = Math.Max(crossSent, crossReceived);
        var bytesPerPair = DispatchBytesPerPair + CombineBytesPerPair;
        return Math.Max(intra * bytesPerPair / NvlinkBytesPerSecond, cross * bytesPerPair / NetworkBytesPerSecond);
    }

    /// <summary>Seconds of one MoE layer's dense part on a GPU with <paramref name="tokens"/> tokens (weights or FLOPs, plus the KV cache in decode).</summary>
    public double DenseSeconds(int tokens, bool decode) =>
        Math.Max(DenseBytesPerLayer / HbmBytesPerSecond, tokens * DenseFlopsPerToken / FlopsPerSecond)
        + (decode ? tokens * DecodeContextTokens * KvBytesPerContextToken / HbmBytesPerSecond : 0);

    /// <summary>Seconds of the layers outside the MoE layers in one pass.</summary>
    public double OtherSeconds => OtherBytesPerPass / HbmBytesPerSecond;

    /// <summary>Seconds to move expert weights: the busiest rank's intra-node and cross-node bytes over their links, in parallel.</summary>
    public double TransferSeconds(double intraBytes, double crossBytes) =>
        Math.Max(intraBytes / NvlinkBytesPerSecond, crossBytes / NetworkBytesPerSecond);

    private static IEnumerable<PropertyInfo> Properties() =>
        typeof(CostModel).GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.PropertyType == typeof(double) && p.CanWrite);

    private static string SnakeCase(string name) =>
        string.Concat(name.Select((c, i) => char.IsUpper(c) ? (i > 0 ? "_" : "") + char.ToLowerInvariant(c) : c.ToString()));
}
