using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>The int32 buffers a kernel's metadata object (<see cref="ExpertLayout"/>, <see cref="RankBuckets"/>) allocates and then owns.</summary>
internal static class OwnedBuffers
{
    /// <summary>One buffer per length on <paramref name="backend"/>; a failure frees those already allocated.</summary>
    public static DeviceBuffer<int>[] Allocate(Backend backend, params long[] lengths)
    {
        var buffers = new DeviceBuffer<int>[lengths.Length];
        try
        {
            for (var i = 0; i < lengths.Length; i++) buffers[i] = new DeviceBuffer<int>(backend, lengths[i]);
            return buffers;
        }
        catch
        {
            Dispose(buffers);
            throw;
        }
    }

    /// <summary>The owner <paramref name="create"/> builds over the buffers; they are freed when it throws.</summary>
    public static TOwner Own<TOwner>(DeviceBuffer<int>[] buffers, Func<DeviceBuffer<int>[], TOwner> create)
    {
        try
        {
            return create(buffers);
        }
        catch
        {
            Dispose(buffers);
            throw;
        }
    }

    /// <summary>Frees the buffers (null entries are skipped).</summary>
    public static void Dispose(DeviceBuffer<int>?[] buffers)
    {
        foreach (var buffer in buffers) buffer?.Dispose();
    }
}
