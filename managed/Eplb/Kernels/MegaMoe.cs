using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// The shape of one MoE layer on this rank (docs/design.md §7, <c>eplb_moe_shape_t</c>): expert sizes, top-k,
/// and which physical expert slots this rank holds.
/// </summary>
/// <param name="Hidden">H, the model's hidden size; a positive multiple of 64.</param>
/// <param name="Intermediate">I, one expert's intermediate size; a positive multiple of 64.</param>
/// <param name="TopK">K, experts per token, in [1, 64].</param>
/// <param name="Slots">R, physical expert slots over all ranks.</param>
/// <param name="SlotsPerRank">R/G, the slots this rank holds, in [1, 1024].</param>
/// <param name="FirstSlot">The first of them: this rank computes slots [FirstSlot, FirstSlot + SlotsPerRank).</param>
/// <param name="SwigluLimit">
/// When positive, the SwiGLU clamps <c>gate = min(gate, L)</c> and <c>up = clamp(up, -L, L)</c> first
/// (DeepSeek-V4-Flash uses 10); 0 disables the clamp.
/// </param>
/// <param name="BlockM">Tile height in (token, expert) rows: 0 picks 32 for decode-sized batches and 128 for prefill; 32 or 128 forces one.</param>
public readonly record struct MoeLayerShape(int Hidden, int Intermediate, int TopK, int Slots, int SlotsPerRank,
    int FirstSlot, float SwigluLimit = 0f, int BlockM = 0)
{
    /// <summary>A DeepSeek-V4-Flash MoE layer (hidden 4096, intermediate 2048, 256 experts, top-6, SwiGLU limit 10) on rank <paramref name="rank"/> of <paramref name="ranks"/>.</summary>
    public static MoeLayerShape DeepSeekV4Flash(int ranks = 1, int rank = 0) => ForRank(4096, 2048, 6, 256, ranks, rank, 10f);

    /// <summary>A DeepSeek-V3-shaped MoE layer (hidden 7168, intermediate 2048, 256 experts, top-8, no clamp) on rank <paramref name="rank"/> of <paramref name="ranks"/>.</summary>
    public static MoeLayerShape DeepSeekV3(int ranks = 1, int rank = 0) => ForRank(7168, 2048, 8, 256, ranks, rank, 0f);

    /// <summary>The slots of rank <paramref name="rank"/> when <paramref name="slots"/> slots are split evenly over <paramref name="ranks"/> ranks.</summary>
    /// <exception cref="ArgumentException">The slots do not split evenly or the rank is out of range.</exception>
    public static MoeLayerShape ForRank(int hidden, int intermediate, int topK, int slots, int ranks, int rank, float swigluLimit = 0f)
    {
        var perRank = ExpertTopology.SlotsPerRankOf(slots, ranks);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, ranks);
        return new MoeLayerShape(hidden, intermediate, topK, slots, perRank, rank * perRank, swigluLimit);
    }

    /// <summary>Elements of the gate-and-up weights <c>[E_local][2I][H]</c>.</summary>
    public long W1Length => (long)SlotsPerRank * 2 * Intermediate * Hidden;

    /// <summary>Elements of the down weights <c>[E_local][H][I]</c>.</summary>
    public long W2Length => (long)SlotsPerRank * Hidden * Intermediate;

    internal eplb_moe_shape_t ToNative() => new()
    {
        hidden = Hidden,
        intermediate = Intermediate,
        top_k = TopK,
        num_experts = Slots,
        num_local_experts = SlotsPerRank,
        first_local_expert = FirstSlot,
        swiglu_limit = SwigluLimit,
        block_m = BlockM,
    };
}

/// <summary>The MoE expert backend: which implementation computes a MoE layer.</summary>
public enum MoeBackend
{
    /// <summary>
    /// Separate kernels: dispatch align and permute, grouped GEMM1 + SwiGLU, grouped GEMM2, dispatch
    /// combine (no cooperative launch).
    /// </summary>
    Unfused = 0,
    /// <summary>The cooperative fused Mega MoE kernel: one launch, every SM must be free for its grid.</summary>
    MegaMoe = 1,
}

/// <summary>What <see cref="MegaMoe.Run(ComputeStream, MoeLayerShape, DeviceSlice{BFloat16}, DeviceSlice{int}, DeviceSlice{float}, DeviceSlice{BFloat16}, DeviceSlice{BFloat16}, DeviceSlice{BFloat16}, DeviceSlice{byte}, MoeFallback, int)"/> does when the fused kernel cannot launch.</summary>
public enum MoeFallback
{
    /// <summary>Run the unfused path instead (the default).</summary>
    Unfused = 0,
    /// <summary>Throw the <see cref="EplbException"/> with <see cref="EplbStatus.CooperativeLaunchUnavailable"/>.</summary>
    Throw = 1,
}

/// <summary>
/// Mega MoE (docs/design.md §7): the expert computation of one MoE layer,
/// <c>Y[t] = Σ_k w[t,k] · W2[e] · (silu(clampG(W1g[e] · x_t)) ⊙ clampU(W1u[e] · x_t))</c>, e = ids[t,k],
/// over the experts local to this rank (others contribute 0, the expert-parallel partial sum), in
/// one cooperative CUDA kernel: token counting and permutation, GEMM1 with the SwiGLU epilogue,
/// GEMM2 and the top-k combine. bf16 tensors are <see cref="BFloat16"/> (raw bits on the C ABI);
/// accumulation is fp32, the intermediate and each expert's output row are rounded to bf16, and the
/// combine adds the K rows in ascending k; the output is bitwise equal run to run.
/// </summary>
/// <remarks>
/// <para>
/// A cooperative kernel needs every one of its blocks resident at once. It never hangs: when the
/// device has no cooperative launch or the grid cannot co-reside, the fused call throws
/// <see cref="EplbException"/> with <see cref="EplbStatus.CooperativeLaunchUnavailable"/> before
/// writing anything, and <see cref="Run(ComputeStream, MoeLayerShape, DeviceSlice{BFloat16}, DeviceSlice{int}, DeviceSlice{float}, DeviceSlice{BFloat16}, DeviceSlice{BFloat16}, DeviceSlice{BFloat16}, DeviceSlice{byte}, MoeFallback, int)"/>
/// runs the unfused path instead. Should other kernels still hold SMs while it runs, its grid
/// barriers give up after a few seconds and <see cref="ComputeStream.CheckDeviceErrors"/> reports
/// the grid-barrier timeout (the output is then undefined).
/// </para>
/// <para>
/// NCCL interplay (docs/design.md §3.4): NCCL kernels of EPLB weight transfers run on other streams and occupy
/// SMs for as long as they wait for their peers, which a cooperative kernel cannot tolerate. When
/// this kernel is the MoE backend, data parallelism is above 1, EPLB is enabled and its communicator
/// is NCCL-based, <c>NCCL_MAX_CTAS=8</c> must be set before any communicator is created (the EPLB
/// runtime's NCCL environment rule does this and logs it); the occupancy check here then sees the
/// SMs NCCL leaves free.
/// </para>
/// </remarks>
public static unsafe class MegaMoe
{
    /// <summary>Bytes of the workspace a call with up to <paramref name="maxTokens"/> tokens needs (any backend, either path).</summary>
    /// <exception cref="ArgumentException">The shape is invalid (the message names the field).</exception>
    public static long WorkspaceSize(MoeLayerShape shape, long maxTokens)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(maxTokens);
        var native = shape.ToNative();
        ulong bytes;
        EplbException.ThrowIfFailed(NativeMethods.eplb_moe_workspace_size(&native, maxTokens, &bytes));
        return checked((long)bytes);
    }

    /// <summary>
    /// The largest grid of the fused kernel that can co-reside on the stream's device for this shape
    /// and token count (blocks per SM from the occupancy API with the kernel's shared memory, times
    /// the SMs), and the tile height it uses. 1 on a CPU stream.
    /// </summary>
    /// <exception cref="EplbException"><see cref="EplbStatus.CooperativeLaunchUnavailable"/>: the fused kernel cannot launch on this device.</exception>
    public static int MaxCooperativeGrid(ComputeStream stream, MoeLayerShape shape, long tokens, out int blockM)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        var native = shape.ToNative();
        int blocks, tile;
        using (var leases = new LeaseScope())
            EplbException.ThrowIfFailed(NativeMethods.eplb_mega_moe_max_grid(leases.Stream(stream), &native, tokens, &blocks, &tile));
        blockM = tile;
        return blocks;
    }

    /// <summary>
    /// Computes the layer with the fused kernel and, when it cannot launch and
    /// <paramref name="fallback"/> allows, with the unfused path; queued on <paramref name="stream"/>.
    /// Returns the backend that ran.
    /// </summary>
    /// <param name="stream">Where the work is queued; every view lives on its backend.</param>
    /// <param name="shape">The layer on this rank.</param>
    /// <param name="x"><c>[T][H]</c> bf16 activations.</param>
    /// <param name="topkIds"><c>[T][K]</c> physical expert slots; -1 and other ranks' slots contribute nothing.</param>
    /// <param name="topkWeights"><c>[T][K]</c> routing weights.</param>
    /// <param name="w1"><c>[E_local][2I][H]</c> bf16: per expert the I gate rows, then the I up rows.</param>
    /// <param name="w2"><c>[E_local][H][I]</c> bf16 down projection.</param>
    /// <param name="output"><c>[T][H]</c> bf16, every element written.</param>
    /// <param name="workspace">At least <see cref="WorkspaceSize"/> bytes; no initialisation needed. One call at a time.</param>
    /// <param name="fallback">What to do when the fused kernel cannot launch.</param>
    /// <param name="gridBlocks">0 for the largest co-resident grid, or a forced grid size (tuning, tests).</param>
    /// <exception cref="ArgumentException">A size, backend or pointer is wrong; nothing is written.</exception>
    public static MoeBackend Run(ComputeStream stream, MoeLayerShape shape, DeviceSlice<BFloat16> x, DeviceSlice<int> topkIds,
        DeviceSlice<float> topkWeights, DeviceSlice<BFloat16> w1, DeviceSlice<BFloat16> w2, DeviceSlice<BFloat16> output,
        DeviceSlice<byte> workspace, MoeFallback fallback = MoeFallback.Unfused, int gridBlocks = 0)
    {
        try
        {
            RunFused(stream, shape, x, topkIds, topkWeights, w1, w2, output, workspace, gridBlocks);
            return MoeBackend.MegaMoe;
        }
        catch (EplbException e) when (e.Status == EplbStatus.CooperativeLaunchUnavailable && fallback == MoeFallback.Unfused)
        {
            RunUnfused(stream, shape, x, topkIds, topkWeights, w1, w2, output, workspace);
            return MoeBackend.Unfused;
        }
    }

    /// <summary>
    /// Computes the layer with the cooperative fused kernel (the reference implementation on a CPU
    /// stream). See <see cref="Run(ComputeStream, MoeLayerShape, DeviceSlice{BFloat16}, DeviceSlice{int}, DeviceSlice{float}, DeviceSlice{BFloat16}, DeviceSlice{BFloat16}, DeviceSlice{BFloat16}, DeviceSlice{byte}, MoeFallback, int)"/> for the arguments.
    /// </summary>
    /// <exception cref="EplbException"><see cref="EplbStatus.CooperativeLaunchUnavailable"/>: no cooperative launch, or <paramref name="gridBlocks"/> cannot co-reside; nothing was written.</exception>
    public static void RunFused(ComputeStream stream, MoeLayerShape shape, DeviceSlice<BFloat16> x, DeviceSlice<int> topkIds,
        DeviceSlice<float> topkWeights, DeviceSlice<BFloat16> w1, DeviceSlice<BFloat16> w2, DeviceSlice<BFloat16> output,
        DeviceSlice<byte> workspace, int gridBlocks = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(gridBlocks);
        Invoke(stream, shape, x, topkIds, topkWeights, w1, w2, output, workspace, gridBlocks, fused: true);
    }

    /// <summary>
    /// Computes the layer with separate kernels (the <see cref="ExpertDispatch"/> align and permute,
    /// grouped GEMM1 + SwiGLU, grouped GEMM2, the dispatch combine): the baseline, and the path for
    /// devices or moments where the cooperative launch is not possible. Same arguments as the fused
    /// call, and the same result bit for bit.
    /// </summary>
    public static void RunUnfused(ComputeStream stream, MoeLayerShape shape, DeviceSlice<BFloat16> x, DeviceSlice<int> topkIds,
        DeviceSlice<float> topkWeights, DeviceSlice<BFloat16> w1, DeviceSlice<BFloat16> w2, DeviceSlice<BFloat16> output,
        DeviceSlice<byte> workspace) =>
        Invoke(stream, shape, x, topkIds, topkWeights, w1, w2, output, workspace, 0, fused: false);

    /// <summary>
    /// Host-memory form: computes the layer on <paramref name="backend"/> (CPU: directly on the spans,
    /// with a temporary workspace; CUDA: copies to the device, runs, checks the device error word and
    /// copies the output back). <paramref name="moeBackend"/> picks the implementation (the CPU reference
    /// of the fused kernel by default). Returns the backend that ran.
    /// </summary>
    /// <exception cref="ArgumentException">A size is wrong; nothing is written.</exception>
    public static MoeBackend Run(MoeLayerShape shape, ReadOnlySpan<BFloat16> x, ReadOnlySpan<int> topkIds, ReadOnlySpan<float> topkWeights,
        ReadOnlySpan<BFloat16> w1, ReadOnlySpan<BFloat16> w2, Span<BFloat16> output, Backend backend = Backend.Cpu,
        MoeBackend moeBackend = MoeBackend.MegaMoe, MoeFallback fallback = MoeFallback.Unfused)
    {
        var tokens = CheckLengths(shape, x.Length, topkIds.Length, topkWeights.Length, w1.Length, w2.Length, output.Length);
        if (backend == Backend.Cuda) return RunOnDevice(shape, tokens, x, topkIds, topkWeights, w1, w2, output, moeBackend, fallback);

        using var workspace = new DeviceBuffer<byte>(Backend.Cpu, WorkspaceSize(shape, tokens));
        using var leases = new LeaseScope();
        fixed (BFloat16* xPointer = x, w1Pointer = w1, w2Pointer = w2, outputPointer = output)
        fixed (int* idsPointer = topkIds)
        fixed (float* weightsPointer = topkWeights)
        {
            var tensors = Tensors(xPointer, idsPointer, weightsPointer, w1Pointer, w2Pointer, outputPointer, leases.Pointer(workspace.AsSlice()),
                workspace.Length);
            Launch(leases.Stream(ComputeStream.Cpu), shape, tokens, &tensors, moeBackend == MoeBackend.MegaMoe, 0);
        }
        return moeBackend;
    }

    private static MoeBackend RunOnDevice(MoeLayerShape shape, long tokens, ReadOnlySpan<BFloat16> x, ReadOnlySpan<int> topkIds,
        ReadOnlySpan<float> topkWeights, ReadOnlySpan<BFloat16> w1, ReadOnlySpan<BFloat16> w2, Span<BFloat16> output, MoeBackend moeBackend,
        MoeFallback fallback)
    {
        using var device = new DeviceRoundTrip();
        var result = device.Allocate<BFloat16>(output.Length);
        var xs = device.Upload(x);
        var ids = device.Upload(topkIds);
        var weights = device.Upload(topkWeights);
        var w1s = device.Upload(w1);
        var w2s = device.Upload(w2);
        var workspace = device.Allocate<byte>(WorkspaceSize(shape, tokens));
        var ran = MoeBackend.Unfused;
        if (moeBackend == MoeBackend.Unfused)
            RunUnfused(device.Stream, shape, xs, ids, weights, w1s, w2s, result, workspace);
        else
            ran = Run(device.Stream, shape, xs, ids, weights, w1s, w2s, result, workspace, fallback);
        device.Download(result, output);
        return ran;
    }

    private static void Invoke(ComputeStream stream, MoeLayerShape shape, DeviceSlice<BFloat16> x, DeviceSlice<int> topkIds,
        DeviceSlice<float> topkWeights, DeviceSlice<BFloat16> w1, DeviceSlice<BFloat16> w2, DeviceSlice<BFloat16> output,
        DeviceSlice<byte> workspace, int gridBlocks, bool fused)
    {
        ArgumentNullException.ThrowIfNull(stream);
        KernelArguments.Require(x, nameof(x));
        KernelArguments.Require(topkIds, nameof(topkIds));
        KernelArguments.Require(topkWeights, nameof(topkWeights));
        KernelArguments.Require(w1, nameof(w1));
        KernelArguments.Require(w2, nameof(w2));
        KernelArguments.Require(output, nameof(output));
        KernelArguments.Require(workspace, nameof(workspace));
        var tokens = CheckLengths(shape, x.Length, topkIds.Length, topkWeights.Length, w1.Length, w2.Length, output.Length);
        var needed = WorkspaceSize(shape, tokens);
        if (workspace.Length < needed)
            throw new ArgumentException($"workspace has {workspace.Length} bytes; {tokens} tokens need {needed} (MegaMoe.WorkspaceSize)", nameof(workspace));
        KernelArguments.SameBackend(stream, x, nameof(x));
        KernelArguments.SameBackend(stream, topkIds, nameof(topkIds));
        KernelArguments.SameBackend(stream, topkWeights, nameof(topkWeights));
        KernelArguments.SameBackend(stream, w1, nameof(w1));
        KernelArguments.SameBackend(stream, w2, nameof(w2));
        KernelArguments.SameBackend(stream, output, nameof(output));
        KernelArguments.SameBackend(stream, workspace, nameof(workspace));

        using var leases = new LeaseScope();
        var tensors = Tensors(leases.Pointer(x), leases.Pointer(topkIds), leases.Pointer(topkWeights), leases.Pointer(w1), leases.Pointer(w2),
            leases.Pointer(output), leases.Pointer(workspace), workspace.Length);
        Launch(leases.Stream(stream), shape, tokens, &tensors, fused, gridBlocks);
    }

    // The one eplb_moe_tensors_t of both forms: bf16 travels as its raw bits.
    private static eplb_moe_tensors_t Tensors(BFloat16* x, int* topkIds, float* topkWeights, BFloat16* w1, BFloat16* w2, BFloat16* output,
        byte* workspace, long workspaceBytes) => new()
    {
        x = (ushort*)x,
        topk_ids = topkIds,
        topk_weights = topkWeights,
        w1 = (ushort*)w1,
        w2 = (ushort*)w2,
        output = (ushort*)output,
        workspace = workspace,
        workspace_bytes = (ulong)workspaceBytes,
    };

    private static void Launch(eplb_stream_t* stream, MoeLayerShape shape, long tokens, eplb_moe_tensors_t* tensors, bool fused, int gridBlocks)
    {
        var native = shape.ToNative();
        if (fused)
            EplbException.ThrowIfFailed(NativeMethods.eplb_mega_moe(stream, &native, tokens, tensors, gridBlocks));
        else
            EplbException.ThrowIfFailed(NativeMethods.eplb_moe_unfused(stream, &native, tokens, tensors));
    }

    // Checks the element counts against the shape; returns T.
    private static long CheckLengths(MoeLayerShape shape, long x, long ids, long weights, long w1, long w2, long output)
    {
        if (shape.TopK < 1) throw new ArgumentOutOfRangeException(nameof(shape), shape.TopK, "TopK must be at least 1");
        if (shape.Hidden < 1) throw new ArgumentOutOfRangeException(nameof(shape), shape.Hidden, "Hidden must be at least 1");
        if (ids % shape.TopK != 0)
            throw new ArgumentException($"topkIds has {ids} elements, not a multiple of TopK = {shape.TopK}", "topkIds");
        var tokens = ids / shape.TopK;
        if (weights != ids) throw new ArgumentException($"topkWeights has {weights} elements, topkIds {ids}", "topkWeights");
        if (x != tokens * shape.Hidden)
            throw new ArgumentException($"x has {x} elements; {tokens} tokens x Hidden = {shape.Hidden} need {tokens * shape.Hidden}", "x");
        if (output != tokens * shape.Hidden)
            throw new ArgumentException($"output has {output} elements; {tokens} tokens x Hidden = {shape.Hidden} need {tokens * shape.Hidden}", "output");
        if (w1 != shape.W1Length)
            throw new ArgumentException($"w1 has {w1} elements; [E_local = {shape.SlotsPerRank}][2 x {shape.Intermediate}][{shape.Hidden}] needs {shape.W1Length}", "w1");
        if (w2 != shape.W2Length)
            throw new ArgumentException($"w2 has {w2} elements; [E_local = {shape.SlotsPerRank}][{shape.Hidden}][{shape.Intermediate}] needs {shape.W2Length}", "w2");
        return tokens;
    }
}
