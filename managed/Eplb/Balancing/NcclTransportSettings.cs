using Eplb.Kernels;
using Eplb.Migration;

namespace Eplb.Balancing;

/// <summary>Who this process is in an NCCL group, and the facts the NCCL environment rule needs beyond <see cref="EplbOptions"/> (docs/design.md §3.4).</summary>
public sealed record NcclTransportSettings
{
    /// <summary>The group's id, made once by <see cref="NcclTransport.CreateUniqueId"/> (typically on rank 0) and shared with every rank.</summary>
    public required NcclUniqueId UniqueId { get; init; }

    /// <summary>This process's expert-parallel rank, in [0, <see cref="Ranks"/>).</summary>
    public required int Rank { get; init; }

    /// <summary>G, the expert-parallel ranks.</summary>
    public required int Ranks { get; init; }

    /// <summary>Data-parallel ranks of the serving engine. Default 1.</summary>
    public int DataParallelSize { get; init; } = 1;

    /// <summary>The all-to-all backend. Default <see cref="AllToAllBackend.Other"/>.</summary>
    public AllToAllBackend AllToAll { get; init; }

    /// <summary>The MoE expert backend. Default <see cref="MoeBackend.Unfused"/>.</summary>
    public MoeBackend Moe { get; init; }

    /// <summary>The facts the NCCL environment rule looks at, under <paramref name="options"/>.</summary>
    internal NcclEnvironmentContext Environment(EplbOptions options) =>
        new(DataParallelSize, options.Enabled, TransportKind.Nccl, options.UseAsync, AllToAll, Moe);
}
