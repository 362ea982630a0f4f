using Eplb.Runtime;

namespace Eplb.Migration;

/// <summary>How EPLB moves expert weights between ranks.</summary>
public enum TransportKind
{
    /// <summary>In-process for simulated ranks, NCCL for real multi-GPU runs.</summary>
    Auto = 0,
    /// <summary>All ranks live in this process (tests, the simulator): buffer copies.</summary>
    InProcess = 1,
    /// <summary>NCCL point-to-point send/recv between processes (libnccl.so.2, loaded at run time).</summary>
    Nccl = 2,
}

/// <summary>
/// Moves expert weights between ranks and agrees on small values across processes. One
/// implementation hosts every rank in this process (<see cref="InProcessTransport"/>, tests and the
/// simulator); <see cref="NcclTransport"/> hosts one rank per process and talks NCCL.
/// <para>
/// Threads: in async mode EPLB calls <see cref="Transfer"/> from its background worker while the
/// serving thread calls <see cref="AllReduceSum"/> and <see cref="AllReduceMin"/>, so the two must not
/// share anything that needs one order across ranks (<see cref="NcclTransport"/> gives transfers their
/// own communicator and stream). Every rank issues the collectives in the same order; the transfers of
/// a layer likewise.
/// </para>
/// </summary>
public interface IExpertTransport : IDisposable
{
    /// <summary>G, all ranks.</summary>
    int Ranks { get; }

    /// <summary>The ranks whose weights live in this process.</summary>
    IReadOnlyList<int> LocalRanks { get; }

    /// <summary>What kind of communicator this is.</summary>
    TransportKind Kind { get; }

    /// <summary>
    /// Executes one batch of transfers: for each one touching a local rank, every tensor of the
    /// expert goes from the sender's weights (<paramref name="weightsOf"/>, old placement) at
    /// <see cref="ExpertTransfer.SourceSlot"/> into the receiver's staging buffer
    /// (<paramref name="stagingOf"/>) at <see cref="ExpertTransfer.DestinationSlot"/>. Complete on return.
    /// Observes <paramref name="cancellation"/> while it waits: once cancelled it stops writing into the
    /// staging buffers and throws <see cref="OperationCanceledException"/> (EPLB abandons a transfer that
    /// does not within <c>EplbOptions.CancelTimeout</c> and never reuses its staging buffers).
    /// </summary>
    void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation);

    /// <summary>Sums <paramref name="values"/> element-wise over all processes, in place.</summary>
    void AllReduceSum(Span<long> values);

    /// <summary>The minimum of <paramref name="value"/> over all processes.</summary>
    int AllReduceMin(int value);
}

/// <summary>Every rank in this process: transfers are buffer copies (host or device memory).</summary>
public sealed class InProcessTransport : IExpertTransport
{
    private readonly int[] _ranks;

    /// <summary>Hosts ranks 0..ranks-1.</summary>
    public InProcessTransport(int ranks)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        Ranks = ranks;
        _ranks = Enumerable.Range(0, ranks).ToArray();
    }

    /// <inheritdoc/>
    public int Ranks { get; }

    /// <inheritdoc/>
    public IReadOnlyList<int> LocalRanks => _ranks;

    /// <inheritdoc/>
    public TransportKind Kind => TransportKind.InProcess;

    /// <inheritdoc/>
    public void Transfer(IReadOnlyList<ExpertTransfer> batch, Func<int, IReadOnlyList<ExpertTensor>> weightsOf,
        Func<int, IReadOnlyList<ExpertTensor>> stagingOf, CancellationToken cancellation)
    {
        foreach (var transfer in batch)
        {
            cancellation.ThrowIfCancellationRequested();
            var source = weightsOf(transfer.SourceRank);
            var destination = stagingOf(transfer.DestinationRank);
            for (var t = 0; t < destination.Count; t++)
                destination[t].CopySlotFrom(source[t], transfer.SourceSlot, transfer.DestinationSlot);
        }
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<long> values)
    {
    }

    /// <inheritdoc/>
    public int AllReduceMin(int value) => value;

    /// <inheritdoc/>
    public void Dispose()
    {
    }
}
