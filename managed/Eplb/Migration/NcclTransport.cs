using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using Eplb.Runtime;
using Microsoft.Extensions.Logging;

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

/// <summary>The result codes of NCCL (<c>ncclResult_t</c>).</summary>
public enum NcclResult
{
    /// <summary>ncclSuccess.</summary>
    Success = 0,
    /// <summary>ncclUnhandledCudaError: a CUDA call inside NCCL failed.</summary>
    UnhandledCudaError = 1,
    /// <summary>ncclSystemError: a system call (socket, memory, shared memory) failed.</summary>
    SystemError = 2,
    /// <summary>ncclInternalError: a bug in NCCL, or memory corruption.</summary>
    InternalError = 3,
    /// <summary>ncclInvalidArgument: a bad argument (a pointer, a count, a rank).</summary>
    InvalidArgument = 4,
    /// <summary>ncclInvalidUsage: the calls are in a wrong order or the ranks disagree.</summary>
    InvalidUsage = 5,
    /// <summary>ncclRemoteError: a peer failed or went away.</summary>
    RemoteError = 6,
    /// <summary>ncclInProgress: a non-blocking call has not finished.</summary>
    InProgress = 7,
}

/// <summary>An NCCL call failed; <see cref="Result"/> and <see cref="ResultText"/> are NCCL's own.</summary>
public sealed class NcclException : Exception
{
    /// <summary>Creates the exception for a failed NCCL call.</summary>
    public NcclException(string call, NcclResult result, string resultText)
        : base($"{call} failed: NCCL error {(int)result} ({result}): {resultText}")
    {
        Call = call;
        Result = result;
        ResultText = resultText;
    }

    /// <summary>The NCCL function that failed ("ncclSend").</summary>
    public string Call { get; }

    /// <summary>The <c>ncclResult_t</c> it returned.</summary>
    public NcclResult Result { get; }

    /// <summary>NCCL's text for the result (<c>ncclGetErrorString</c>).</summary>
    public string ResultText { get; }
}

/// <summary>
/// libnccl.so.2 could not be loaded (or lacks a function EPLB needs). The message says what to
/// install and which variable points at it.
/// </summary>
public sealed class NcclNotFoundException : DllNotFoundException
{
    internal NcclNotFoundException(string path, string message) : base(message) => Path = path;

    /// <summary>The file that was tried (<c>EPLB_NCCL_PATH</c>, or libnccl.so.2 through the loader's search path).</summary>
    public string Path { get; }
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
        public delegate* unmanaged[Cdecl]<nint, int> CommAbort;
        public delegate* unmanaged[Cdecl]<int> GroupStart;
        public delegate* unmanaged[Cdecl]<int> GroupEnd;
        public delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int> Send;
        public delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int> Recv;
        public delegate* unmanaged[Cdecl]<nint, nint, nuint, int, int, nint, nint, int> AllReduce;
        public delegate* unmanaged[Cdecl]<nint, nint, nuint, int, int, nint, nint, int> Broadcast;
        public delegate* unmanaged[Cdecl]<int, byte*> GetErrorString;
    }

    [StructLayout(LayoutKind.Sequential, Size = UniqueIdBytes)]
    public struct NcclUniqueIdBlob
    {
        private fixed byte _bytes[UniqueIdBytes];
    }

    /// <summary>The variable that names the NCCL library file.</summary>
    public const string PathVariable = "EPLB_NCCL_PATH";

    /// <summary>The loaded API; throws <see cref="NcclNotFoundException"/> naming the library when it is missing.</summary>
    public static Api Load() => Functions.Value;

    public static void Check(int result, string call)
    {
        if (result == 0) return;
        var text = Marshal.PtrToStringUTF8((nint)Load().GetErrorString(result)) ?? "unknown";
        throw new NcclException(call, (NcclResult)result, text);
    }

    private static Api LoadApi()
    {
        var path = Environment.GetEnvironmentVariable(PathVariable) is { Length: > 0 } custom ? custom : LibraryFile;
        if (!NativeLibrary.TryLoad(path, out var handle))
            throw new NcclNotFoundException(path,
                $"{path} could not be loaded: NCCL is needed for the NCCL communicator (multi-GPU weight transfers). " +
                "Install NCCL 2: the pip wheel nvidia-nccl-cu12 (or nvidia-nccl-cu13 for CUDA 13; PyTorch ships it, under " +
                "site-packages/nvidia/nccl/lib) or the libnccl2 package; then put its folder on LD_LIBRARY_PATH or set " +
                $"{PathVariable} to the library file. Single-process runs can use the in-process communicator.");
        nint Export(string name) => NativeLibrary.TryGetExport(handle, name, out var address)
            ? address
            : throw new NcclNotFoundException(path, $"{path} has no {name}: NCCL >= 2.7 is required (set {PathVariable} to a newer libnccl.so.2)");
        return new Api
        {
            GetVersion = (delegate* unmanaged[Cdecl]<int*, int>)Export("ncclGetVersion"),
            GetUniqueId = (delegate* unmanaged[Cdecl]<byte*, int>)Export("ncclGetUniqueId"),
            CommInitRank = (delegate* unmanaged[Cdecl]<nint*, int, NcclUniqueIdBlob, int, int>)Export("ncclCommInitRank"),
            CommDestroy = (delegate* unmanaged[Cdecl]<nint, int>)Export("ncclCommDestroy"),
            CommAbort = (delegate* unmanaged[Cdecl]<nint, int>)Export("ncclCommAbort"),
            GroupStart = (delegate* unmanaged[Cdecl]<int>)Export("ncclGroupStart"),
            GroupEnd = (delegate* unmanaged[Cdecl]<int>)Export("ncclGroupEnd"),
            Send = (delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int>)Export("ncclSend"),
            Recv = (delegate* unmanaged[Cdecl]<nint, nuint, int, int, nint, nint, int>)Export("ncclRecv"),
            AllReduce = (delegate* unmanaged[Cdecl]<nint, nint, nuint, int, int, nint, nint, int>)Export("ncclAllReduce"),
            Broadcast = (delegate* unmanaged[Cdecl]<nint, nint, nuint, int, int, nint, nint, int>)Export("ncclBroadcast"),
            GetErrorString = (delegate* unmanaged[Cdecl]<int, byte*>)Export("ncclGetErrorString"),
        };
    }
}

/// <summary>
/// One rank of a multi-process NCCL group: sends and receives expert weights with grouped
/// <c>ncclSend</c>/<c>ncclRecv</c> per batch, and all-reduces the load counters and votes.
/// Its constructor applies the NCCL environment rule (<see cref="NcclEnvironment.Apply"/>) before it
/// creates the communicators, because NCCL reads NCCL_MAX_CTAS then; a host whose own NCCL
/// communicators come first applies the rule itself, earlier (applying it twice changes nothing).
/// <para>
/// Two communicators, each with its own CUDA stream: transfers (EPLB's background worker) on one,
/// all-reduces (the serving thread) on the other. NCCL needs every rank to issue the operations of a
/// communicator in one order, which two threads sharing one communicator cannot promise. The second
/// communicator's id is made by rank 0 and broadcast over the first while every rank constructs.
/// </para>
/// <para>
/// A cancelled transfer: NCCL cannot withdraw queued sends and receives, so the transfer
/// communicator is aborted (<c>ncclCommAbort</c>) and its stream drained before
/// <see cref="OperationCanceledException"/> is thrown; later transfers of this instance then fail
/// with an <see cref="InvalidOperationException"/> saying so (create a new transport on every rank).
/// The all-reduce communicator is untouched.
/// </para>
/// </summary>
public sealed unsafe class NcclTransport : IExpertTransport
{
    private readonly Nccl.Api _nccl;
    private readonly ComputeStream _stream;
    private readonly nint _cudaStream;
    private readonly ComputeStream _transferStream;
    private readonly nint _transferCudaStream;
    private nint _comm;
    private nint _transferComm;
    private volatile bool _transferring;

    /// <summary>Makes a unique id on this rank (typically rank 0), to be shared with every rank.</summary>
    public static NcclUniqueId CreateUniqueId()
    {
        var bytes = new byte[Nccl.UniqueIdBytes];
        fixed (byte* pointer = bytes) Nccl.Check(Nccl.Load().GetUniqueId(pointer), "ncclGetUniqueId");
        return new NcclUniqueId(bytes);
    }

    /// <summary>The NCCL version (e.g. 22005 for 2.20.5); throws <see cref="NcclNotFoundException"/> when libnccl.so.2 is missing.</summary>
    public static int Version
    {
        get
        {
            int version;
            Nccl.Check(Nccl.Load().GetVersion(&version), "ncclGetVersion");
            return version;
        }
    }

    /// <summary>
    /// Joins the group as <paramref name="rank"/> of <paramref name="ranks"/> on the current CUDA
    /// device, after applying the NCCL environment rule for <paramref name="environment"/>.
    /// </summary>
    /// <exception cref="NcclNotFoundException">libnccl.so.2 is not installed.</exception>
    /// <exception cref="NcclException">NCCL could not create the communicator.</exception>
    public NcclTransport(NcclUniqueId id, int rank, int ranks, NcclEnvironmentContext environment, ILogger? logger = null)
        : this(id, rank, ranks, environment, logger, null)
    {
    }

    /// <summary>As the public constructor, with the environment variables in a dictionary (tests).</summary>
    internal NcclTransport(NcclUniqueId id, int rank, int ranks, NcclEnvironmentContext environment, ILogger? logger,
        IDictionary<string, string?>? environmentVariables)
    {
        ArgumentNullException.ThrowIfNull(environment);
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, ranks);
        if (id.Bytes is null) throw new ArgumentException("the NCCL unique id is empty", nameof(id));
        NcclEnvironment.Apply(environment, logger, environmentVariables);
        _nccl = Nccl.Load();
        _stream = new ComputeStream(Backend.Cuda);
        _transferStream = new ComputeStream(Backend.Cuda);
        try
        {
            _cudaStream = _stream.CudaStream;
            _transferCudaStream = _transferStream.CudaStream;
            _comm = InitRank(id.Bytes, rank, ranks);
            // The transfer communicator: rank 0 makes its id, the first communicator carries it to every rank.
            var transferId = rank == 0 ? CreateUniqueId().Bytes : new byte[Nccl.UniqueIdBytes];
            using (var buffer = new DeviceBuffer<byte>(Backend.Cuda, transferId))
            {
                Nccl.Check(buffer.AsSlice().WithAddress(address =>
                    _nccl.Broadcast(address, address, (nuint)Nccl.UniqueIdBytes, Nccl.Int8, 0, _comm, _cudaStream)), "ncclBroadcast");
                buffer.CopyTo(transferId, 0, _stream);
            }
            _transferComm = InitRank(transferId, rank, ranks);
        }
        catch
        {
            Dispose();
            throw;
        }
        Ranks = ranks;
        LocalRanks = [rank];
    }

    private nint InitRank(byte[] id, int rank, int ranks)
    {
        Nccl.NcclUniqueIdBlob blob;
        fixed (byte* source = id) Buffer.MemoryCopy(source, &blob, Nccl.UniqueIdBytes, Nccl.UniqueIdBytes);
        nint comm;
        Nccl.Check(_nccl.CommInitRank(&comm, ranks, blob, rank), "ncclCommInitRank");
        return comm;
    }

    /// <inheritdoc/>
    public int Ranks { get; }

    /// <inheritdoc/>
    public IReadOnlyList<int> LocalRanks { get; }

    /// <inheritdoc/>
    public TransportKind Kind => TransportKind.Nccl;

    /// <inheritdoc/>
    public void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation)
    {
        cancellation.ThrowIfCancellationRequested();
        var comm = _transferComm;
        if (comm == 0)
            throw new InvalidOperationException("the NCCL transfer communicator was aborted when an earlier transfer was cancelled; " +
                                                "create a new NcclTransport on every rank to move weights again");
        var me = LocalRanks[0];
        // The weights and the staging buffer belong to the model and the EPLB state, which outlive
        // the call; the stream is drained before returning, so the addresses stay valid.
        _transferring = true;
        try
        {
            // Resolve the tensors first: a model that throws here has queued nothing.
            var sends = weightsOf(me);
            var receives = stagingOf(me);
            Nccl.Check(_nccl.GroupStart(), "ncclGroupStart");
            var groupOpen = true;
            try
            {
                foreach (var transfer in batch)
                {
                    if (transfer.SourceRank == me)
                        foreach (var tensor in sends)
                            Nccl.Check(tensor.Slot(transfer.SourceSlot).WithAddress(address =>
                                _nccl.Send(address, (nuint)tensor.BytesPerExpert, Nccl.Int8, transfer.DestinationRank, comm, _transferCudaStream)), "ncclSend");
                    if (transfer.DestinationRank == me)
                        foreach (var tensor in receives)
                            Nccl.Check(tensor.Slot(transfer.DestinationSlot).WithAddress(address =>
                                _nccl.Recv(address, (nuint)tensor.BytesPerExpert, Nccl.Int8, transfer.SourceRank, comm, _transferCudaStream)), "ncclRecv");
                }
                groupOpen = false;
                Nccl.Check(_nccl.GroupEnd(), "ncclGroupEnd");
            }
            finally
            {
                if (groupOpen) _nccl.GroupEnd();
            }
            WaitForTransfers(cancellation);
        }
        finally
        {
            _transferring = false;
        }
    }

    // Drains the transfer stream; on cancellation aborts the transfer communicator (the only way to
    // stop NCCL operations in flight), waits until the stream is drained, then throws.
    private void WaitForTransfers(CancellationToken cancellation)
    {
        if (!cancellation.CanBeCanceled)
        {
            _transferStream.Synchronize();
            return;
        }
        var drained = Task.Run(_transferStream.Synchronize, CancellationToken.None);
        try
        {
            drained.Wait(cancellation);
        }
        catch (OperationCanceledException)
        {
            AbortTransfers();
            try
            {
                drained.Wait(CancellationToken.None);
            }
            catch (AggregateException)
            {
                // The aborted operations report an error: expected.
            }
            throw;
        }
        catch (AggregateException e) when (e.InnerExceptions.Count == 1)
        {
            ExceptionDispatchInfo.Throw(e.InnerExceptions[0]);
        }
    }

    private void AbortTransfers()
    {
        var comm = Interlocked.Exchange(ref _transferComm, 0);
        if (comm != 0) _nccl.CommAbort(comm);
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<long> values)
    {
        if (values.IsEmpty) return;
        using var buffer = new DeviceBuffer<long>(Backend.Cuda, values);
        var count = (nuint)values.Length;
        Nccl.Check(buffer.AsSlice().WithAddress(address => _nccl.AllReduce(address, address, count, Nccl.Int64, Nccl.Sum, _comm, _cudaStream)),
            "ncclAllReduce");
        buffer.CopyTo(values, 0, _stream);
    }

    /// <inheritdoc/>
    public int AllReduceMin(int value)
    {
        using var buffer = new DeviceBuffer<int>(Backend.Cuda, [value]);
        Nccl.Check(buffer.AsSlice().WithAddress(address => _nccl.AllReduce(address, address, 1, Nccl.Int32, Nccl.Min, _comm, _cudaStream)),
            "ncclAllReduce");
        return buffer.ToArray(_stream)[0];
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        // A transfer still in flight (abandoned by EPLB) cannot be waited for: abort its communicator.
        if (_transferring) AbortTransfers();
        var transferComm = Interlocked.Exchange(ref _transferComm, 0);
        if (transferComm != 0) _nccl.CommDestroy(transferComm);
        var comm = Interlocked.Exchange(ref _comm, 0);
        if (comm != 0) _nccl.CommDestroy(comm);
        _stream?.Dispose();
        _transferStream?.Dispose();
    }
}
