using Eplb.Runtime;

namespace Eplb.Migration;

/// <summary>
/// One weight tensor of a layer's local experts on one rank, laid out expert-major: local slot j
/// owns bytes <c>[j * BytesPerExpert, (j + 1) * BytesPerExpert)</c> of the underlying buffer. An expert's
/// weights and scales are several tensors; migration moves all of them together (SGLang #17158).
/// </summary>
public sealed class ExpertTensor
{
    private readonly DeviceSlice<byte> _bytes;

    private ExpertTensor(string name, DeviceSlice<byte> bytes, int slots)
    {
        Name = name;
        _bytes = bytes;
        BytesPerExpert = bytes.Length / slots;
        SlotsPerRank = slots;
    }

    /// <summary>Wraps <paramref name="data"/> as <paramref name="slots"/> experts of equal size.</summary>
    /// <exception cref="ArgumentException">The slice does not split into <paramref name="slots"/> equal rows.</exception>
    public static ExpertTensor Create<T>(string name, DeviceSlice<T> data, int slots) where T : unmanaged
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, 1);
        if (data.IsNull) throw new ArgumentNullException(nameof(data));
        if (data.Length == 0 || data.Length % slots != 0)
            throw new ArgumentException($"tensor '{name}' has {data.Length} elements, which do not split into {slots} experts", nameof(data));
        return new ExpertTensor(name, data.AsBytes(), slots);
    }

    /// <summary>The tensor's name ("w13", "w2", "w13_scale", ...).</summary>
    public string Name { get; }

    /// <summary>Bytes of one expert.</summary>
    public long BytesPerExpert { get; }

    /// <summary>R/G, the local slots (experts) the tensor holds.</summary>
    public int SlotsPerRank { get; }

    /// <summary>The backend holding the data.</summary>
    public Backend Backend => _bytes.Backend;

    /// <summary>Whether <paramref name="other"/> has the same name and per-expert size (same layout).</summary>
    public bool SameLayout(ExpertTensor other) => other.Name == Name && other.BytesPerExpert == BytesPerExpert;

    /// <summary>Copies one expert from <paramref name="source"/> (any backend, same layout) into <paramref name="slot"/>.</summary>
    public void CopySlotFrom(ExpertTensor source, int sourceSlot, int slot, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        if (!SameLayout(source))
            throw new ArgumentException($"tensor '{source.Name}' ({source.BytesPerExpert} B/expert) does not match '{Name}' ({BytesPerExpert} B/expert)", nameof(source));
        ArgumentOutOfRangeException.ThrowIfNegative(sourceSlot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(sourceSlot, source.SlotsPerRank);
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, SlotsPerRank);
        Slot(slot).CopyFrom(source.Slot(sourceSlot), stream);
    }

    /// <summary>Reads one expert's bytes (tests and diagnostics).</summary>
    public byte[] ReadSlot(int slot)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slot);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, SlotsPerRank);
        return Slot(slot).ToArray();
    }

    /// <summary>The bytes of one local slot.</summary>
    internal DeviceSlice<byte> Slot(int slot) => _bytes.Slice(slot * BytesPerExpert, BytesPerExpert);
}
