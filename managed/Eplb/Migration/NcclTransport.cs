using System.Runtime.InteropServices;
using Eplb.Interop;

namespace Eplb.Migration;

/// <summary>An NCCL unique id (128 bytes): made by one rank, handed to every rank by the host application.</summary>
public readonly struct NcclUniqueId
{
    /// <summary>The id's bytes (as ncclUniqueId).</summary>
    public NcclUniqueId(byte[] bytes)
    {
        ArgumentNullException.ThrowIfNull(bytes);
        if (bytes.Length != Nccl.UniqueIdBytes) throw new ArgumentException($"an NCCL unique id has {Nccl.UniqueIdBytes} bytes, not {bytes.Length}", nameof(bytes));
        Bytes = (byte[])bytes.Clone();
    }

    /// <summary>The raw id.</summary>
    public byte[] Bytes { get; }
}

/// <summary>
/// libnccl.so.2, loaded at run time (NCCL is the distributed engine for more than one GPU; a machine
/// without it can still use everything else). Only what EPLB needs: communicators, grouped
/// point-to-point send/recv and a small all-reduce.
/// </summary>
internal static unsafe class Nccl
{
    public const string LibraryFile = "libnccl.so.2";
    public const int UniqueIdBytes = 128;
    public const int Int8 = 0;
    public const int Int32 = 2;
    public const int Int64 = 4;
    public const int Sum = 0;
    public const int Min = 3;

    private static readonly Lazy<Api> Functions = new(LoadApi);

    public sealed class Api
    {
        public delegate* unmanaged[Cdecl]<int*, int> GetVersion;
        public delegate* unmanaged[Cdecl]<byte*, int> GetUniqueId;
        public delegate* unmanaged[Cdecl]<nint*, int, NcclUniqueIdBlob, int, int> CommInitRank;
        public delegate* unmanaged[Cdecl]<nint, int> CommDestroy;
        public delegate* unmanaged[Cdecl]<int> GroupStart;
        public delegate* unmanaged[Cdecl]<int> GroupEnd;
        public delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int> Send;
        public delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int> Recv;
        public delegate* unmanaged[Cdecl]<nint, nint, nuint, int, int, nint, nint, int> AllReduce;
        public delegate* unmanaged[Cdecl]<int, byte*> GetErrorString;
    }

    [StructLayout(LayoutKind.Sequential, Size = UniqueIdBytes)]
    public struct NcclUniqueIdBlob
    {
        private fixed byte _bytes[UniqueIdBytes];
    }

    /// <summary>The loaded API; throws <see cref="DllNotFoundException"/> naming the library when it is missing.</summary>
    public static Api Load() => Functions.Value;

    public static void Check(int result, string call)
    {
        if (result == 0) return;
        var text = Marshal.PtrToStringUTF8((nint)Load().GetErrorString(result)) ?? "unknown";
        throw new EplbException(EplbStatus.CudaError, $"{call} failed: NCCL error {result}: {text}");
    }

    private static Api LoadApi()
    {
        var path = Environment.GetEnvironmentVariable("EPLB_NCCL_PATH") is { Length: > 0 } custom ? custom : LibraryFile;
        if (!NativeLibrary.TryLoad(path, out var handle))
            throw new DllNotFoundException(
                $"{path} could not be loaded: NCCL is needed for the NCCL communicator (multi-GPU weight transfers). " +
                "Install NCCL 2 (e.g. the libnccl2 package or PyTorch's nvidia-nccl-cu12 wheel), put it on LD_LIBRARY_PATH, " +
                "or set EPLB_NCCL_PATH to the library file; single-process runs can use the in-process communicator.");
        nint Export(string name) => NativeLibrary.TryGetExport(handle, name, out var address)
            ? address
            : throw new EntryPointNotFoundException($"{path} has no {name}: NCCL >= 2.7 is required");
        return new Api
        {
            GetVersion = (delegate* unmanaged[Cdecl]<int*, int>)Export("ncclGetVersion"),
            GetUniqueId = (delegate* unmanaged[Cdecl]<byte*, int>)Export("ncclGetUniqueId"),
            CommInitRank = (delegate* unmanaged[Cdecl]<nint*, int, NcclUniqueIdBlob, int, int>)Export("ncclCommInitRank"),
            CommDestroy = (delegate* unmanaged[Cdecl]<nint, int>)Export("ncclCommDestroy"),
            GroupStart = (delegate* unmanaged[Cdecl]<int>)Export("ncclGroupStart"),
            GroupEnd = (delegate* unmanaged[Cdecl]<int>)Export("ncclGroupEnd"),
            Send = (delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int>)Export("ncclSend"),
            Recv = (delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int>)Export("ncclRecv"),
            AllReduce = (delegate* unmanaged[Cdecl]<nint, nint, nuint, int, int, nint, nint, int>)Export("ncclAllReduce"),
            GetErrorString = (delegate* unmanaged[Cdecl]<int, byte*>)Export("ncclGetErrorString"),
        };
    }
}

/// <summary>
/// One rank of a multi-process NCCL group: sends and receives expert weights with grouped
/// <c>ncclSend</c>/<c>ncclRecv</c> per batch on a CUDA stream, and all-reduces the load counters.
/// Create it only after <see cref="NcclEnvironment.Apply"/> (NCCL reads NCCL_MAX_CTAS when the
/// communicator is created).
/// </summary>
public sealed unsafe class NcclTransport : IExpertTransport
{
    private readonly Nccl.Api _nccl;
    private readonly ComputeStream _stream;
    private readonly nint _cudaStream;
    private nint _comm;

    /// <summary>Makes a unique id on this rank (typically rank 0), to be shared with every rank.</summary>
    public static NcclUniqueId CreateUniqueId()
    {
        var bytes = new byte[Nccl.UniqueIdBytes];
        fixed (byte* pointer = bytes) Nccl.Check(Nccl.Load().GetUniqueId(pointer), "ncclGetUniqueId");
        return new NcclUniqueId(bytes);
    }

    /// <summary>The NCCL version (e.g. 22005 for 2.20.5); throws when libnccl.so.2 is missing.</summary>
    public static int Version
    {
        get
        {
            int version;
            Nccl.Check(Nccl.Load().GetVersion(&version), "ncclGetVersion");
            return version;
        }
    }

    /// <summary>Joins the group as <paramref name="rank"/> of <paramref name="ranks"/> on the current CUDA device.</summary>
    /// <exception cref="InvalidOperationException">The NCCL environment rules have not run yet.</exception>
    /// <exception cref="DllNotFoundException">libnccl.so.2 is not installed.</exception>
    public NcclTransport(NcclUniqueId id, int rank, int ranks)
    {
        if (!NcclEnvironment.HasRun)
            throw new InvalidOperationException("run NcclEnvironment.Apply before creating an NCCL communicator: NCCL reads NCCL_MAX_CTAS at creation");
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, ranks);
        if (id.Bytes is null) throw new ArgumentException("the NCCL unique id is empty", nameof(id));
        _nccl = Nccl.Load();
        _stream = new ComputeStream(Backend.Cuda);
        using (_stream.Lease(out var streamPointer))
        {
            void* cuda;
            EplbException.ThrowIfFailed(NativeMethods.eplb_stream_get_cuda_stream(streamPointer, &cuda));
            _cudaStream = (nint)cuda;
        }
        Nccl.NcclUniqueIdBlob blob;
        fixed (byte* source = id.Bytes) Buffer.MemoryCopy(source, &blob, Nccl.UniqueIdBytes, Nccl.UniqueIdBytes);
        nint comm;
        Nccl.Check(_nccl.CommInitRank(&comm, ranks, blob, rank), "ncclCommInitRank");
        _comm = comm;
        Ranks = ranks;
        LocalRanks = [rank];
    }

    /// <inheritdoc/>
    public int Ranks { get; }

    /// <inheritdoc/>
    public IReadOnlyList<int> LocalRanks { get; }

    /// <inheritdoc/>
    public EplbCommunicator Kind => EplbCommunicator.Nccl;

    /// <inheritdoc/>
    public void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation)
    {
        cancellation.ThrowIfCancellationRequested();
        var me = LocalRanks[0];
        // The weights and the staging buffer belong to the model and the EPLB state, which outlive
        // the call; the stream is synchronised before returning, so the addresses stay valid.
        Nccl.Check(_nccl.GroupStart(), "ncclGroupStart");
        var groupOpen = true;
        try
        {
            foreach (var transfer in batch)
            {
                if (transfer.SourceRank == me)
                    foreach (var tensor in weightsOf(me))
                    {
                        using var lease = tensor.LeaseSlot(transfer.SourceSlot, out var address);
                        Nccl.Check(_nccl.Send(address, (nuint)tensor.BytesPerExpert, Nccl.Int8, transfer.DestinationRank, _comm, _cudaStream), "ncclSend");
                    }
                if (transfer.DestinationRank == me)
                    foreach (var tensor in stagingOf(me))
                    {
                        using var lease = tensor.LeaseSlot(transfer.DestinationSlot, out var address);
                        Nccl.Check(_nccl.Recv(address, (nuint)tensor.BytesPerExpert, Nccl.Int8, transfer.SourceRank, _comm, _cudaStream), "ncclRecv");
                    }
            }
            groupOpen = false;
            Nccl.Check(_nccl.GroupEnd(), "ncclGroupEnd");
        }
        finally
        {
            if (groupOpen) _nccl.GroupEnd();
        }
        _stream.Synchronize();
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<long> values)
    {
        if (values.IsEmpty) return;
        using var buffer = new DeviceBuffer<long>(Backend.Cuda, values);
        using (buffer.AsSlice().Lease(out var pointer))
            Nccl.Check(_nccl.AllReduce((nint)pointer, (nint)pointer, (nuint)values.Length, Nccl.Int64, Nccl.Sum, _comm, _cudaStream), "ncclAllReduce");
        buffer.CopyTo(values, 0, _stream);
    }

    /// <inheritdoc/>
    public int AllReduceMin(int value)
    {
        using var buffer = new DeviceBuffer<int>(Backend.Cuda, [value]);
        using (buffer.AsSlice().Lease(out var pointer))
            Nccl.Check(_nccl.AllReduce((nint)pointer, (nint)pointer, 1, Nccl.Int32, Nccl.Min, _comm, _cudaStream), "ncclAllReduce");
        return buffer.ToArray(_stream)[0];
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_comm != 0)
        {
            _nccl.CommDestroy(_comm);
            _comm = 0;
        }
        _stream.Dispose();
    }
}
