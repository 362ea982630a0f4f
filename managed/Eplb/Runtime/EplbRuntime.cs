using System.Runtime.InteropServices;
using Eplb.Interop;

namespace Eplb.Runtime;

/// <summary>Where kernels run and buffers live.</summary>
public enum Backend
{
    /// <summary>The CPU reference implementation, on host memory.</summary>
    Cpu = 0,
    /// <summary>The CUDA kernels, on device memory of the current GPU.</summary>
    Cuda = 1,
}

/// <summary>What libeplb was built with and what this machine has (<c>eplb_runtime_info_t</c>).</summary>
/// <param name="LibraryVersion">libeplb's version string.</param>
/// <param name="LibraryPath">The file libeplb was loaded from.</param>
/// <param name="AbiVersion">The ABI version of the loaded library.</param>
/// <param name="CudaCompiled">Whether the CUDA backend is compiled in.</param>
/// <param name="CudaArchitectures">The CUDA architectures compiled in ("80;90"), empty without CUDA.</param>
/// <param name="CudaRuntimeVersion">CUDA runtime version built against (11080 = 11.8), 0 without CUDA.</param>
/// <param name="CudaDriverVersion">Installed driver's CUDA version, 0 without a driver.</param>
/// <param name="DeviceCount">Visible CUDA devices.</param>
/// <param name="Device">Current device ordinal, -1 when none.</param>
/// <param name="DeviceName">Current device's name, empty when none.</param>
/// <param name="ComputeCapability">Compute capability ("9.0"), empty when none.</param>
/// <param name="SmCount">Streaming multiprocessors of the current device.</param>
/// <param name="CooperativeLaunch">Whether the device supports cooperative launches.</param>
/// <param name="TotalMemoryBytes">Device memory in bytes.</param>
/// <param name="LastCudaError">The last CUDA error libeplb saw (0 = none).</param>
/// <param name="LastCudaErrorText">Its text, or why no device is usable.</param>
public sealed record RuntimeInfo(
    string LibraryVersion,
    string LibraryPath,
    uint AbiVersion,
    bool CudaCompiled,
    string CudaArchitectures,
    int CudaRuntimeVersion,
    int CudaDriverVersion,
    int DeviceCount,
    int Device,
    string DeviceName,
    string ComputeCapability,
    int SmCount,
    bool CooperativeLaunch,
    long TotalMemoryBytes,
    int LastCudaError,
    string LastCudaErrorText);

/// <summary>
/// Entry point to libeplb's runtime facts and backend choice. The backend comes from
/// <c>EPLB_BACKEND</c> (<c>auto</c>, <c>cpu</c> or <c>cuda</c>; default <c>auto</c>): auto picks CUDA
/// when it is compiled in and a device is usable, else the CPU.
/// </summary>
public static class EplbRuntime
{
    /// <summary>The environment variable that selects the default backend.</summary>
    public const string BackendVariable = "EPLB_BACKEND";

    /// <summary>Queries the loaded library and the machine.</summary>
    public static unsafe RuntimeInfo Info
    {
        get
        {
            eplb_runtime_info_t info;
            EplbException.ThrowIfFailed(NativeMethods.eplb_get_runtime_info(&info));
            var version = Marshal.PtrToStringUTF8((nint)NativeMethods.eplb_version_string()) ?? "";
            return new RuntimeInfo(
                version,
                NativeLibraryLoader.LoadedPath ?? "",
                info.abi_version,
                info.cuda_compiled != 0,
                Text(info.cuda_archs),
                info.cuda_runtime_version,
                info.cuda_driver_version,
                info.device_count,
                info.device,
                Text(info.device_name),
                info.device >= 0 ? $"{info.compute_capability_major}.{info.compute_capability_minor}" : "",
                info.sm_count,
                info.cooperative_launch != 0,
                info.total_memory_bytes,
                info.last_cuda_error,
                Text(info.last_cuda_error_string));
        }
    }

    /// <summary>Whether the backend can run on this machine.</summary>
    public static bool IsAvailable(Backend backend) => Availability(backend).Reason is null;

    /// <summary>Why the backend cannot run here ("built without CUDA", "no CUDA device: ..."), or null when it can.</summary>
    public static string? UnavailableReason(Backend backend) => Availability(backend).Reason;

    // The status of eplb_backend_available and, when it is not OK, why.
    private static unsafe (EplbStatus Status, string? Reason) Availability(Backend backend)
    {
        var status = NativeMethods.eplb_backend_available((eplb_backend_t)backend);
        return status switch
        {
            eplb_status_t.EPLB_STATUS_OK => (EplbStatus.Ok, null),
            eplb_status_t.EPLB_STATUS_NOT_COMPILED => (EplbStatus.NotCompiled, "built without CUDA"),
            // The native message already reads "no CUDA device: <CUDA error>".
            _ => ((EplbStatus)status, Marshal.PtrToStringUTF8((nint)NativeMethods.eplb_last_error_message()) ?? "no CUDA device"),
        };
    }

    /// <summary>
    /// The backend named by <c>EPLB_BACKEND</c> (auto when unset). Throws when the variable holds an
    /// unknown value or names CUDA on a machine that cannot run it.
    /// </summary>
    public static Backend DefaultBackend => ResolveBackend(Environment.GetEnvironmentVariable(BackendVariable));

    /// <summary>
    /// Resolves "auto", "cpu" or "cuda" (case-insensitive; null or empty = auto) to a backend that can
    /// run here. Throws <see cref="ArgumentException"/> for an unknown name and
    /// <see cref="EplbException"/> when CUDA is asked for but unavailable.
    /// </summary>
    public static Backend ResolveBackend(string? requested)
    {
        var name = string.IsNullOrWhiteSpace(requested) ? "auto" : requested.Trim().ToLowerInvariant();
        switch (name)
        {
            case "auto":
                return IsAvailable(Backend.Cuda) ? Backend.Cuda : Backend.Cpu;
            case "cpu":
                return Backend.Cpu;
            case "cuda":
                var (status, reason) = Availability(Backend.Cuda);
                if (reason != null) throw new EplbException(status, $"backend 'cuda' was requested but cannot run here: {reason}");
                return Backend.Cuda;
            default:
                throw new ArgumentException($"unknown backend '{requested}': use auto, cpu or cuda");
        }
    }

    private static unsafe string Text(byte* chars) => Marshal.PtrToStringUTF8((nint)chars) ?? "";
}
