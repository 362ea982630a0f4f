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

/// <summary>What <see cref="MegaMoe.Run(ComputeStream, MoeLayerShape, MoeTensors, MoeFallback, int)"/> does when the fused kernel cannot launch.</summary>
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
/// writing anything, and <see cref="Run(ComputeStream, MoeLayerShape, MoeTensors, MoeFallback, int)"/>
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
    /// <param name="tensors">Activations, routing, expert weights, output and workspace.</param>
    /// <param name="fallback">What to do when the fused kernel cannot launch.</param>
    /// <param name="gridBlocks">0 for the largest co-resident grid, or a forced grid size (tuning, tests).</param>
    /// <exception cref="ArgumentException">A size, backend or pointer is wrong; nothing is written.</exception>
    public static MoeBackend Run(ComputeStream stream, MoeLayerShape shape, MoeTensors tensors, MoeFallback fallback = MoeFallback.Unfused,
        int gridBlocks = 0)
    {
        try
        {
            RunFused(stream, shape, tensors, gridBlocks);
            return MoeBackend.MegaMoe;
        }
        catch (EplbException e) when (e.Status == EplbStatus.CooperativeLaunchUnavailable && fallback == MoeFallback.Unfused)
        {
            RunUnfused(stream, shape, tensors);
            return MoeBackend.Unfused;
        }
    }

    /// <summary>
    /// Computes the layer with the cooperative fused kernel (the reference implementation on a CPU
    /// stream). See <see cref="Run(ComputeStream, MoeLayerShape, MoeTensors, MoeFallback, int)"/> for the arguments.
    /// </summary>
    /// <exception cref="EplbException"><see cref="EplbStatus.CooperativeLaunchUnavailable"/>: no cooperative launch, or <paramref name="gridBlocks"/> cannot co-reside; nothing was written.</exception>
    public static void RunFused(ComputeStream stream, MoeLayerShape shape, MoeTensors tensors, int gridBlocks = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(gridBlocks);
        Invoke(stream, shape, tensors, gridBlocks, fused: true);
    }

    /// <summary>
    /// Computes the layer with separate kernels (the <see cref="ExpertDispatch"/> align and permute,
    /// grouped GEMM1 + SwiGLU, grouped GEMM2, the dispatch combine): the baseline, and the path for
    /// devices or moments where the cooperative launch is not possible. Same arguments as the fused
    /// call, and the same result bit for bit.
    /// </summary>
    public static void RunUnfused(ComputeStream stream, MoeLayerShape shape, MoeTensors tensors) =>
        Invoke(stream, shape, tensors, 0, fused: false);

    /// <summary>
    /// Host-memory form: computes the layer on <paramref name="backend"/> (CPU: directly on the spans,
    /// with a temporary workspace; CUDA: copies to the device, runs, checks the device error word and
    /// copies the output back). <paramref name="moeBackend"/> picks the implementation (the CPU reference
    /// of the fused kernel by default). Returns the backend that ran.
    /// </summary>
    /// <exception cref="ArgumentException">A size is wrong; nothing is written.</exception>
    public static MoeBackend Run(MoeLayerShape shape, HostMoeTensors tensors, Backend backend = Backend.Cpu,
        MoeBackend moeBackend = MoeBackend.MegaMoe, MoeFallback fallback = MoeFallback.Unfused)
    {
        var tokens = CheckLengths(shape, tensors.X.Length, tensors.TopkIds.Length, tensors.TopkWeights.Length, tensors.W1.Length,
            tensors.W2.Length, tensors.Output.Length);
        if (backend == Backend.Cuda) return RunOnDevice(shape, tokens, tensors, moeBackend, fallback);

        using var workspace = new DeviceBuffer<byte>(Backend.Cpu, WorkspaceSize(shape, tokens));
        using var leases = new LeaseScope();
        fixed (BFloat16* xPointer = tensors.X, w1Pointer = tensors.W1, w2Pointer = tensors.W2, outputPointer = tensors.Output)
        fixed (int* idsPointer = tensors.TopkIds)
        fixed (float* weightsPointer = tensors.TopkWeights)
        {
            var native = Tensors(xPointer, idsPointer, weightsPointer, w1Pointer, w2Pointer, outputPointer, leases.Pointer(workspace.AsSlice()),
                workspace.Length);
            Launch(leases.Stream(ComputeStream.Cpu), shape, tokens, &native, moeBackend == MoeBackend.MegaMoe, 0);
        }
        return moeBackend;
    }

    private static MoeBackend RunOnDevice(MoeLayerShape shape, long tokens, HostMoeTensors tensors, MoeBackend moeBackend, MoeFallback fallback)
    {
        using var device = new DeviceRoundTrip();
        var output = device.Allocate<BFloat16>(tensors.Output.Length);
        var views = new MoeTensors
        {
            X = device.Upload(tensors.X),
            TopkIds = device.Upload(tensors.TopkIds),
            TopkWeights = device.Upload(tensors.TopkWeights),
            W1 = device.Upload(tensors.W1),
            W2 = device.Upload(tensors.W2),
            Output = output,
            Workspace = device.Allocate<byte>(WorkspaceSize(shape, tokens)),
        };
        var ran = MoeBackend.Unfused;
        if (moeBackend == MoeBackend.Unfused)
            RunUnfused(device.Stream, shape, views);
        else
            ran = Run(device.Stream, shape, views, fallback);
        device.Download(output, tensors.Output);
        return ran;
    }

    private static void Invoke(ComputeStream stream, MoeLayerShape shape, MoeTensors tensors, int gridBlocks, bool fused)
    {
        ArgumentNullException.ThrowIfNull(stream);
        KernelArguments.Require(tensors.X, "X");
        KernelArguments.Require(tensors.TopkIds, "TopkIds");
        KernelArguments.Require(tensors.TopkWeights, "TopkWeights");
        KernelArguments.Require(tensors.W1, "W1");
        KernelArguments.Require(tensors.W2, "W2");
        KernelArguments.Require(tensors.Output, "Output");
        KernelArguments.Require(tensors.Workspace, "Workspace");
        var tokens = CheckLengths(shape, tensors.X.Length, tensors.TopkIds.Length, tensors.TopkWeights.Length, tensors.W1.Length,
            tensors.W2.Length, tensors.Output.Length);
        var needed = WorkspaceSize(shape, tokens);
        if (tensors.Workspace.Length < needed)
            throw new ArgumentException($"Workspace has {tensors.Workspace.Length} bytes; {tokens} tokens need {needed} (MegaMoe.WorkspaceSize)",
                "Workspace");
        KernelArguments.SameBackend(stream, tensors.X, "X");
        KernelArguments.SameBackend(stream, tensors.TopkIds, "TopkIds");
        KernelArguments.SameBackend(stream, tensors.TopkWeights, "TopkWeights");
        KernelArguments.SameBackend(stream, tensors.W1, "W1");
        KernelArguments.SameBackend(stream, tensors.W2, "W2");
        KernelArguments.SameBackend(stream, tensors.Output, "Output");
        KernelArguments.SameBackend(stream, tensors.Workspace, "Workspace");

        using var leases = new LeaseScope();
        var native = Tensors(leases.Pointer(tensors.X), leases.Pointer(tensors.TopkIds), leases.Pointer(tensors.TopkWeights),
            leases.Pointer(tensors.W1), leases.Pointer(tensors.W2), leases.Pointer(tensors.Output), leases.Pointer(tensors.Workspace),
            tensors.Workspace.Length);
        Launch(leases.Stream(stream), shape, tokens, &native, fused, gridBlocks);
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
            throw new ArgumentException($"TopkIds has {ids} elements, not a multiple of TopK = {shape.TopK}", "TopkIds");
        var tokens = ids / shape.TopK;
        if (weights != ids) throw new ArgumentException($"TopkWeights has {weights} elements, TopkIds {ids}", "TopkWeights");
        if (x != tokens * shape.Hidden)
            throw new ArgumentException($"X has {x} elements; {tokens} tokens x Hidden = {shape.Hidden} need {tokens * shape.Hidden}", "X");
        if (output != tokens * shape.Hidden)
            throw new ArgumentException($"Output has {output} elements; {tokens} tokens x Hidden = {shape.Hidden} need {tokens * shape.Hidden}", "Output");
        if (w1 != shape.W1Length)
            throw new ArgumentException($"W1 has {w1} elements; [E_local = {shape.SlotsPerRank}][2 x {shape.Intermediate}][{shape.Hidden}] needs {shape.W1Length}", "W1");
        if (w2 != shape.W2Length)
            throw new ArgumentException($"W2 has {w2} elements; [E_local = {shape.SlotsPerRank}][{shape.Hidden}][{shape.Intermediate}] needs {shape.W2Length}", "W2");
        return tokens;
    }
}

/// <summary>
/// The views one <see cref="MegaMoe"/> call reads and writes, all on the stream's backend (the C ABI's
/// <c>eplb_moe_tensors_t</c>). Every one is required.
/// </summary>
public readonly record struct MoeTensors
{
    /// <summary><c>[T][H]</c> bf16 activations.</summary>
    public DeviceSlice<BFloat16> X { get; init; }

    /// <summary><c>[T][K]</c> physical expert slots; -1 and other ranks' slots contribute nothing.</summary>
    public DeviceSlice<int> TopkIds { get; init; }

    /// <summary><c>[T][K]</c> routing weights.</summary>
    public DeviceSlice<float> TopkWeights { get; init; }

    /// <summary><c>[E_local][2I][H]</c> bf16: per expert the I gate rows, then the I up rows.</summary>
    public DeviceSlice<BFloat16> W1 { get; init; }

    /// <summary><c>[E_local][H][I]</c> bf16 down projection.</summary>
    public DeviceSlice<BFloat16> W2 { get; init; }

    /// <summary><c>[T][H]</c> bf16 output, every element written.</summary>
    public DeviceSlice<BFloat16> Output { get; init; }

    /// <summary>At least <see cref="MegaMoe.WorkspaceSize"/> bytes; no initialisation needed. One call at a time.</summary>
    public DeviceSlice<byte> Workspace { get; init; }
}

/// <summary>The host-memory counterpart of <see cref="MoeTensors"/> for the host-span form (no workspace: the call makes its own).</summary>
public readonly ref struct HostMoeTensors
{
    /// <summary><c>[T][H]</c> bf16 activations.</summary>
    public required ReadOnlySpan<BFloat16> X { get; init; }

    /// <summary><c>[T][K]</c> physical expert slots; -1 and other ranks' slots contribute nothing.</summary>
    public required ReadOnlySpan<int> TopkIds { get; init; }

    /// <summary><c>[T][K]</c> routing weights.</summary>
    public required ReadOnlySpan<float> TopkWeights { get; init; }

    /// <summary><c>[E_local][2I][H]</c> bf16: per expert the I gate rows, then the I up rows.</summary>
    public required ReadOnlySpan<BFloat16> W1 { get; init; }

    /// <summary><c>[E_local][H][I]</c> bf16 down projection.</summary>
    public required ReadOnlySpan<BFloat16> W2 { get; init; }

    /// <summary><c>[T][H]</c> bf16 output, every element written.</summary>
    public required Span<BFloat16> Output { get; init; }
}
