using Eplb.Interop;

namespace Eplb.Runtime;

/// <summary>
/// A typed array on a backend: host memory on <see cref="Backend.Cpu"/>, device memory on
/// <see cref="Backend.Cuda"/>. Either allocated and owned by libeplb (the constructors), or memory
/// the host owns wrapped without a copy (<see cref="Wrap(Backend, int, T*, long, object?)"/>: a framework
/// tensor's storage, a pinned array) that kernels and the migration then read and write in place.
/// Its address never changes, so tables handed to kernels (and captured in CUDA graphs) stay valid
/// while their contents are updated in place.
/// </summary>
/// <typeparam name="T">An unmanaged element type.</typeparam>
public sealed unsafe class DeviceBuffer<T> : IDisposable where T : unmanaged
{
    private readonly BufferHandle _handle;
    private readonly T* _data;
    private readonly bool _ownsHandle;
    private DeviceBuffer<byte>? _bytes;

    /// <summary>Allocates <paramref name="length"/> uninitialised elements on the backend.</summary>
    public DeviceBuffer(Backend backend, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Backend = backend;
        Length = length;
        _handle = BufferHandle.Create((eplb_backend_t)backend, checked((ulong)length * (ulong)sizeof(T)));
        _ownsHandle = true;
        _data = Locate(_handle, out var device);
        Device = device;
    }

    /// <summary>Allocates a buffer on the backend holding a copy of <paramref name="values"/>.</summary>
    public DeviceBuffer(Backend backend, ReadOnlySpan<T> values) : this(backend, values.Length) => CopyFrom(values);

    // A wrapped range (Wrap): the handle owns only libeplb's record of the memory.
    private DeviceBuffer(BufferHandle handle, Backend backend, long length)
    {
        _handle = handle;
        _ownsHandle = true;
        Backend = backend;
        Length = length;
        IsWrapped = true;
        _data = Locate(handle, out var device);
        Device = device;
    }

    // Another element type's view of a buffer's memory; it does not own (or release) the buffer.
    private DeviceBuffer(BufferHandle handle, T* data, long length, Backend backend, int device, bool wrapped)
    {
        _handle = handle;
        _data = data;
        Length = length;
        Backend = backend;
        Device = device;
        IsWrapped = wrapped;
    }

    /// <summary>
    /// Wraps <paramref name="length"/> elements at <paramref name="pointer"/>, memory the caller owns,
    /// without copying it: every kernel, copy and <c>ExpertTensor</c> then works on that memory in
    /// place, and disposing the buffer releases only libeplb's record of it, never the memory.
    /// Validated once, here: the alignment of <typeparamref name="T"/> (the largest power of two up to
    /// 8 that divides its size) and, on CUDA, that the first and last byte are memory device
    /// <paramref name="device"/> can use (its own memory, managed memory, or mapped pinned host memory).
    /// </summary>
    /// <param name="backend">Where the memory is: host memory (<see cref="Backend.Cpu"/>) or CUDA memory.</param>
    /// <param name="device">The CUDA device ordinal; -1 for host memory.</param>
    /// <param name="pointer">The first element; not null.</param>
    /// <param name="length">Elements from <paramref name="pointer"/> on (may be 0).</param>
    /// <param name="owner">
    /// The object that owns the memory (a tensor, an array's pin): kept reachable until the buffer and
    /// every call still using it are done, so a garbage collector cannot free it under a kernel. It is
    /// never disposed by Eplb; an owner disposed explicitly (a tensor's <c>Dispose</c>) frees the memory
    /// regardless, so dispose the buffer first.
    /// </param>
    /// <exception cref="ArgumentNullException"><paramref name="pointer"/> is null.</exception>
    /// <exception cref="ArgumentException">A misaligned pointer, a device for host memory, or CUDA memory that the device cannot use (the message names it).</exception>
    /// <exception cref="EplbException">The backend is not compiled in or has no device.</exception>
    public static DeviceBuffer<T> Wrap(Backend backend, int device, T* pointer, long length, object? owner = null) =>
        Wrap(backend, device, pointer, length, owner, default);

    /// <summary>
    /// Wraps host memory (an array, a slice of one, native memory behind a <see cref="System.Buffers.MemoryManager{T}"/>)
    /// as a <see cref="Backend.Cpu"/> buffer without copying it: the memory is pinned until the buffer
    /// is disposed and the last call using it has returned, and what kernels write lands in it.
    /// </summary>
    /// <exception cref="ArgumentException">The memory is empty (there is no address to wrap).</exception>
    public static DeviceBuffer<T> Wrap(Memory<T> memory)
    {
        if (memory.IsEmpty) throw new ArgumentException("cannot wrap empty memory: it has no address", nameof(memory));
        var pin = memory.Pin();
        return Wrap(Backend.Cpu, -1, (T*)pin.Pointer, memory.Length, null, pin);
    }

    private static DeviceBuffer<T> Wrap(Backend backend, int device, T* pointer, long length, object? owner, System.Buffers.MemoryHandle pin)
    {
        try
        {
            if (pointer == null) throw new ArgumentNullException(nameof(pointer));
            ArgumentOutOfRangeException.ThrowIfNegative(length);
            var alignment = Alignment;
            if ((nuint)pointer % (nuint)alignment != 0)
                throw new ArgumentException(
                    $"pointer 0x{(nuint)pointer:x} is not aligned to {alignment} bytes, the alignment of {typeof(T).Name}", nameof(pointer));
        }
        catch
        {
            pin.Dispose();
            throw;
        }
        var handle = BufferHandle.Wrap((eplb_backend_t)backend, device, pointer, checked((ulong)length * (ulong)sizeof(T)), owner, pin);
        return new DeviceBuffer<T>(handle, backend, length);
    }

    // The natural alignment Wrap asks of T: the largest power of two up to 8 that divides its size.
    private static int Alignment
    {
        get
        {
            var size = sizeof(T);
            var alignment = 1;
            while (alignment < 8 && size % (alignment * 2) == 0) alignment *= 2;
            return alignment;
        }
    }

    // The first element and the device of a buffer (eplb_buffer_get_info).
    private static T* Locate(BufferHandle handle, out int device)
    {
        eplb_buffer_info_t info;
        using (var leases = new LeaseScope())
            EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_get_info(leases.Buffer(handle), &info));
        device = info.device;
        return (T*)info.data;
    }

    /// <summary>The backend whose memory holds the elements.</summary>
    public Backend Backend { get; }

    /// <summary>Number of elements.</summary>
    public long Length { get; }

    /// <summary>Size in bytes.</summary>
    public long SizeInBytes => Length * sizeof(T);

    /// <summary>The CUDA device ordinal of the memory; -1 for host memory.</summary>
    public int Device { get; }

    /// <summary>Whether the memory belongs to the caller (<see cref="Wrap(Backend, int, T*, long, object?)"/>): disposing releases only libeplb's record of it.</summary>
    public bool IsWrapped { get; }

    /// <summary>A view of <paramref name="length"/> elements starting at <paramref name="offset"/>.</summary>
    public DeviceSlice<T> Slice(long offset, long length) => new DeviceSlice<T>(this).Slice(offset, length);

    /// <summary>A view of the whole buffer.</summary>
    public DeviceSlice<T> AsSlice() => new(this);

    /// <summary>The buffer's memory as bytes (a view that lives as long as this buffer; disposing it does nothing).</summary>
    public DeviceBuffer<byte> AsBytes() => _bytes ??= new DeviceBuffer<byte>(_handle, (byte*)_data, SizeInBytes, Backend, Device, IsWrapped);

    /// <summary>Copies host values into the buffer at <paramref name="offset"/> (complete on return).</summary>
    public void CopyFrom(ReadOnlySpan<T> source, long offset = 0, ComputeStream? stream = null)
    {
        fixed (T* pointer = source) CopyHost(pointer, source.Length, offset, stream, toDevice: true, nameof(source));
    }

    /// <summary>Copies elements starting at <paramref name="offset"/> into host memory, after the stream's queued work.</summary>
    public void CopyTo(Span<T> destination, long offset = 0, ComputeStream? stream = null)
    {
        fixed (T* pointer = destination) CopyHost(pointer, destination.Length, offset, stream, toDevice: false, nameof(destination));
    }

    // Host memory <-> this buffer from element offset on (eplb_buffer_write / eplb_buffer_read).
    private void CopyHost(T* host, int length, long offset, ComputeStream? stream, bool toDevice, string name)
    {
        CheckRange(offset, length, name);
        if (length == 0) return;
        using var leases = new LeaseScope();
        var buffer = leases.Buffer(_handle);
        var queue = leases.Stream(stream);
        if (toDevice) EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_write(buffer, Bytes(offset), host, Bytes(length), queue));
        else EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_read(buffer, Bytes(offset), host, Bytes(length), queue));
    }

    /// <summary>Copies the whole buffer into a new array.</summary>
    public T[] ToArray(ComputeStream? stream = null)
    {
        var values = new T[Length];
        CopyTo(values, 0, stream);
        return values;
    }

    /// <summary>
    /// Copies <paramref name="count"/> elements from another buffer (any backend) into this one,
    /// queued on <paramref name="stream"/> (asynchronous on CUDA streams).
    /// </summary>
    public void CopyFrom(DeviceBuffer<T> source, long sourceOffset, long offset, long count, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        source.CheckRange(sourceOffset, count, nameof(sourceOffset));
        CheckRange(offset, count, nameof(offset));
        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_copy(leases.Buffer(_handle), Bytes(offset), leases.Buffer(source._handle),
            Bytes(sourceOffset), Bytes(count), leases.Stream(stream)));
    }

    /// <summary>Sets <paramref name="count"/> elements from <paramref name="offset"/> (all when count is -1) to <paramref name="value"/>.</summary>
    public void Fill(T value, long offset = 0, long count = -1, ComputeStream? stream = null)
    {
        if (count < 0) count = Length - offset;
        CheckRange(offset, count, nameof(offset));
        if (sizeof(T) is not (1 or 2 or 4 or 8))
            throw new NotSupportedException($"Fill supports elements of 1, 2, 4 or 8 bytes, not {typeof(T).Name} ({sizeof(T)} bytes)");
        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_fill(leases.Buffer(_handle), Bytes(offset), (ulong)count, &value, (uint)sizeof(T),
            leases.Stream(stream)));
    }

    /// <summary>The native buffer (leased through <see cref="LeaseScope"/>).</summary>
    internal BufferHandle Handle => _handle;

    /// <summary>The first element; valid while the handle is leased.</summary>
    internal T* Data => _data;

    internal void CheckRange(long offset, long count, string name)
    {
        if (offset < 0 || count < 0 || offset > Length || count > Length - offset)
            throw new ArgumentOutOfRangeException(name,
                $"range [{offset}, {offset} + {count}) lies outside the buffer of {Length} {typeof(T).Name} elements");
    }

    private static ulong Bytes(long elements) => (ulong)(elements * sizeof(T));

    /// <summary>
    /// Releases the memory, or for a wrapped buffer only libeplb's record of it (the memory stays the
    /// caller's). Queued work that still uses it must have finished.
    /// </summary>
    public void Dispose()
    {
        if (_ownsHandle) _handle.Dispose();
    }

    /// <inheritdoc/>
    public override string ToString() => $"DeviceBuffer<{typeof(T).Name}>[{Length}] on {Backend}{(IsWrapped ? " (wrapped)" : "")}";
}

/// <summary>A view of a contiguous range of a <see cref="DeviceBuffer{T}"/>: what kernels take.</summary>
/// <typeparam name="T">An unmanaged element type.</typeparam>
public readonly struct DeviceSlice<T> where T : unmanaged
{
    /// <summary>A view of the whole buffer.</summary>
    public DeviceSlice(DeviceBuffer<T> buffer)
    {
        Buffer = buffer ?? throw new ArgumentNullException(nameof(buffer));
        Offset = 0;
        Length = buffer.Length;
    }

    private DeviceSlice(DeviceBuffer<T> buffer, long offset, long length)
    {
        Buffer = buffer;
        Offset = offset;
        Length = length;
    }

    /// <summary>The underlying buffer (null for a default slice).</summary>
    public DeviceBuffer<T>? Buffer { get; }

    /// <summary>First element, in elements from the start of the buffer.</summary>
    public long Offset { get; }

    /// <summary>Number of elements.</summary>
    public long Length { get; }

    /// <summary>Whether the slice refers to a buffer.</summary>
    public bool IsNull => Buffer is null;

    /// <summary>The backend of the underlying buffer.</summary>
    public Backend Backend => (Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer")).Backend;

    /// <summary>A sub-range of this view.</summary>
    public DeviceSlice<T> Slice(long offset, long length)
    {
        var buffer = Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer");
        if (offset < 0 || length < 0 || offset > Length || length > Length - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"range [{offset}, {offset} + {length}) lies outside a slice of {Length} elements");
        return new DeviceSlice<T>(buffer, Offset + offset, length);
    }

    /// <summary>Copies the viewed elements to a new array.</summary>
    public T[] ToArray(ComputeStream? stream = null)
    {
        var buffer = Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer");
        var values = new T[Length];
        buffer.CopyTo(values, Offset, stream);
        return values;
    }

    /// <summary>Copies the viewed elements into host memory (lengths must match), after the stream's queued work.</summary>
    public void CopyTo(Span<T> destination, ComputeStream? stream = null)
    {
        var buffer = Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer");
        if (destination.Length != Length)
            throw new ArgumentException($"destination has {destination.Length} elements, the slice {Length}", nameof(destination));
        buffer.CopyTo(destination, Offset, stream);
    }

    /// <summary>Copies host values into the viewed range (lengths must match).</summary>
    public void CopyFrom(ReadOnlySpan<T> source, ComputeStream? stream = null)
    {
        var buffer = Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer");
        if (source.Length != Length)
            throw new ArgumentException($"source has {source.Length} elements, the slice {Length}", nameof(source));
        buffer.CopyFrom(source, Offset, stream);
    }

    /// <summary>Sets every viewed element to <paramref name="value"/>.</summary>
    public void Fill(T value, ComputeStream? stream = null) =>
        (Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer")).Fill(value, Offset, Length, stream);

    /// <summary>
    /// Copies the elements of <paramref name="source"/> (any backend; lengths must match) into this
    /// range, queued on <paramref name="stream"/> (asynchronous on CUDA streams).
    /// </summary>
    public void CopyFrom(DeviceSlice<T> source, ComputeStream? stream = null)
    {
        var buffer = Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer");
        var from = source.Buffer ?? throw new ArgumentNullException(nameof(source));
        if (source.Length != Length)
            throw new ArgumentException($"source has {source.Length} elements, the slice {Length}", nameof(source));
        buffer.CopyFrom(from, source.Offset, Offset, Length, stream);
    }

    /// <summary>The viewed elements as bytes.</summary>
    public DeviceSlice<byte> AsBytes()
    {
        var buffer = Buffer ?? throw new InvalidOperationException("default DeviceSlice has no buffer");
        var size = System.Runtime.CompilerServices.Unsafe.SizeOf<T>();
        return buffer.AsBytes().Slice(Offset * size, Length * size);
    }

    /// <summary>A view of the whole buffer.</summary>
    public static implicit operator DeviceSlice<T>(DeviceBuffer<T> buffer) => new(buffer);

    /// <summary>Calls <paramref name="use"/> with the address of the first element, the buffer leased meanwhile (for libraries that take raw device pointers, such as NCCL).</summary>
    internal unsafe TResult WithAddress<TResult>(Func<nint, TResult> use)
    {
        using var leases = new LeaseScope();
        return use((nint)leases.Pointer(this));
    }

    /// <inheritdoc/>
    public override string ToString() => Buffer is null ? "DeviceSlice<null>" : $"{Buffer}[{Offset}..{Offset + Length})";
}
