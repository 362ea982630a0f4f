using System.Runtime.InteropServices;

namespace Eplb.Interop;

/// <summary>Owns one <c>eplb_buffer_t</c>; releasing calls <c>eplb_buffer_destroy</c> exactly once.</summary>
internal sealed unsafe class BufferHandle : SafeHandle
{
    public BufferHandle() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    internal static BufferHandle Create(eplb_backend_t backend, ulong bytes)
    {
        eplb_buffer_t* buffer = null;
        EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_create(backend, bytes, &buffer));
        var result = new BufferHandle();
        result.SetHandle((nint)buffer);
        return result;
    }

    protected override bool ReleaseHandle() => NativeMethods.eplb_buffer_destroy((eplb_buffer_t*)handle) == eplb_status_t.EPLB_STATUS_OK;
}

/// <summary>Owns one <c>eplb_stream_t</c>; releasing calls <c>eplb_stream_destroy</c> exactly once.</summary>
internal sealed unsafe class StreamHandle : SafeHandle
{
    public StreamHandle() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    internal static StreamHandle Create(eplb_backend_t backend)
    {
        eplb_stream_t* stream = null;
        EplbException.ThrowIfFailed(NativeMethods.eplb_stream_create(backend, &stream));
        var result = new StreamHandle();
        result.SetHandle((nint)stream);
        return result;
    }

    internal static StreamHandle WrapCuda(nint cudaStream)
    {
        eplb_stream_t* stream = null;
        EplbException.ThrowIfFailed(NativeMethods.eplb_stream_wrap_cuda((void*)cudaStream, &stream));
        var result = new StreamHandle();
        result.SetHandle((nint)stream);
        return result;
    }

    protected override bool ReleaseHandle() => NativeMethods.eplb_stream_destroy((eplb_stream_t*)handle) == eplb_status_t.EPLB_STATUS_OK;
}
