using Eplb.Kernels;
using Eplb.Runtime;
using static TorchSharp.torch;

namespace Eplb.TorchSharp;

/// <summary>
/// Eplb's routing ops on TorchSharp tensors: the inputs are read and the outputs written in place
/// through wrapped buffers (no copies), the outputs allocated on the inputs' device. CPU tensors run
/// on the CPU backend; CUDA tensors on the <see cref="ComputeStream"/> given, which must be the
/// stream torch queues the surrounding work on (<see cref="ComputeStream.FromCudaStream"/>).
/// </summary>
public static class TorchRouting
{
    /// <summary>
    /// Scored top-k routing of <c>[T, N]</c> float32 <paramref name="logits"/>: int32 <c>[T, K]</c>
    /// physical slots (logical ids with EPLB off; -1 for padding rows) and float32 <c>[T, K]</c>
    /// weights, with the layer's load recorded when the router holds an EPLB state.
    /// </summary>
    /// <param name="router">The layer's router.</param>
    /// <param name="logits"><c>[T, N]</c> float32, contiguous.</param>
    /// <param name="bias"><c>[N]</c> float32 selection bias, or null.</param>
    /// <param name="numUnpadded">One int32 element: rows at or after it are padding; null: every row is real.</param>
    /// <param name="stream">The stream for CUDA tensors (see the class remarks); null or a CPU stream for CPU tensors.</param>
    /// <exception cref="ArgumentException">A shape, element type or device is wrong (nothing is written).</exception>
    public static (Tensor TopkIds, Tensor TopkWeights) Route(this Router router, Tensor logits, Tensor? bias = null, Tensor? numUnpadded = null,
        ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(router);
        ArgumentNullException.ThrowIfNull(logits);
        var queue = StreamFor(logits, stream);
        var tokens = Rows(logits, router.Options.LogicalExperts, nameof(logits));
        var (ids, weights) = Outputs(logits, tokens, router.Options.TopK);
        try
        {
            using var logitView = TensorMemory.Wrap<float>(logits);
            using var biasView = bias is null ? null : TensorMemory.Wrap<float>(SameDevice(bias, logits, nameof(bias)));
            using var unpaddedView = numUnpadded is null ? null : TensorMemory.Wrap<int>(SameDevice(numUnpadded, logits, nameof(numUnpadded)));
            using var idView = TensorMemory.Wrap<int>(ids);
            using var weightView = TensorMemory.Wrap<float>(weights);
            router.Route(queue, logitView, idView, weightView, biasView?.AsSlice() ?? default, unpaddedView?.AsSlice() ?? default);
            return (ids, weights);
        }
        catch
        {
            ids.Dispose();
            weights.Dispose();
            throw;
        }
    }

    /// <summary>
    /// DeepSeek-V4 hash routing: expert k of token t is <c>tid2eid[tokenIds[t], k]</c>, weighted by
    /// its logit's score; the same outputs as <see cref="Route"/>.
    /// </summary>
    /// <param name="router">The layer's router (sigmoid or sqrtsoftplus score, no groups).</param>
    /// <param name="logits"><c>[T, N]</c> float32.</param>
    /// <param name="tokenIds"><c>[T]</c> int64 token ids.</param>
    /// <param name="tid2eid"><c>[vocab, K]</c> int32 hash table.</param>
    /// <param name="numUnpadded">One int32 element: rows at or after it are padding; null: every row is real.</param>
    /// <param name="stream">The stream for CUDA tensors (see the class remarks).</param>
    /// <exception cref="ArgumentException">A shape, element type, device, token id or table entry is wrong (nothing is written).</exception>
    public static (Tensor TopkIds, Tensor TopkWeights) RouteByHash(this Router router, Tensor logits, Tensor tokenIds, Tensor tid2eid,
        Tensor? numUnpadded = null, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(router);
        ArgumentNullException.ThrowIfNull(logits);
        ArgumentNullException.ThrowIfNull(tokenIds);
        ArgumentNullException.ThrowIfNull(tid2eid);
        var queue = StreamFor(logits, stream);
        var tokens = Rows(logits, router.Options.LogicalExperts, nameof(logits));
        var (ids, weights) = Outputs(logits, tokens, router.Options.TopK);
        try
        {
            using var logitView = TensorMemory.Wrap<float>(logits);
            using var tokenView = TensorMemory.Wrap<long>(SameDevice(tokenIds, logits, nameof(tokenIds)));
            using var tableView = TensorMemory.Wrap<int>(SameDevice(tid2eid, logits, nameof(tid2eid)));
            using var unpaddedView = numUnpadded is null ? null : TensorMemory.Wrap<int>(SameDevice(numUnpadded, logits, nameof(numUnpadded)));
            using var idView = TensorMemory.Wrap<int>(ids);
            using var weightView = TensorMemory.Wrap<float>(weights);
            router.RouteByHash(queue, logitView, tokenView, tableView, idView, weightView, unpaddedView?.AsSlice() ?? default);
            return (ids, weights);
        }
        catch
        {
            ids.Dispose();
            weights.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Maps int32 logical ids <c>[T, K]</c> to physical slots through <paramref name="layer"/>
    /// (replica choice, padding rows -1, load recorded when its flag is set): a new int32 tensor.
    /// </summary>
    /// <exception cref="ArgumentException">A shape, element type or device is wrong, or (CPU) a table entry is out of range.</exception>
    public static Tensor MapToPhysical(Tensor topkIds, EplbLayerState layer, Tensor? numUnpadded = null, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(topkIds);
        ArgumentNullException.ThrowIfNull(layer);
        var queue = StreamFor(topkIds, stream);
        if (topkIds.dim() != 2) throw new ArgumentException($"topkIds must be [T, K], not [{string.Join(", ", topkIds.shape)}]", nameof(topkIds));
        var physical = empty(topkIds.shape, ScalarType.Int32, topkIds.device);
        try
        {
            using var idView = TensorMemory.Wrap<int>(topkIds);
            using var unpaddedView = numUnpadded is null ? null : TensorMemory.Wrap<int>(SameDevice(numUnpadded, topkIds, nameof(numUnpadded)));
            using var physicalView = TensorMemory.Wrap<int>(physical);
            ExpertMapping.MapToPhysical(queue, idView, checked((int)topkIds.shape[1]), layer, physicalView, unpaddedView?.AsSlice() ?? default);
            return physical;
        }
        catch
        {
            physical.Dispose();
            throw;
        }
    }

    // The stream the call queues on: the given one (on the tensor's backend), or the CPU stream for CPU tensors.
    private static ComputeStream StreamFor(Tensor tensor, ComputeStream? stream)
    {
        var backend = TensorMemory.BackendOf(tensor);
        if (stream is null)
            return backend == Backend.Cpu
                ? ComputeStream.Cpu
                : throw new ArgumentException("CUDA tensors need the stream torch queues on (ComputeStream.FromCudaStream)", nameof(stream));
        if (stream.Backend != backend) throw new ArgumentException($"the stream runs on {stream.Backend}, the tensors live on {backend}", nameof(stream));
        return stream;
    }

    private static long Rows(Tensor logits, int experts, string name)
    {
        if (logits.dim() != 2 || logits.shape[1] != experts)
            throw new ArgumentException($"{name} must be [T, {experts}], not [{string.Join(", ", logits.shape)}]", name);
        return logits.shape[0];
    }

    private static (Tensor Ids, Tensor Weights) Outputs(Tensor like, long tokens, int topK) =>
        (empty([tokens, topK], ScalarType.Int32, like.device), empty([tokens, topK], ScalarType.Float32, like.device));

    private static Tensor SameDevice(Tensor tensor, Tensor reference, string name) =>
        TensorMemory.SameDevice(tensor, reference)
            ? tensor
            : throw new ArgumentException($"{name} is on {tensor.device}, the logits on {reference.device}", name);
}
