using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>
/// What the host-span forms of the kernels do on <see cref="Backend.Cuda"/>: copy the inputs to
/// the device, run the device form on a fresh stream, check the stream's device error word once,
/// copy the outputs back. Every buffer and the stream are freed when it is disposed.
/// </summary>
internal sealed class DeviceRoundTrip : IDisposable
{
    private readonly List<IDisposable> _owned = [];
    private bool _checked;

    /// <summary>The stream the device form runs on.</summary>
    public ComputeStream Stream { get; } = new(Backend.Cuda);

    /// <summary>A device copy of <paramref name="values"/>.</summary>
    public DeviceBuffer<T> Upload<T>(ReadOnlySpan<T> values) where T : unmanaged => Own(new DeviceBuffer<T>(Backend.Cuda, values));

    /// <summary>An uninitialised device buffer.</summary>
    public DeviceBuffer<T> Allocate<T>(long length) where T : unmanaged => Own(new DeviceBuffer<T>(Backend.Cuda, length));

    /// <summary>Frees <paramref name="resource"/> with the round trip.</summary>
    public TResource Own<TResource>(TResource resource) where TResource : IDisposable
    {
        _owned.Add(resource);
        return resource;
    }

    /// <summary>Copies a result into host memory, after the device form's bad-input check (throws when a kernel flagged any).</summary>
    public void Download<T>(DeviceSlice<T> result, Span<T> destination) where T : unmanaged
    {
        if (!_checked)
        {
            Stream.CheckDeviceErrors();
            _checked = true;
        }
        result.CopyTo(destination, Stream);
    }

    /// <summary>Frees the buffers, then the stream.</summary>
    public void Dispose()
    {
        for (var i = _owned.Count - 1; i >= 0; i--) _owned[i].Dispose();
        Stream.Dispose();
    }
}
