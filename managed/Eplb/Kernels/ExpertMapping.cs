using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// Logical -> physical expert mapping with load recording (SPEC 4.3): route -> map (replica
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
        if (topkIds.IsNull) throw new ArgumentNullException(nameof(topkIds));
        if (physicalIds.IsNull) throw new ArgumentNullException(nameof(physicalIds));
        if (topkIds.Length % topK != 0)
            throw new ArgumentException($"topkIds has {topkIds.Length} elements, not a multiple of topK = {topK}", nameof(topkIds));
        if (physicalIds.Length != topkIds.Length)
            throw new ArgumentException($"physicalIds has {physicalIds.Length} elements, topkIds {topkIds.Length}", nameof(physicalIds));
        if (!numUnpadded.IsNull && numUnpadded.Length != 1)
            throw new ArgumentException($"numUnpadded must view one element (got {numUnpadded.Length})", nameof(numUnpadded));
        SameBackend(stream, layer.Backend, "layer");
        SameBackend(stream, topkIds.Backend, nameof(topkIds));
        SameBackend(stream, physicalIds.Backend, nameof(physicalIds));
        if (!numUnpadded.IsNull) SameBackend(stream, numUnpadded.Backend, nameof(numUnpadded));

        using var streamLease = stream.Lease(out var streamPointer);
        using var tableLeases = layer.Acquire(out var map);
        using var idsLease = topkIds.Lease(out var ids);
        using var outLease = physicalIds.Lease(out var output);
        int* unpadded = null;
        using var unpaddedLease = numUnpadded.IsNull ? default : numUnpadded.Lease(out unpadded);
        EplbException.ThrowIfFailed(NativeMethods.eplb_map_logical_to_physical(streamPointer, ids, topkIds.Length / topK, topK, &map,
            unpadded, output));
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
        using var streamLease = ComputeStream.Cpu.Lease(out var stream);
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
            EplbException.ThrowIfFailed(NativeMethods.eplb_map_logical_to_physical(stream, ids, topkIds.Length / topK, topK, &map,
                numUnpadded.HasValue ? &unpaddedValue : null, output));
        }
    }

    private static void MapOnDevice(ReadOnlySpan<int> topkIds, int topK, ReadOnlySpan<int> log2Phy, ReadOnlySpan<int> logCnt,
        int maxReplicas, int slots, Span<int> physicalIds, Span<int> counters, bool record, int? numUnpadded,
        ReplicaSelection replicaSelection)
    {
        using var stream = new ComputeStream(Backend.Cuda);
        using var ids = new DeviceBuffer<int>(Backend.Cuda, topkIds);
        using var table = new DeviceBuffer<int>(Backend.Cuda, log2Phy);
        using var counts = new DeviceBuffer<int>(Backend.Cuda, logCnt);
        using var load = new DeviceBuffer<int>(Backend.Cuda, slots);
        if (record) load.CopyFrom(counters);
        else load.Fill(0);
        using var flag = new DeviceBuffer<int>(Backend.Cuda, [record ? 1 : 0]);
        using var unpadded = new DeviceBuffer<int>(Backend.Cuda, [numUnpadded ?? 0]);
        using var output = new DeviceBuffer<int>(Backend.Cuda, topkIds.Length);
        var layer = new EplbLayerState(table, counts, load, flag, logCnt.Length, maxReplicas, slots, replicaSelection);
        MapToPhysical(stream, ids, topK, layer, output, numUnpadded.HasValue ? unpadded.AsSlice() : default);
        stream.CheckDeviceErrors();
        output.CopyTo(physicalIds, 0, stream);
        if (record) load.CopyTo(counters, 0, stream);
    }

    private static void SameBackend(ComputeStream stream, Backend backend, string name)
    {
        if (backend != stream.Backend)
            throw new ArgumentException($"{name} lives on {backend} but the stream runs on {stream.Backend}", name);
    }
}
