using Eplb.Interop;

namespace Eplb.Runtime;

/// <summary>
/// An ordered queue of work on one backend (<c>eplb_stream_t</c>). CPU streams run work at once on
/// the calling thread; CUDA streams are asynchronous until <see cref="Synchronize"/>. A stream
/// carries an error word that kernels set on bad input and counter overflow (<see cref="CheckDeviceErrors"/>).
/// </summary>
public sealed unsafe class ComputeStream : IDisposable
{
    private static readonly Lazy<ComputeStream> SharedCpu = new(() => new ComputeStream(Backend.Cpu));
    private readonly StreamHandle _handle;

    /// <summary>Creates a stream on the backend (CUDA: a non-blocking stream on the current device).</summary>
    public ComputeStream(Backend backend)
    {
        _handle = StreamHandle.Create((eplb_backend_t)backend);
        Backend = backend;
    }

    private ComputeStream(StreamHandle handle, Backend backend)
    {
        _handle = handle;
        Backend = backend;
    }

    /// <summary>
    /// Wraps a CUDA stream owned elsewhere (a framework's current stream, for CUDA graph capture)
    /// without taking ownership; disposing the wrapper leaves the CUDA stream alive.
    /// </summary>
    public static ComputeStream FromCudaStream(nint cudaStream) => new(StreamHandle.WrapCuda(cudaStream), Backend.Cuda);

    /// <summary>A process-wide CPU stream for host-span convenience calls (CPU streams hold no state).</summary>
    public static ComputeStream Cpu => SharedCpu.Value;

    /// <summary>The backend the stream runs on.</summary>
    public Backend Backend { get; }

    /// <summary>Waits until all queued work has finished; reports asynchronous CUDA errors.</summary>
    public void Synchronize()
    {
        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_stream_synchronize(leases.Stream(this)));
    }

    /// <summary>
    /// Waits for the stream, then reads and clears its device error word. Throws
    /// <see cref="EplbException"/> with <see cref="EplbStatus.DeviceInputError"/> naming the bits when
    /// a kernel flagged any. CPU streams report bad input at the call instead; the one bit they can
    /// carry is the counter overflow (a load counter saturated at <c>int.MaxValue</c>, or a negative
    /// pass counter pushed into the load window), set on CPU and CUDA streams alike.
    /// </summary>
    public void CheckDeviceErrors()
    {
        using var leases = new LeaseScope();
        uint flags;
        EplbException.ThrowIfFailed(NativeMethods.eplb_stream_check_device_errors(leases.Stream(this), &flags));
    }

    /// <summary>The native stream (leased through <see cref="LeaseScope"/>).</summary>
    internal StreamHandle Handle => _handle;

    /// <summary>The <c>cudaStream_t</c> the stream queues on (for libraries that take one, such as NCCL).</summary>
    internal nint CudaStream
    {
        get
        {
            using var leases = new LeaseScope();
            void* cuda;
            EplbException.ThrowIfFailed(NativeMethods.eplb_stream_get_cuda_stream(leases.Stream(this), &cuda));
            return (nint)cuda;
        }
    }

    /// <summary>Waits for the stream's work and releases it.</summary>
    public void Dispose() => _handle.Dispose();
}
