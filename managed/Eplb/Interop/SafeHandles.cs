using System.Runtime.InteropServices;

namespace Eplb.Interop;

/// <summary>
/// Owns one <c>eplb_buffer_t</c>; releasing calls <c>eplb_buffer_destroy</c> exactly once. A wrapped
/// buffer (<see cref="Wrap"/>) also keeps the memory's owner reachable and its pin held until then,
/// so no call that still leases the handle can outlive the memory's pin.
/// </summary>
internal sealed unsafe class BufferHandle : SafeHandle
{
    private object? _owner;
    private System.Buffers.MemoryHandle _pin;

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

    /// <summary>
    /// Wraps caller-owned memory without copying (<c>eplb_buffer_wrap</c>); <paramref name="owner"/> stays
    /// reachable and <paramref name="pin"/> held until the handle is released (neither is freed by it
    /// beyond the pin's own release). On failure the pin is released and the status thrown.
    /// </summary>
    internal static BufferHandle Wrap(eplb_backend_t backend, int device, void* data, ulong bytes, object? owner,
        System.Buffers.MemoryHandle pin = default)
    {
        eplb_buffer_t* buffer = null;
        try
        {
            EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_wrap(backend, device, data, bytes, &buffer));
        }
        catch
        {
            pin.Dispose();
            throw;
        }
        var result = new BufferHandle { _owner = owner, _pin = pin };
        result.SetHandle((nint)buffer);
        return result;
    }

    protected override bool ReleaseHandle()
    {
        var destroyed = NativeMethods.eplb_buffer_destroy((eplb_buffer_t*)handle) == eplb_status_t.EPLB_STATUS_OK;
        _pin.Dispose();
        GC.KeepAlive(_owner);  // reachable until here, then let go
        _owner = null;
        return destroyed;
    }
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
