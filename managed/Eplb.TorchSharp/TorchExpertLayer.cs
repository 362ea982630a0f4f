using Eplb.Migration;
using Eplb.Runtime;
using static TorchSharp.torch;

namespace Eplb.TorchSharp;

/// <summary>
/// The expert weights of one MoE layer on one rank as Eplb sees them: each of the layer's stacked
/// per-expert parameters (<c>[E, 2I, H]</c> gate-and-up, <c>[E, H, I]</c> down, and every scale such as
/// <c>[E, 2I / 128, H / 128]</c>), whose first dimension is the rank's <see cref="SlotsPerRank"/> slots,
/// viewed as an <see cref="ExpertTensor"/> over the tensor's own memory. Migration then moves experts
/// inside the tensors the model computes with, all of an expert's tensors together.
/// </summary>
/// <remarks>Disposing releases the views, never the tensors (which must outlive them).</remarks>
public sealed class TorchExpertLayer : IDisposable
{
    private readonly DeviceBuffer<byte>[] _buffers;
    private readonly Tensor[] _tensors;

    /// <summary>Views each named tensor; all share the first dimension (the local slots) and one device.</summary>
    /// <exception cref="ArgumentException">No tensor, a name given twice, a tensor that is not contiguous, or tensors that disagree on the slots or the device.</exception>
    public TorchExpertLayer(IEnumerable<(string Name, Tensor Tensor)> parameters)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        var list = parameters.ToArray();
        if (list.Length == 0) throw new ArgumentException("an MoE layer needs at least one expert tensor", nameof(parameters));
        var names = new HashSet<string>();
        foreach (var (name, tensor) in list)
        {
            ArgumentException.ThrowIfNullOrEmpty(name, nameof(parameters));
            ArgumentNullException.ThrowIfNull(tensor, nameof(parameters));
            if (!names.Add(name)) throw new ArgumentException($"two expert tensors are named '{name}'", nameof(parameters));
            if (tensor.dim() < 1) throw new ArgumentException($"expert tensor '{name}' is a scalar; its first dimension must be the slots", nameof(parameters));
        }
        var (first, firstTensor) = list[0];
        SlotsPerRank = checked((int)firstTensor.shape[0]);
        foreach (var (name, tensor) in list)
        {
            if (tensor.shape[0] != SlotsPerRank)
                throw new ArgumentException($"expert tensor '{name}' [{string.Join(", ", tensor.shape)}] holds {tensor.shape[0]} experts, " +
                                            $"'{first}' {SlotsPerRank}", nameof(parameters));
            if (!TensorMemory.SameDevice(tensor, firstTensor))
                throw new ArgumentException($"expert tensor '{name}' is on {tensor.device}, '{first}' on {firstTensor.device}", nameof(parameters));
        }
        Backend = TensorMemory.BackendOf(firstTensor);
        Device = Backend == Backend.Cuda ? firstTensor.device_index : -1;
        _tensors = list.Select(p => p.Tensor).ToArray();
        Names = list.Select(p => p.Name).ToArray();
        _buffers = new DeviceBuffer<byte>[list.Length];
        try
        {
            for (var i = 0; i < list.Length; i++) _buffers[i] = TensorMemory.WrapBytes(list[i].Tensor);
        }
        catch
        {
            Dispose();
            throw;
        }
        ExpertTensors = list.Select((p, i) => ExpertTensor.Create(p.Name, _buffers[i].AsSlice(), SlotsPerRank)).ToArray();
    }

    /// <summary>R/G, the experts (slots) each tensor holds: their first dimension.</summary>
    public int SlotsPerRank { get; }

    /// <summary>The tensors' names, in the order given (the same on every rank).</summary>
    public IReadOnlyList<string> Names { get; }

    /// <summary>The views Eplb migrates, one per tensor, in the order given.</summary>
    public IReadOnlyList<ExpertTensor> ExpertTensors { get; }

    /// <summary>Where the tensors live.</summary>
    public Backend Backend { get; }

    /// <summary>The CUDA device of the tensors, -1 on the CPU.</summary>
    public int Device { get; }

    /// <summary>The tensor named <paramref name="name"/>.</summary>
    /// <exception cref="KeyNotFoundException">No tensor has that name.</exception>
    public Tensor this[string name]
    {
        get
        {
            for (var i = 0; i < _tensors.Length; i++)
                if (Names[i] == name) return _tensors[i];
            throw new KeyNotFoundException($"the layer has no expert tensor '{name}' (it has {string.Join(", ", Names)})");
        }
    }

    /// <summary>Releases the views (the tensors stay the caller's).</summary>
    public void Dispose()
    {
        foreach (var buffer in _buffers) buffer?.Dispose();
    }
}
