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
    /// Host-memory form: maps <paramref name="topkIds"/> into <paramref name="physicalIds"/> and,
    /// when <paramref name="record"/>, adds the load into <paramref name="counters"/> (<c>[R]</c>).
    /// On <see cref="Backend.Cpu"/> it runs in place on the spans; on <see cref="Backend.Cuda"/> it
    /// copies to the device, runs the CUDA kernel, checks the device error word and copies back.
    /// Nothing is written when an argument is bad.
    /// </summary>
    public static void MapToPhysical(ReadOnlySpan<int> topkIds, int topK, ReadOnlySpan<int> log2Phy, ReadOnlySpan<int> logCnt,
        int maxReplicas, int slots, Span<int> physicalIds, Span<int> counters = default, bool record = false,
        int? numUnpadded = null, ReplicaSelection replicaSelection = ReplicaSelection.TokenHash, Backend backend = Backend.Cpu)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(topK, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxReplicas, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, 1);
        if (logCnt.IsEmpty) throw new ArgumentException("logCnt must hold one count per logical expert", nameof(logCnt));
        if (topkIds.Length % topK != 0)
            throw new ArgumentException($"topkIds has {topkIds.Length} elements, not a multiple of topK = {topK}", nameof(topkIds));
        if (physicalIds.Length != topkIds.Length)
            throw new ArgumentException($"physicalIds has {physicalIds.Length} elements, topkIds {topkIds.Length}", nameof(physicalIds));
        if ((long)logCnt.Length * maxReplicas != log2Phy.Length)
            throw new ArgumentException($"log2Phy has {log2Phy.Length} elements; N = {logCnt.Length} and maxReplicas = {maxReplicas} need {(long)logCnt.Length * maxReplicas}", nameof(log2Phy));
        if (record && counters.Length != slots)
            throw new ArgumentException($"counters has {counters.Length} elements; recording needs slots = {slots}", nameof(counters));

        if (backend == Backend.Cuda)
        {
            MapOnDevice(topkIds, topK, log2Phy, logCnt, maxReplicas, slots, physicalIds, counters, record, numUnpadded, replicaSelection);
            return;
        }
        var flag = record ? 1 : 0;
        var unpaddedValue = numUnpadded ?? 0;
        using var leases = new LeaseScope();
        fixed (int* ids = topkIds, table = log2Phy, counts = logCnt, output = physicalIds, load = counters)
        {
            var map = new eplb_expert_map_t
            {
                log2phy = table,
                logcnt = counts,
                counters = record ? load : null,
                record_flag = record ? &flag : null,
                num_logical = logCnt.Length,
                max_replicas = maxReplicas,
                num_physical = slots,
                replica_selection = (int)replicaSelection,
            };
            EplbException.ThrowIfFailed(NativeMethods.eplb_map_logical_to_physical(leases.Stream(ComputeStream.Cpu), ids, topkIds.Length / topK,
                topK, &map, numUnpadded.HasValue ? &unpaddedValue : null, output));
        }
    }

    private static void MapOnDevice(ReadOnlySpan<int> topkIds, int topK, ReadOnlySpan<int> log2Phy, ReadOnlySpan<int> logCnt,
        int maxReplicas, int slots, Span<int> physicalIds, Span<int> counters, bool record, int? numUnpadded,
        ReplicaSelection replicaSelection)
    {
        using var device = new DeviceRoundTrip();
        var load = record ? device.Upload<int>(counters) : device.Allocate<int>(slots);
        if (!record) load.Fill(0);
        var output = device.Allocate<int>(topkIds.Length);
        var layer = new EplbLayerState(device.Upload(log2Phy), device.Upload(logCnt), load, device.Upload<int>([record ? 1 : 0]),
            logCnt.Length, maxReplicas, slots, replicaSelection);
        MapToPhysical(device.Stream, device.Upload(topkIds), topK, layer, output,
            numUnpadded.HasValue ? device.Upload<int>([numUnpadded.Value]).AsSlice() : default);
        device.Download(output, physicalIds);
        if (record) device.Download(load, counters);
    }
}
