using System.Text;
using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>How a router turns logits into expert scores (docs/design.md §4.1).</summary>
public enum RoutingScore
{
    /// <summary><c>s = sigmoid(logit)</c>: DeepSeek-V3 (noaux_tc).</summary>
    Sigmoid = 0,
    /// <summary><c>s = sqrt(softplus(logit))</c>: DeepSeek-V4.</summary>
    SqrtSoftplus = 1,
    /// <summary>
    /// Mixtral/Qwen: the top-k logits, weighted by <c>softmax(logits)</c> at them (over the top-k only
    /// when <see cref="RouterOptions.Renormalize"/>). No bias, no groups, no hash form.
    /// </summary>
    Softmax = 2,
}

/// <summary>
/// What a MoE layer's router computes (<c>eplb_router_config_t</c>). Validated by
/// <see cref="Validate"/>, which <see cref="Router"/>'s constructor calls.
/// </summary>
public sealed record RouterOptions
{
    /// <summary>N, the layer's logical (routed) experts: 1 to 1024.</summary>
    public required int LogicalExperts { get; init; }

    /// <summary>K, experts per token: 1 to min(N, 32).</summary>
    public required int TopK { get; init; }

    /// <summary>The score function. Default <see cref="RoutingScore.SqrtSoftplus"/> (DeepSeek-V4).</summary>
    public RoutingScore Score { get; init; } = RoutingScore.SqrtSoftplus;

    /// <summary>
    /// Group-limited selection (DeepSeek-V3): N / Groups consecutive experts form a group, scored
    /// by the sum of its two largest <c>s + bias</c>; only the <see cref="TopKGroups"/> best groups
    /// are routed to. 1 (the default) turns it off. Sigmoid and sqrtsoftplus scored top-k only.
    /// </summary>
    public int Groups { get; init; } = 1;

    /// <summary>Groups kept by group-limited selection: 1 to <see cref="Groups"/>.</summary>
    public int TopKGroups { get; init; } = 1;

    /// <summary>Divide the top-k weights by their sum (+1e-20). Default true, as DeepSeek.</summary>
    public bool Renormalize { get; init; } = true;

    /// <summary>
    /// Multiply the weights by <see cref="RoutedScalingFactor"/> (default true, as DeepSeek's
    /// reference and vLLM; SGLang scales the expert output instead).
    /// </summary>
    public bool ScaleInWeights { get; init; } = true;

    /// <summary>The routed scaling factor: finite and positive when <see cref="ScaleInWeights"/>. Default 1.</summary>
    public float RoutedScalingFactor { get; init; } = 1f;

    /// <summary>
    /// DeepSeek-V3/R1: 256 experts, top-8, sigmoid, 8 groups of which 4 are kept, renormalised,
    /// scaled by 2.5 (the checkpoint's config.json).
    /// </summary>
    public static RouterOptions DeepSeekV3 => new()
    {
        LogicalExperts = 256,
        TopK = 8,
        Score = RoutingScore.Sigmoid,
        Groups = 8,
        TopKGroups = 4,
        RoutedScalingFactor = 2.5f,
    };

    /// <summary>
    /// Throws one <see cref="ArgumentException"/> listing every violated rule, in the names of these
    /// properties. The rules and limits are the ABI's (<c>eplb_routing.h</c>: the
    /// <c>EPLB_ROUTING_MAX_*</c> constants the bindings generate); libeplb checks them again on every
    /// call, so the two can only differ in wording.
    /// </summary>
    public void Validate()
    {
        var problems = new List<string>();
        if (LogicalExperts is < 1 or > NativeConstants.EPLB_ROUTING_MAX_EXPERTS)
            problems.Add($"LogicalExperts must be in [1, {NativeConstants.EPLB_ROUTING_MAX_EXPERTS}] (got {LogicalExperts})");
        var maxTopK = Math.Min(Math.Max(LogicalExperts, 1), NativeConstants.EPLB_ROUTING_MAX_TOP_K);
        if (TopK < 1 || TopK > maxTopK) problems.Add($"TopK must be in [1, min(LogicalExperts, {NativeConstants.EPLB_ROUTING_MAX_TOP_K}) = {maxTopK}] (got {TopK})");
        if (!Enum.IsDefined(Score)) problems.Add($"Score {(int)Score} is not a RoutingScore");
        if (Groups is < 1 or > NativeConstants.EPLB_ROUTING_MAX_GROUPS)
            problems.Add($"Groups must be in [1, {NativeConstants.EPLB_ROUTING_MAX_GROUPS}] (got {Groups})");
        else if (LogicalExperts > 0 && LogicalExperts % Groups != 0)
            problems.Add($"Groups = {Groups} does not divide LogicalExperts = {LogicalExperts}");
        else if (Groups > 1 && Score == RoutingScore.Softmax)
            problems.Add($"Groups = {Groups}: group-limited selection needs a Sigmoid or SqrtSoftplus score, not Softmax");
        if (TopKGroups < 1 || TopKGroups > Math.Max(Groups, 1))
            problems.Add($"TopKGroups must be in [1, Groups = {Groups}] (got {TopKGroups})");
        else if (Groups >= 1 && LogicalExperts > 0 && LogicalExperts % Groups == 0 && TopK > TopKGroups * (LogicalExperts / Groups))
            problems.Add($"TopK = {TopK} exceeds the {TopKGroups * (LogicalExperts / Groups)} experts of the {TopKGroups} kept groups");
        if (ScaleInWeights && !(float.IsFinite(RoutedScalingFactor) && RoutedScalingFactor > 0))
            problems.Add($"RoutedScalingFactor must be finite and > 0 when ScaleInWeights (got {RoutedScalingFactor})");
        if (problems.Count > 0)
            throw new ArgumentException("invalid router options: " + string.Join("; ", problems));
    }

    internal eplb_router_config_t ToNative() => new()
    {
        num_experts = LogicalExperts,
        top_k = TopK,
        score = (int)Score,
        num_groups = Groups,
        topk_groups = TopKGroups,
        renormalize = Renormalize ? 1 : 0,
        scale_in_weights = ScaleInWeights ? 1 : 0,
        routed_scaling_factor = RoutedScalingFactor,
    };
}

/// <summary>
/// The router of one MoE layer (docs/design.md §4): scored top-k (<see cref="Route(ComputeStream, DeviceSlice{float}, DeviceSlice{int}, DeviceSlice{float}, DeviceSlice{float}, DeviceSlice{int})"/>)
/// or DeepSeek-V4 hash routing (<see cref="RouteByHash(ComputeStream, DeviceSlice{float}, DeviceSlice{long}, DeviceSlice{int}, DeviceSlice{int}, DeviceSlice{float}, DeviceSlice{int})"/>),
/// each one kernel with the EPLB epilogue fused: logical ids become physical slots through
/// <see cref="LayerState"/> (TokenHash replica choice), padding rows become -1, and the layer's
/// counters record the load when its record flag is set. With <see cref="LayerState"/> null, EPLB is
/// off: the outputs are the logical ids and nothing is recorded.
/// </summary>
/// <remarks>
/// Ids equal the CPU reference exactly on CUDA (ties: the lower expert id), and weights bit for bit:
/// both backends compute the scores with the same round-to-nearest operations. NaN logits are never
/// preferred over numbers and weigh 0; +-inf logits count as +-FLT_MAX.
/// </remarks>
public sealed unsafe class Router
{
    /// <summary>Creates a router; <paramref name="layerState"/> null means EPLB off.</summary>
    /// <exception cref="ArgumentException">The options are invalid, or the EPLB state has another number of experts.</exception>
    public Router(RouterOptions options, EplbLayerState? layerState = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (layerState is not null && layerState.LogicalExperts != options.LogicalExperts)
            throw new ArgumentException(
                $"the EPLB state has {layerState.LogicalExperts} logical experts, the router {options.LogicalExperts}", nameof(layerState));
        Options = options;
        LayerState = layerState;
    }

    /// <summary>What the router computes.</summary>
    public RouterOptions Options { get; }

    /// <summary>The layer's EPLB tables and counters, or null when EPLB is off.</summary>
    public EplbLayerState? LayerState { get; }

    /// <summary>
    /// On CUDA, wait for the kernel after each launch and throw when it flagged bad input
    /// (<see cref="ComputeStream.CheckDeviceErrors"/>). Default true. Turn it off on the hot path and
    /// under CUDA graph capture (the check synchronises), and check the stream yourself.
    /// </summary>
    public bool CheckDeviceErrors { get; init; } = true;

    /// <summary>
    /// Scored top-k routing of <c>T = logits.Length / N</c> tokens, queued on <paramref name="stream"/>.
    /// </summary>
    /// <param name="stream">Where the kernel runs; every view must be on its backend.</param>
    /// <param name="logits"><c>[T][N]</c> router logits.</param>
    /// <param name="topkIds"><c>[T][K]</c> output: physical slots (logical ids with EPLB off), -1 for padding rows.</param>
    /// <param name="topkWeights"><c>[T][K]</c> output weights, 0 for padding rows.</param>
    /// <param name="bias"><c>[N]</c> selection bias (e_score_correction_bias), or default for none. Not for softmax.</param>
    /// <param name="numUnpadded">One element: rows at or after it are padding. Default: every row is real.</param>
    /// <exception cref="ArgumentException">Lengths disagree, a view is on another backend, or (CPU) a table entry is out of range.</exception>
    /// <exception cref="EplbException">A CUDA failure, or (with <see cref="CheckDeviceErrors"/>) a bad table entry flagged on the device.</exception>
    public void Route(ComputeStream stream, DeviceSlice<float> logits, DeviceSlice<int> topkIds, DeviceSlice<float> topkWeights,
        DeviceSlice<float> bias = default, DeviceSlice<int> numUnpadded = default)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var tokens = CheckCommon(stream, logits, topkIds, topkWeights, numUnpadded);
        if (!bias.IsNull)
        {
            CheckBias(bias.Length);
            KernelArguments.SameBackend(stream, bias, nameof(bias));
        }

        var config = Options.ToNative();
        using var leases = new LeaseScope();
        var map = LayerState?.ToNative(leases) ?? default;
        EplbException.ThrowIfFailed(NativeMethods.eplb_route_topk(leases.Stream(stream), &config, leases.Pointer(logits), leases.Pointer(bias),
            tokens, LayerState is null ? null : &map, leases.Pointer(numUnpadded), leases.Pointer(topkIds), leases.Pointer(topkWeights)));
        AfterLaunch(stream);
    }

    /// <summary>
    /// DeepSeek-V4 hash routing of <c>T = logits.Length / N</c> tokens, queued on <paramref name="stream"/>:
    /// expert <c>k</c> of token <c>t</c> is <c>tid2eid[tokenIds[t]][k]</c>, weighted by the score of its logit.
    /// </summary>
    /// <param name="stream">Where the kernel runs; every view must be on its backend.</param>
    /// <param name="logits"><c>[T][N]</c> router logits (only the K chosen entries of a row are read).</param>
    /// <param name="tokenIds"><c>[T]</c> token ids, each in <c>[0, vocab)</c>.</param>
    /// <param name="tid2eid"><c>[vocab][K]</c> hash table, entries in <c>[0, N)</c>.</param>
    /// <param name="topkIds"><c>[T][K]</c> output: physical slots (logical ids with EPLB off), -1 for padding rows.</param>
    /// <param name="topkWeights"><c>[T][K]</c> output weights, 0 for padding rows.</param>
    /// <param name="numUnpadded">One element: rows at or after it are padding (never checked). Default: every row is real.</param>
    /// <exception cref="ArgumentException">Lengths disagree, or (CPU) a token id or used table entry is out of range; nothing is written.</exception>
    /// <exception cref="EplbException">A CUDA failure, or (with <see cref="CheckDeviceErrors"/>) a bad token id or table entry flagged on the device.</exception>
    public void RouteByHash(ComputeStream stream, DeviceSlice<float> logits, DeviceSlice<long> tokenIds, DeviceSlice<int> tid2eid,
        DeviceSlice<int> topkIds, DeviceSlice<float> topkWeights, DeviceSlice<int> numUnpadded = default)
    {
        ArgumentNullException.ThrowIfNull(stream);
        CheckHashOptions();
        var tokens = CheckCommon(stream, logits, topkIds, topkWeights, numUnpadded);
        KernelArguments.Require(tokenIds, nameof(tokenIds));
        KernelArguments.Require(tid2eid, nameof(tid2eid));
        var vocab = CheckHashTables(tokens, tokenIds.Length, tid2eid.Length);
        KernelArguments.SameBackend(stream, tokenIds, nameof(tokenIds));
        KernelArguments.SameBackend(stream, tid2eid, nameof(tid2eid));

        var config = Options.ToNative();
        using var leases = new LeaseScope();
        var map = LayerState?.ToNative(leases) ?? default;
        EplbException.ThrowIfFailed(NativeMethods.eplb_route_hash(leases.Stream(stream), &config, leases.Pointer(logits), leases.Pointer(tokenIds),
            leases.Pointer(tid2eid), vocab, tokens, LayerState is null ? null : &map, leases.Pointer(numUnpadded), leases.Pointer(topkIds),
            leases.Pointer(topkWeights)));
        AfterLaunch(stream);
    }

    /// <summary>
    /// Host-memory form of scored top-k routing on <paramref name="backend"/> (CPU: directly on the
    /// spans; CUDA: copies in, runs the kernel, checks the device error word, copies out). The EPLB
    /// state, if any, must live on that backend. <paramref name="bias"/> empty means none. Nothing is
    /// written when an argument is bad.
    /// </summary>
    /// <exception cref="ArgumentException">Lengths disagree, the EPLB state lives on another backend, or a table entry is out of range.</exception>
    /// <exception cref="EplbException">A CUDA failure, or a bad table entry flagged on the device.</exception>
    public void Route(ReadOnlySpan<float> logits, Span<int> topkIds, Span<float> topkWeights, ReadOnlySpan<float> bias = default,
        int? numUnpadded = null, Backend backend = Backend.Cpu)
    {
        var tokens = CheckHostSpans(logits.Length, topkIds.Length, topkWeights.Length, backend);
        if (!bias.IsEmpty) CheckBias(bias.Length);
        if (backend == Backend.Cuda)
        {
            using var device = new DeviceRoundTrip();
            var ids = device.Allocate<int>(topkIds.Length);
            var weights = device.Allocate<float>(topkWeights.Length);
            Route(device.Stream, device.Upload(logits), ids, weights, bias.IsEmpty ? default : device.Upload(bias).AsSlice(),
                Unpadded(device, numUnpadded));
            device.Download(ids, topkIds);
            device.Download(weights, topkWeights);
            return;
        }
        var config = Options.ToNative();
        var unpadded = numUnpadded ?? 0;
        using var leases = new LeaseScope();
        var map = LayerState?.ToNative(leases) ?? default;
        fixed (float* logitsPointer = logits, biasPointer = bias, weightsPointer = topkWeights)
        fixed (int* idsPointer = topkIds)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_route_topk(leases.Stream(ComputeStream.Cpu), &config, logitsPointer,
                bias.IsEmpty ? null : biasPointer, tokens, LayerState is null ? null : &map, numUnpadded.HasValue ? &unpadded : null,
                idsPointer, weightsPointer));
        }
    }

    /// <summary>
    /// Host-memory form of hash routing on <paramref name="backend"/> (CPU: directly on the spans;
    /// CUDA: copies in, runs the kernel, checks the device error word, copies out). The EPLB state, if
    /// any, must live on that backend. Nothing is written when an argument is bad, including a token
    /// id or table entry out of range.
    /// </summary>
    /// <exception cref="ArgumentException">Lengths disagree, the EPLB state lives on another backend, or a token id or used table entry is out of range.</exception>
    /// <exception cref="EplbException">A CUDA failure, or a bad token id or table entry flagged on the device.</exception>
    public void RouteByHash(ReadOnlySpan<float> logits, ReadOnlySpan<long> tokenIds, ReadOnlySpan<int> tid2eid, Span<int> topkIds,
        Span<float> topkWeights, int? numUnpadded = null, Backend backend = Backend.Cpu)
    {
        CheckHashOptions();
        var tokens = CheckHostSpans(logits.Length, topkIds.Length, topkWeights.Length, backend);
        var vocab = CheckHashTables(tokens, tokenIds.Length, tid2eid.Length);
        if (backend == Backend.Cuda)
        {
            using var device = new DeviceRoundTrip();
            var ids = device.Allocate<int>(topkIds.Length);
            var weights = device.Allocate<float>(topkWeights.Length);
            RouteByHash(device.Stream, device.Upload(logits), device.Upload(tokenIds), device.Upload(tid2eid), ids, weights,
                Unpadded(device, numUnpadded));
            device.Download(ids, topkIds);
            device.Download(weights, topkWeights);
            return;
        }
        var config = Options.ToNative();
        var unpadded = numUnpadded ?? 0;
        using var leases = new LeaseScope();
        var map = LayerState?.ToNative(leases) ?? default;
        fixed (float* logitsPointer = logits, weightsPointer = topkWeights)
        fixed (long* tokensPointer = tokenIds)
        fixed (int* tablePointer = tid2eid, idsPointer = topkIds)
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_route_hash(leases.Stream(ComputeStream.Cpu), &config, logitsPointer, tokensPointer,
                tablePointer, vocab, tokens, LayerState is null ? null : &map, numUnpadded.HasValue ? &unpadded : null, idsPointer, weightsPointer));
        }
    }

    private static DeviceSlice<int> Unpadded(DeviceRoundTrip device, int? numUnpadded) =>
        numUnpadded.HasValue ? device.Upload<int>([numUnpadded.Value]).AsSlice() : default;

    /// <inheritdoc/>
    public override string ToString() =>
        new StringBuilder($"Router(N={Options.LogicalExperts}, K={Options.TopK}, {Options.Score}")
            .Append(Options.Groups > 1 ? $", groups {Options.TopKGroups}/{Options.Groups}" : "")
            .Append(LayerState is null ? ", EPLB off)" : $", EPLB R={LayerState.Slots})")
            .ToString();

    private long CheckCommon(ComputeStream stream, DeviceSlice<float> logits, DeviceSlice<int> topkIds, DeviceSlice<float> topkWeights,
        DeviceSlice<int> numUnpadded)
    {
        KernelArguments.Require(logits, nameof(logits));
        KernelArguments.Require(topkIds, nameof(topkIds));
        KernelArguments.Require(topkWeights, nameof(topkWeights));
        var tokens = CheckHostCommon(logits.Length, topkIds.Length, topkWeights.Length);
        if (!numUnpadded.IsNull && numUnpadded.Length != 1)
            throw new ArgumentException($"numUnpadded must view one element (got {numUnpadded.Length})", nameof(numUnpadded));
        KernelArguments.SameBackend(stream, logits, nameof(logits));
        KernelArguments.SameBackend(stream, topkIds, nameof(topkIds));
        KernelArguments.SameBackend(stream, topkWeights, nameof(topkWeights));
        KernelArguments.SameBackend(stream, numUnpadded, nameof(numUnpadded));
        if (LayerState is not null) KernelArguments.SameBackend(stream, LayerState.Backend, "layerState");
        return tokens;
    }

    private long CheckHostSpans(long logits, long topkIds, long topkWeights, Backend backend)
    {
        if (!Enum.IsDefined(backend)) throw new ArgumentOutOfRangeException(nameof(backend), backend, "unknown backend");
        if (LayerState is not null && LayerState.Backend != backend)
            throw new ArgumentException(
                $"the EPLB state lives on {LayerState.Backend} but the call runs on {backend}: pass backend: Backend.{LayerState.Backend}", nameof(backend));
        return CheckHostCommon(logits, topkIds, topkWeights);
    }

    private long CheckHostCommon(long logits, long topkIds, long topkWeights)
    {
        var n = Options.LogicalExperts;
        var k = Options.TopK;
        if (logits % n != 0)
            throw new ArgumentException($"logits has {logits} elements, not a multiple of LogicalExperts = {n}", nameof(logits));
        var tokens = logits / n;
        if (topkIds != tokens * k)
            throw new ArgumentException($"topkIds has {topkIds} elements; {tokens} tokens x TopK = {k} need {tokens * k}", nameof(topkIds));
        if (topkWeights != tokens * k)
            throw new ArgumentException($"topkWeights has {topkWeights} elements; {tokens} tokens x TopK = {k} need {tokens * k}",
                nameof(topkWeights));
        return tokens;
    }

    private void CheckBias(long length)
    {
        if (Options.Score == RoutingScore.Softmax)
            throw new ArgumentException("softmax routing selects by logit and takes no bias", "bias");
        if (length != Options.LogicalExperts)
            throw new ArgumentException($"bias has {length} elements; the router has LogicalExperts = {Options.LogicalExperts}", "bias");
    }

    private void CheckHashOptions()
    {
        if (Options.Score == RoutingScore.Softmax)
            throw new InvalidOperationException("hash routing weighs its experts with Sigmoid or SqrtSoftplus, not Softmax");
        if (Options.Groups != 1)
            throw new InvalidOperationException($"hash routing takes no groups (Groups = {Options.Groups})");
    }

    private long CheckHashTables(long tokens, long tokenIds, long tid2eid)
    {
        if (tokenIds != tokens)
            throw new ArgumentException($"tokenIds has {tokenIds} elements; logits hold {tokens} tokens", nameof(tokenIds));
        if (tid2eid == 0 || tid2eid % Options.TopK != 0)
            throw new ArgumentException($"tid2eid has {tid2eid} elements, not a non-empty multiple of TopK = {Options.TopK}", nameof(tid2eid));
        return tid2eid / Options.TopK;
    }

    private void AfterLaunch(ComputeStream stream)
    {
        if (CheckDeviceErrors && stream.Backend == Backend.Cuda) stream.CheckDeviceErrors();
    }
}
