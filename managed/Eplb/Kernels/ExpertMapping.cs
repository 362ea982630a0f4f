using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// Logical -> physical expert mapping with load recording (docs/design.md §4.3): route -> map (replica
/// choice) -> mask padding rows -> count the physical ids into the layer's counters when recording.
/// The routing kernels fuse the same epilogue; this op is the stand-alone form.
/// </summary>
public static unsafe class ExpertMapping
{
    /// <summary>
    /// Maps <paramref name="topkIds"/> <c>[T][topK]</c> (logical) to <paramref name="physicalIds"/>
    /// (may be the same range), queued on <paramref name="stream"/>. Ids outside <c>[0, N)</c> and rows
    /// at or after <paramref name="numUnpadded"/> (a one-element view; default = all rows real) become
    /// -1 and are not counted.
    /// </summary>
    /// <exception cref="ArgumentException">Sizes disagree, a view is on another backend, or (CPU) a table entry is out of range.</exception>
    public static void MapToPhysical(ComputeStream stream, DeviceSlice<int> topkIds, int topK, EplbLayerState layer,
        DeviceSlice<int> physicalIds, DeviceSlice<int> numUnpadded = default)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(layer);
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        KernelArguments.Require(topkIds, nameof(topkIds));
        KernelArguments.Require(physicalIds, nameof(physicalIds));
        if (topkIds.Length % topK != 0)
            throw new ArgumentException($"topkIds has {topkIds.Length} elements, not a multiple of topK = {topK}", nameof(topkIds));
        if (physicalIds.Length != topkIds.Length)
            throw new ArgumentException($"physicalIds has {physicalIds.Length} elements, topkIds {topkIds.Length}", nameof(physicalIds));
        if (!numUnpadded.IsNull && numUnpadded.Length != 1)
            throw new ArgumentException($"numUnpadded must view one element (got {numUnpadded.Length})", nameof(numUnpadded));
        KernelArguments.SameBackend(stream, layer.Backend, "layer");
        KernelArguments.SameBackend(stream, topkIds, nameof(topkIds));
        KernelArguments.SameBackend(stream, physicalIds, nameof(physicalIds));
        KernelArguments.SameBackend(stream, numUnpadded, nameof(numUnpadded));

        using var leases = new LeaseScope();
        var map = layer.ToNative(leases);
        EplbException.ThrowIfFailed(NativeMethods.eplb_map_logical_to_physical(leases.Stream(stream), leases.Pointer(topkIds),
            topkIds.Length / topK, topK, &map, leases.Pointer(numUnpadded), leases.Pointer(physicalIds)));
    }

    /// <summary>
    /// Host-memory form: maps <paramref name="topkIds"/> <c>[T][topK]</c> into <paramref name="physicalIds"/>
    /// through <paramref name="layer"/>'s tables and, when its counters are given, adds the load into
    /// them. On <see cref="Backend.Cpu"/> it runs in place on the spans; on <see cref="Backend.Cuda"/> it
    /// copies to the device, runs the CUDA kernel, checks the device error word and copies back.
    /// Nothing is written when an argument is bad.
    /// </summary>
    /// <param name="topkIds"><c>[T][topK]</c> logical ids.</param>
    /// <param name="topK">K, ids per token.</param>
    /// <param name="layer">The layer's tables and (optional) counters.</param>
    /// <param name="physicalIds"><c>[T][topK]</c> output (may not overlap the inputs).</param>
    /// <param name="numUnpadded">Rows at or after it are padding: -1, not counted. Default: every row is real.</param>
    /// <param name="backend">Where the kernel runs.</param>
    /// <exception cref="ArgumentException">Sizes disagree, or a table entry is out of range; nothing is written.</exception>
    public static void MapToPhysical(ReadOnlySpan<int> topkIds, int topK, HostLayerState layer, Span<int> physicalIds,
        int? numUnpadded = null, Backend backend = Backend.Cpu)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        layer.Validate();
        if (topkIds.Length % topK != 0)
            throw new ArgumentException($"topkIds has {topkIds.Length} elements, not a multiple of topK = {topK}", nameof(topkIds));
        if (physicalIds.Length != topkIds.Length)
            throw new ArgumentException($"physicalIds has {physicalIds.Length} elements, topkIds {topkIds.Length}", nameof(physicalIds));

        if (backend == Backend.Cuda)
        {
            MapOnDevice(topkIds, topK, layer, physicalIds, numUnpadded);
            return;
        }
        var record = layer.Records;
        var flag = record ? 1 : 0;
        var unpaddedValue = numUnpadded ?? 0;
        using var leases = new LeaseScope();
        fixed (int* ids = topkIds, table = layer.Log2Phy, counts = layer.LogCnt, output = physicalIds, load = layer.Counters)
        {
            var map = new eplb_expert_map_t
            {
                log2phy = table,
                logcnt = counts,
                counters = record ? load : null,
                record_flag = record ? &flag : null,
                num_logical = layer.LogicalExperts,
                max_replicas = layer.MaxReplicas,
                num_physical = layer.Slots,
                replica_selection = (int)layer.ReplicaSelection,
            };
            EplbException.ThrowIfFailed(NativeMethods.eplb_map_logical_to_physical(leases.Stream(ComputeStream.Cpu), ids, topkIds.Length / topK,
                topK, &map, numUnpadded.HasValue ? &unpaddedValue : null, output));
        }
    }

    private static void MapOnDevice(ReadOnlySpan<int> topkIds, int topK, HostLayerState layer, Span<int> physicalIds, int? numUnpadded)
    {
        using var device = new DeviceRoundTrip();
        var record = layer.Records;
        var load = record ? device.Upload<int>(layer.Counters) : device.Allocate<int>(layer.Slots);
        if (!record) load.Fill(0);
        var output = device.Allocate<int>(topkIds.Length);
        var state = new EplbLayerState(device.Upload(layer.Log2Phy), device.Upload(layer.LogCnt), load, device.Upload<int>([record ? 1 : 0]),
            layer.LogicalExperts, layer.MaxReplicas, layer.Slots, layer.ReplicaSelection);
        MapToPhysical(device.Stream, device.Upload(topkIds), topK, state, output,
            numUnpadded.HasValue ? device.Upload<int>([numUnpadded.Value]).AsSlice() : default);
        device.Download(output, physicalIds);
        if (record) device.Download(load, layer.Counters);
    }
}

/// <summary>
/// One layer's EPLB tables in host memory, for the host-span forms (the counterpart of
/// <see cref="EplbLayerState"/>, whose views live in <see cref="DeviceBuffer{T}"/>s): <c>log2phy</c>
/// <c>[N][Kmax]</c>, <c>logcnt</c> <c>[N]</c>, and optionally the counters <c>[R]</c> the load is added into.
/// </summary>
public readonly ref struct HostLayerState
{
    /// <summary><c>[N][Kmax]</c> slots of each logical expert, ascending, -1 padded.</summary>
    public required ReadOnlySpan<int> Log2Phy { get; init; }

    /// <summary><c>[N]</c> replicas of each logical expert (N is its length).</summary>
    public required ReadOnlySpan<int> LogCnt { get; init; }

    /// <summary>Kmax, the capacity of a <see cref="Log2Phy"/> row.</summary>
    public required int MaxReplicas { get; init; }

    /// <summary>R, physical slots.</summary>
    public required int Slots { get; init; }

    /// <summary><c>[R]</c> per-slot counters the mapped ids are added into; empty (the default) records nothing.</summary>
    public Span<int> Counters { get; init; }

    /// <summary>The replica choice. Default <see cref="ReplicaSelection.TokenHash"/>.</summary>
    public ReplicaSelection ReplicaSelection { get; init; }

    /// <summary>N, logical experts: the length of <see cref="LogCnt"/>.</summary>
    public int LogicalExperts => LogCnt.Length;

    /// <summary>Whether the load is recorded (<see cref="Counters"/> given).</summary>
    public bool Records => !Counters.IsEmpty;

    /// <summary>Throws for sizes that disagree (the message names the property).</summary>
    internal void Validate()
    {
        if (MaxReplicas < 1) throw new ArgumentOutOfRangeException(nameof(MaxReplicas), MaxReplicas, "MaxReplicas must be at least 1");
        if (Slots < 1) throw new ArgumentOutOfRangeException(nameof(Slots), Slots, "Slots must be at least 1");
        if (LogCnt.IsEmpty) throw new ArgumentException("LogCnt must hold one count per logical expert", nameof(LogCnt));
        if ((long)LogCnt.Length * MaxReplicas != Log2Phy.Length)
            throw new ArgumentException($"Log2Phy has {Log2Phy.Length} elements; N = {LogCnt.Length} and MaxReplicas = {MaxReplicas} need " +
                                        $"{(long)LogCnt.Length * MaxReplicas}", nameof(Log2Phy));
        if (Records && Counters.Length != Slots)
            throw new ArgumentException($"Counters has {Counters.Length} elements; recording needs Slots = {Slots}", nameof(Counters));
        if (!Enum.IsDefined(ReplicaSelection))
            throw new ArgumentOutOfRangeException(nameof(ReplicaSelection), ReplicaSelection, "unknown replica selection");
    }
}
