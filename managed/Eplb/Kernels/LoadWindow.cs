using Eplb.Interop;
using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// The expert-load window (docs/design.md §3.2, <c>eplb_window.h</c>): each pass's int32 per-slot counters go
/// into a ring of the last W passes with 64-bit running sums, queued on the stream without host
/// synchronisation, and the counters start the next pass from zero.
/// </summary>
public static unsafe class LoadWindow
{
    /// <summary>
    /// Pushes one pass: for every counter i, <c>sums[i] += counters[i] - window[slot][i]</c>,
    /// <c>window[slot][i] = counters[i]</c>, <c>counters[i] = 0</c>.
    /// </summary>
    /// <param name="stream">Where the work is queued; every view lives on its backend.</param>
    /// <param name="counters"><c>[n]</c> the pass's counters, read and zeroed.</param>
    /// <param name="window"><c>[windowSize][n]</c> the ring; row <paramref name="slot"/> is replaced.</param>
    /// <param name="sums"><c>[n]</c> the ring's 64-bit totals.</param>
    /// <param name="windowSize">W, the passes the ring holds.</param>
    /// <param name="slot">The ring row this pass replaces, in [0, W).</param>
    /// <exception cref="ArgumentException">A view is missing, mis-sized or on another backend, or the slot is out of range.</exception>
    public static void Push(ComputeStream stream, DeviceSlice<int> counters, DeviceSlice<int> window, DeviceSlice<long> sums, int windowSize, int slot)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentOutOfRangeException.ThrowIfLessThan(windowSize, 1);
        KernelArguments.Require(counters, nameof(counters));
        KernelArguments.ExpectLength(window, (long)windowSize * counters.Length, nameof(window));
        KernelArguments.ExpectLength(sums, counters.Length, nameof(sums));
        KernelArguments.SameBackend(stream, counters, nameof(counters));
        KernelArguments.SameBackend(stream, window, nameof(window));
        KernelArguments.SameBackend(stream, sums, nameof(sums));
        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_load_window_push(leases.Stream(stream), leases.Pointer(counters), leases.Pointer(window),
            leases.Pointer(sums), counters.Length, windowSize, slot));
    }

    /// <summary>Zeroes the pass's counters without recording them (a dummy pass of an idle data-parallel rank).</summary>
    public static void Discard(ComputeStream stream, DeviceSlice<int> counters)
    {
        ArgumentNullException.ThrowIfNull(stream);
        KernelArguments.Require(counters, nameof(counters));
        KernelArguments.SameBackend(stream, counters, nameof(counters));
        using var leases = new LeaseScope();
        EplbException.ThrowIfFailed(NativeMethods.eplb_load_window_discard(leases.Stream(stream), leases.Pointer(counters), counters.Length));
    }
}
