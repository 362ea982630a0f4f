using System.Runtime.InteropServices;
using Eplb.Interop;

namespace Eplb.Runtime;

/// <summary>
/// The one place SafeHandles become pointers: every stream, buffer and view a native call reads is
/// leased here (<c>DangerousAddRef</c>), so a concurrent Dispose cannot free it mid-call, and every
/// lease ends when the scope is disposed. Use it as <c>using var leases = new LeaseScope();</c> and
/// pass <c>leases.Stream(stream)</c>, <c>leases.Pointer(view)</c> straight into the binding; the
/// scope may be handed to helpers by value (its leases live in a per-thread pooled list, so a
/// kernel call allocates nothing).
/// </summary>
internal readonly unsafe ref struct LeaseScope
{
    [ThreadStatic] private static Leases? t_free;
    private readonly Leases _leases;

    /// <summary>Opens a scope.</summary>
    public LeaseScope()
    {
        _leases = t_free ?? new Leases();
        t_free = _leases.Next;
        _leases.Next = null;
    }

    /// <summary>The native stream (null for a null stream: the call then completes before it returns).</summary>
    public eplb_stream_t* Stream(ComputeStream? stream) => stream is null ? null : (eplb_stream_t*)_leases.Add(stream.Handle);

    /// <summary>The native buffer.</summary>
    public eplb_buffer_t* Buffer(BufferHandle buffer) => (eplb_buffer_t*)_leases.Add(buffer);

    /// <summary>The first element of the view, or null for a default (null) view.</summary>
    public T* Pointer<T>(DeviceSlice<T> view) where T : unmanaged
    {
        if (view.Buffer is not { } buffer) return null;
        _leases.Add(buffer.Handle);
        return buffer.Data + view.Offset;
    }

    /// <summary>The first element of the view, or null when the view is null or empty (optional outputs).</summary>
    public T* PointerOrNull<T>(DeviceSlice<T> view) where T : unmanaged => view.Length == 0 ? null : Pointer(view);

    /// <summary>Ends every lease of the scope.</summary>
    public void Dispose()
    {
        _leases.ReleaseAll();
        _leases.Next = t_free;
        t_free = _leases;
    }

    private sealed class Leases
    {
        private const int Capacity = 16;
        private readonly SafeHandle?[] _handles = new SafeHandle?[Capacity];
        private int _count;

        public Leases? Next;

        public nint Add(SafeHandle handle)
        {
            if (_count == Capacity) throw new InvalidOperationException($"a native call leases at most {Capacity} handles");
            var added = false;
            handle.DangerousAddRef(ref added);
            if (!added) throw new ObjectDisposedException(handle.GetType().Name);
            _handles[_count++] = handle;
            return handle.DangerousGetHandle();
        }

        public void ReleaseAll()
        {
            while (_count > 0)
            {
                _count--;
                _handles[_count]!.DangerousRelease();
                _handles[_count] = null;
            }
        }
    }
}
