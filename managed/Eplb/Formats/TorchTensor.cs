using System.Buffers.Binary;
using System.Globalization;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>The tensor element types read from and written to <c>torch.save</c> archives.</summary>
public enum TorchDType
{
    /// <summary><c>torch.int32</c> (<c>torch.IntStorage</c>).</summary>
    Int32,

    /// <summary><c>torch.int64</c> (<c>torch.LongStorage</c>).</summary>
    Int64,

    /// <summary><c>torch.float32</c> (<c>torch.FloatStorage</c>).</summary>
    Float32,

    /// <summary><c>torch.float64</c> (<c>torch.DoubleStorage</c>).</summary>
    Float64,
}

/// <summary>
/// A dense tensor of a <c>torch.save</c> archive: a view (shape, strides, offset) of a little-endian
/// storage. One read from an archive reads its storage record only when its values are asked for,
/// so the archive must still be open then.
/// </summary>
public sealed class TorchTensor
{
    private readonly long[] _shape;
    private readonly long[] _strides;

    internal TorchTensor(TorchStorage storage, long storageOffset, long[] shape, long[] strides, long maxElements)
    {
        if (shape.Length != strides.Length)
            throw new InvalidDataException($"a tensor has {shape.Length} sizes but {strides.Length} strides");
        if (storageOffset < 0) throw new InvalidDataException($"a tensor has storage offset {storageOffset}");
        long count = 1, last = storageOffset;
        try
        {
            for (var d = 0; d < shape.Length; d++)
            {
                if (shape[d] < 0) throw new InvalidDataException($"a tensor has size {shape[d]} in dimension {d}");
                if (strides[d] < 0) throw new InvalidDataException($"a tensor has stride {strides[d]} in dimension {d}");
                count = checked(count * shape[d]);
            }
            if (count > maxElements)
                throw new InvalidDataException($"a tensor of shape {ShapeText(shape)} has {count} elements, above the limit of {maxElements}");
            if (count > 0)
                for (var d = 0; d < shape.Length; d++) last = checked(last + (shape[d] - 1) * strides[d]);
        }
        catch (OverflowException)
        {
            throw new InvalidDataException($"a tensor of shape {ShapeText(shape)} and strides {ShapeText(strides)} overflows 64-bit indexing");
        }
        if (count > 0 && last >= storage.Elements)
            throw new InvalidDataException(
                $"a tensor of shape {ShapeText(shape)}, strides {ShapeText(strides)} and offset {storageOffset} reaches element {last} " +
                $"of storage '{storage.Key}', which holds {storage.Elements}");
        Storage = storage;
        StorageOffset = storageOffset;
        _shape = shape;
        _strides = strides;
        ElementCount = count;
    }

    internal TorchStorage Storage { get; }

    /// <summary>The element type.</summary>
    public TorchDType DType => Storage.DType;

    /// <summary>The size of each dimension.</summary>
    public IReadOnlyList<long> Shape => _shape;

    /// <summary>The stride of each dimension, in elements of the storage.</summary>
    public IReadOnlyList<long> Strides => _strides;

    /// <summary>The index in the storage of the first element.</summary>
    public long StorageOffset { get; }

    /// <summary>The number of elements (the product of <see cref="Shape"/>).</summary>
    public long ElementCount { get; }

    /// <summary>The shape as Python prints it, for messages: <c>[61, 256]</c>.</summary>
    public string ShapeText() => ShapeText(_shape);

    internal static string ShapeText(IEnumerable<long> values) => "[" + string.Join(", ", values) + "]";

    /// <summary>A contiguous tensor over a copy of <paramref name="values"/>.</summary>
    /// <exception cref="ArgumentException">The shape's product is not the number of values.</exception>
    public static TorchTensor FromInt32(ReadOnlySpan<int> values, params long[] shape) => FromValues(TorchDType.Int32, values.Length, shape,
        (bytes, values) => { for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(i * 4), values[i]); }, values);

    /// <summary>A contiguous tensor over a copy of <paramref name="values"/>.</summary>
    /// <exception cref="ArgumentException">The shape's product is not the number of values.</exception>
    public static TorchTensor FromInt64(ReadOnlySpan<long> values, params long[] shape) => FromValues(TorchDType.Int64, values.Length, shape,
        (bytes, values) => { for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan(i * 8), values[i]); }, values);

    /// <summary>A contiguous tensor over a copy of <paramref name="values"/>.</summary>
    /// <exception cref="ArgumentException">The shape's product is not the number of values.</exception>
    public static TorchTensor FromFloat32(ReadOnlySpan<float> values, params long[] shape) => FromValues(TorchDType.Float32, values.Length, shape,
        (bytes, values) => { for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), values[i]); }, values);

    /// <summary>A contiguous tensor over a copy of <paramref name="values"/>.</summary>
    /// <exception cref="ArgumentException">The shape's product is not the number of values.</exception>
    public static TorchTensor FromFloat64(ReadOnlySpan<double> values, params long[] shape) => FromValues(TorchDType.Float64, values.Length, shape,
        (bytes, values) => { for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteDoubleLittleEndian(bytes.AsSpan(i * 8), values[i]); }, values);

    private delegate void Fill<T>(byte[] bytes, ReadOnlySpan<T> values);

    private static TorchTensor FromValues<T>(TorchDType dtype, int length, long[] shape, Fill<T> fill, ReadOnlySpan<T> values)
    {
        ArgumentNullException.ThrowIfNull(shape);
        long count = 1;
        foreach (var size in shape)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(size, nameof(shape));
            count = checked(count * size);
        }
        if (count != length) throw new ArgumentException($"shape {ShapeText(shape)} holds {count} elements, but {length} values were given", nameof(shape));
        var bytes = new byte[(long)length * ElementSize(dtype)];
        fill(bytes, values);
        var strides = new long[shape.Length];
        long stride = 1;
        for (var d = shape.Length - 1; d >= 0; d--)
        {
            strides[d] = stride;
            stride *= Math.Max(shape[d], 1);
        }
        return new TorchTensor(TorchStorage.InMemory(dtype, bytes), 0, (long[])shape.Clone(), strides, long.MaxValue);
    }

    /// <summary>The same view over a storage recorded under another key (the archive writer numbers them).</summary>
    internal TorchTensor WithStorageKey(string key) => new(Storage.WithKey(key), StorageOffset, _shape, _strides, long.MaxValue);

    /// <summary>The values in row-major order, as doubles (exact for integers below 2^53).</summary>
    /// <exception cref="InvalidDataException">The storage record is missing, truncated or of another size.</exception>
    public double[] ToDoubles()
    {
        var result = new double[ElementCount];
        var i = 0;
        ForEach(value => result[i++] = value);
        return result;
    }

    /// <summary>The values in row-major order; integer tensors only.</summary>
    /// <exception cref="InvalidDataException">The tensor is a floating-point one, or its storage cannot be read.</exception>
    public long[] ToInt64s()
    {
        if (DType is not (TorchDType.Int32 or TorchDType.Int64))
            throw new InvalidDataException($"expected an integer tensor, found {DType.ToString().ToLowerInvariant()}");
        var bytes = Storage.Read();
        var result = new long[ElementCount];
        var i = 0;
        var int32 = DType == TorchDType.Int32;
        Walk(index => result[i++] = int32
            ? BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan((int)(index * 4)))
            : BinaryPrimitives.ReadInt64LittleEndian(bytes.AsSpan((int)(index * 8))));
        return result;
    }

    /// <summary>
    /// Adds element <c>i</c> (row-major) to <c>sum[i % sum.Length]</c>: a <c>[T][L][N]</c> tensor into an
    /// <c>[L*N]</c> sum adds up its T steps. Each value must be finite and &gt;= 0.
    /// </summary>
    /// <exception cref="InvalidDataException">A value is negative or not finite (the message names it), or the storage cannot be read.</exception>
    internal void AccumulateCounts(Span<double> sum, string name)
    {
        if (sum.Length == 0 || ElementCount % sum.Length != 0)
            throw new ArgumentException($"{ElementCount} elements do not fold into {sum.Length}", nameof(sum));
        var cells = sum.Length;
        var target = sum.ToArray();
        long i = 0;
        ForEach(value =>
        {
            if (!double.IsFinite(value) || value < 0)
                throw new InvalidDataException($"{name}{IndexText(i)} = {value.ToString("R", CultureInfo.InvariantCulture)}: counts must be finite and >= 0");
            target[i % cells] += value;
            i++;
        });
        target.CopyTo(sum);
    }

    private string IndexText(long flat)
    {
        var index = new long[_shape.Length];
        for (var d = _shape.Length - 1; d >= 0; d--)
        {
            index[d] = _shape[d] == 0 ? 0 : flat % _shape[d];
            flat /= Math.Max(_shape[d], 1);
        }
        return string.Concat(index.Select(v => $"[{v}]"));
    }

    private void ForEach(Action<double> visit)
    {
        var bytes = Storage.Read();
        switch (DType)
        {
            case TorchDType.Int32: Walk(index => visit(BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan((int)(index * 4))))); break;
            case TorchDType.Int64: Walk(index => visit(BinaryPrimitives.ReadInt64LittleEndian(bytes.AsSpan((int)(index * 8))))); break;
            case TorchDType.Float32: Walk(index => visit(BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan((int)(index * 4))))); break;
            default: Walk(index => visit(BinaryPrimitives.ReadDoubleLittleEndian(bytes.AsSpan((int)(index * 8))))); break;
        }
    }

    // Visits the storage index of every element in row-major order (an odometer over the shape):
    // strides and the offset are honoured, so non-contiguous views read as torch reads them.
    private void Walk(Action<long> visit)
    {
        if (ElementCount == 0) return;
        var rank = _shape.Length;
        var counter = new long[rank];
        var index = StorageOffset;
        for (long n = 0; n < ElementCount; n++)
        {
            visit(index);
            for (var d = rank - 1; d >= 0; d--)
            {
                if (++counter[d] < _shape[d])
                {
                    index += _strides[d];
                    break;
                }
                index -= (_shape[d] - 1) * _strides[d];
                counter[d] = 0;
            }
        }
    }

    /// <summary>Bytes per element.</summary>
    public static int ElementSize(TorchDType dtype) => dtype is TorchDType.Int32 or TorchDType.Float32 ? 4 : 8;

    /// <inheritdoc />
    public override string ToString() => $"{DType.ToString().ToLowerInvariant()} tensor {ShapeText()}";
}

/// <summary>
/// A storage: <see cref="Elements"/> little-endian values of one type, in an archive record
/// (<c>data/{key}</c>) or in memory.
/// </summary>
internal sealed class TorchStorage
{
    private readonly Func<byte[]> _read;

    private TorchStorage(TorchDType dtype, string key, long elements, Func<byte[]> read)
    {
        DType = dtype;
        Key = key;
        Elements = elements;
        _read = read;
    }

    public TorchDType DType { get; }

    /// <summary>The record key (<c>data/{Key}</c> in the archive).</summary>
    public string Key { get; }

    public long Elements { get; }

    /// <summary>The storage's bytes, exactly <c>Elements * ElementSize</c> of them.</summary>
    public byte[] Read() => _read();

    public TorchStorage WithKey(string key) => new(DType, key, Elements, _read);

    public static TorchStorage InMemory(TorchDType dtype, byte[] bytes) =>
        new(dtype, "0", bytes.LongLength / TorchTensor.ElementSize(dtype), () => bytes);

    public static TorchStorage InArchive(TorchDType dtype, string key, long elements, Func<byte[]> read) => new(dtype, key, elements, read);
}
