using System.Runtime.InteropServices;
using Eplb.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace Eplb.TorchSharp;

/// <summary>
/// A TorchSharp tensor's memory as an Eplb buffer, without a copy (<see cref="DeviceBuffer{T}.Wrap(Backend, int, T*, long, object?)"/>
/// over the tensor's data pointer): CPU tensors become <see cref="Backend.Cpu"/> buffers, CUDA
/// tensors <see cref="Backend.Cuda"/> buffers on the tensor's device (for those the host references a
/// CUDA build of libtorch; nothing else changes). What Eplb writes lands in the tensor and the
/// other way round.
/// </summary>
/// <remarks>
/// The buffer keeps the tensor object reachable, but a tensor disposed explicitly frees its memory
/// regardless: dispose the buffer (and let queued Eplb work finish) before the tensor. The tensor must
/// be contiguous, since a buffer is one range of memory; use <c>contiguous()</c> (a copy) otherwise.
/// </remarks>
public static unsafe class TensorMemory
{
    /// <summary>
    /// The tensor's elements as a buffer of <typeparamref name="T"/>, which must be the tensor's element
    /// type: <see cref="float"/> for Float32, <see cref="BFloat16"/> for BFloat16, <see cref="int"/> for
    /// Int32, <see cref="long"/> for Int64 (also double, Half, short, sbyte, byte, bool).
    /// </summary>
    /// <exception cref="ArgumentException">The tensor is empty, not contiguous, or of another element type.</exception>
    /// <exception cref="NotSupportedException">The tensor lives on a device other than the CPU or a CUDA GPU.</exception>
    public static DeviceBuffer<T> Wrap<T>(Tensor tensor) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(tensor);
        var expected = ScalarTypeOf<T>();
        if (tensor.dtype != expected)
            throw new ArgumentException($"the tensor holds {tensor.dtype} elements, not {typeof(T).Name} ({expected})", nameof(tensor));
        var (backend, device, data) = Locate(tensor);
        return DeviceBuffer<T>.Wrap(backend, device, (T*)data, tensor.numel(), tensor);
    }

    /// <summary>The tensor's memory as bytes, whatever its element type (weights, fp8 or block scales alike).</summary>
    /// <exception cref="ArgumentException">The tensor is empty or not contiguous.</exception>
    /// <exception cref="NotSupportedException">The tensor lives on a device other than the CPU or a CUDA GPU.</exception>
    public static DeviceBuffer<byte> WrapBytes(Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        var (backend, device, data) = Locate(tensor);
        return DeviceBuffer<byte>.Wrap(backend, device, (byte*)data, checked(tensor.numel() * tensor.element_size()), tensor);
    }

    /// <summary>The Eplb backend of a tensor's device: CPU or CUDA.</summary>
    /// <exception cref="NotSupportedException">Another device type (MPS, ...).</exception>
    public static Backend BackendOf(Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        return tensor.device_type switch
        {
            DeviceType.CPU => Backend.Cpu,
            DeviceType.CUDA => Backend.Cuda,
            var other => throw new NotSupportedException($"Eplb runs on CPU and CUDA tensors, not on {other}"),
        };
    }

    /// <summary>Whether two tensors live on the same device (type and index).</summary>
    public static bool SameDevice(Tensor a, Tensor b)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        return a.device_type == b.device_type && a.device_index == b.device_index;
    }

    /// <summary>The Eplb view of a dtype: the element type <see cref="Wrap{T}"/> takes for it.</summary>
    internal static ScalarType ScalarTypeOf<T>() where T : unmanaged =>
        typeof(T) == typeof(float) ? ScalarType.Float32
        : typeof(T) == typeof(BFloat16) ? ScalarType.BFloat16
        : typeof(T) == typeof(int) ? ScalarType.Int32
        : typeof(T) == typeof(long) ? ScalarType.Int64
        : typeof(T) == typeof(double) ? ScalarType.Float64
        : typeof(T) == typeof(Half) ? ScalarType.Float16
        : typeof(T) == typeof(short) ? ScalarType.Int16
        : typeof(T) == typeof(sbyte) ? ScalarType.Int8
        : typeof(T) == typeof(byte) ? ScalarType.Byte
        : typeof(T) == typeof(bool) ? ScalarType.Bool
        : throw new NotSupportedException($"no tensor element type corresponds to {typeof(T).Name}");

    // Where the tensor's first element is: backend, CUDA device (-1 for host memory) and address.
    private static (Backend Backend, int Device, nint Data) Locate(Tensor tensor)
    {
        var backend = BackendOf(tensor);
        if (tensor.numel() == 0) throw new ArgumentException("the tensor is empty: it has no memory to wrap", nameof(tensor));
        if (!tensor.is_contiguous())
            throw new ArgumentException($"the tensor [{string.Join(", ", tensor.shape)}] is not contiguous; wrap tensor.contiguous() (a copy)",
                nameof(tensor));
        var data = LibTorchSharp.DataPointer(tensor);
        if (data == 0) throw new ArgumentException("the tensor has no data pointer", nameof(tensor));
        return (backend, backend == Backend.Cuda ? tensor.device_index : -1, data);
    }
}

/// <summary>
/// The one libtorch fact TorchSharp does not expose publicly: a tensor's data pointer
/// (<c>at::Tensor::data_ptr()</c>, storage offset included; a device address for CUDA tensors), read
/// through LibTorchSharp's own export <c>THSTensor_data</c> from the copy TorchSharp has loaded.
/// </summary>
internal static unsafe class LibTorchSharp
{
    private static readonly Lazy<nint> TensorData = new(() => NativeLibrary.GetExport(Loaded(), "THSTensor_data"));

    /// <summary>The address of the tensor's first element.</summary>
    public static nint DataPointer(Tensor tensor) => ((delegate* unmanaged[Cdecl]<nint, nint>)TensorData.Value)(tensor.Handle);

    // By its file name the loader returns the library already loaded (Linux: its soname), so this is
    // TorchSharp's copy, never a second one; the assembly-relative probe is the fallback.
    private static nint Loaded()
    {
        var file = OperatingSystem.IsWindows() ? "LibTorchSharp.dll" : OperatingSystem.IsMacOS() ? "libLibTorchSharp.dylib" : "libLibTorchSharp.so";
        if (NativeLibrary.TryLoad(file, out var handle)) return handle;
        if (NativeLibrary.TryLoad("LibTorchSharp", typeof(torch).Assembly, null, out handle)) return handle;
        throw new DllNotFoundException($"{file}, TorchSharp's native library, is not loaded: create a tensor first, or reference TorchSharp-cpu or a CUDA build");
    }
}
