using Eplb.Interop;

namespace Eplb.Migration;

/// <summary>
/// One weight tensor of a layer's local experts on one rank, laid out expert-major: local slot j
/// owns bytes <c>[j * BytesPerExpert, (j + 1) * BytesPerExpert)</c> of the underlying buffer. An expert's
/// weights and scales are several tensors; migration moves all of them together (SGLang #17158).
/// </summary>
public sealed unsafe class ExpertTensor
{
    private readonly BufferHandle _buffer;
    private readonly long _byteOffset;

    private ExpertTensor(string name, BufferHandle buffer, long byteOffset, long bytesPerExpert, int slots, Backend backend)
    {
        Name = name;
        _buffer = buffer;
        _byteOffset = byteOffset;
        BytesPerExpert = bytesPerExpert;
        Slots = slots;
        Backend = backend;
    }

    /// <summary>Wraps <paramref name="data"/> as <paramref name="slots"/> experts of equal size.</summary>
    /// <exception cref="ArgumentException">The slice does not split into <paramref name="slots"/> equal rows.</exception>
    public static ExpertTensor Create<T>(string name, DeviceSlice<T> data, int slots) where T : unmanaged
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, 1);
        var buffer = data.Buffer ?? throw new ArgumentNullException(nameof(data));
        if (data.Length == 0 || data.Length % slots != 0)
            throw new ArgumentException($"tensor '{name}' has {data.Length} elements, which do not split into {slots} experts", nameof(data));
        return new ExpertTensor(name, buffer.Handle, data.Offset * sizeof(T), data.Length / slots * sizeof(T), slots, buffer.Backend);
    }

    /// <summary>The tensor's name ("w13", "w2", "w13_scale", ...).</summary>
    public string Name { get; }

    /// <summary>Bytes of one expert.</summary>
    public long BytesPerExpert { get; }

    /// <summary>Local slots (R/G).</summary>
    public int Slots { get; }

    /// <summary>The backend holding the data.</summary>
    public Backend Backend { get; }

    /// <summary>Whether <paramref name="other"/> has the same name and per-expert size (same layout).</summary>
    public bool SameLayout(ExpertTensor other) => other.Name == Name && other.BytesPerExpert == BytesPerExpert;

    /// <summary>Copies one expert from <paramref name="source"/> (any backend, same layout) into <paramref name="slot"/>.</summary>
    public void CopySlotFrom(ExpertTensor source, int sourceSlot, int slot, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        if (!SameLayout(source))
            throw new ArgumentException($"tensor '{source.Name}' ({source.BytesPerExpert} B/expert) does not match '{Name}' ({BytesPerExpert} B/expert)", nameof(source));
        ArgumentOutOfRangeException.ThrowIfNegative(sourceSlot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(sourceSlot, source.Slots);
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, Slots);
        using var destinationLease = new HandleLease(_buffer);
        using var sourceLease = new HandleLease(source._buffer);
        eplb_stream_t* streamPointer = null;
        using var streamLease = stream is null ? default : stream.Lease(out streamPointer);
        EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_copy(_buffer.Pointer, (ulong)(_byteOffset + slot * BytesPerExpert),
            source._buffer.Pointer, (ulong)(source._byteOffset + sourceSlot * source.BytesPerExpert), (ulong)BytesPerExpert, streamPointer));
    }

    /// <summary>Reads one expert's bytes (tests and diagnostics).</summary>
    public byte[] ReadSlot(int slot)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, Slots);
        var bytes = new byte[BytesPerExpert];
        using var lease = new HandleLease(_buffer);
        fixed (byte* pointer = bytes)
            EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_read(_buffer.Pointer, (ulong)(_byteOffset + slot * BytesPerExpert), pointer,
                (ulong)BytesPerExpert, null));
        return bytes;
    }

    /// <summary>The device address of a slot and its lease (for NCCL, which takes raw pointers).</summary>
    internal HandleLease LeaseSlot(int slot, out nint address)
    {
        var lease = new HandleLease(_buffer);
        eplb_buffer_info_t info;
        EplbException.ThrowIfFailed(NativeMethods.eplb_buffer_get_info(_buffer.Pointer, &info));
        address = (nint)((byte*)info.data + _byteOffset + slot * BytesPerExpert);
        return lease;
    }
}
