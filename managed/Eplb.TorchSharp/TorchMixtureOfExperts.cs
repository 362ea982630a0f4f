using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Runtime;
using static TorchSharp.torch;

namespace Eplb.TorchSharp;

/// <summary>
/// One expert-parallel rank of a TorchSharp MoE model as EPLB sees it (<see cref="IMixtureOfExperts"/>):
/// its MoE layers' stacked expert tensors (<see cref="TorchExpertLayer"/>), moved in place by
/// rearrangements; the EPLB views its routers take (<see cref="LayerStates"/>, for <see cref="Router"/>
/// or <see cref="TorchRouting"/>); and the slot assignment in force (<see cref="ExpertMap"/>,
/// <see cref="ExpertMapUpdated"/>). Hand every local rank to <see cref="EplbState.AddModel"/>.
/// </summary>
/// <remarks>
/// Initial weights follow EPLB's initial placement: local slot j of rank g holds logical expert
/// <c>(g * R/G + j) mod N</c>. CPU tensors run on a CPU stream; for CUDA tensors pass the
/// <see cref="ComputeStream"/> the model's forward pass runs on (<see cref="ComputeStream.FromCudaStream"/>
/// over torch's stream), so table updates are ordered with it.
/// </remarks>
public sealed class TorchMixtureOfExperts : IMixtureOfExperts, IDisposable
{
    private readonly TorchExpertLayer[] _layers;
    private readonly int[][] _phy2Log;
    private readonly bool _ownsStream;

    /// <summary>Rank <paramref name="rank"/> over its layers' expert views, which it takes over (disposes).</summary>
    /// <param name="rank">This rank, in [0, G) with G = <paramref name="slots"/> / R/G.</param>
    /// <param name="logicalExperts">N, the checkpoint's routed experts per layer.</param>
    /// <param name="slots">R, physical slots per layer over all ranks (N + redundant).</param>
    /// <param name="layers">The rank's MoE layers (may be none); every one holds R/G slots on one device.</param>
    /// <param name="stream">The stream the forward pass runs on; required for CUDA tensors, a new CPU stream by default.</param>
    /// <exception cref="ArgumentException">The layers disagree on R/G or the device, R/G does not divide R, or the rank is out of range.</exception>
    public TorchMixtureOfExperts(int rank, int logicalExperts, int slots, IReadOnlyList<TorchExpertLayer> layers, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(layers);
        ArgumentOutOfRangeException.ThrowIfLessThan(logicalExperts, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, logicalExperts);
        var perRank = layers.Count > 0 ? layers[0].SlotsPerRank : slots;
        foreach (var layer in layers)
        {
            ArgumentNullException.ThrowIfNull(layer, nameof(layers));
            if (layer.SlotsPerRank != perRank)
                throw new ArgumentException($"the layers hold {perRank} and {layer.SlotsPerRank} slots: every MoE layer of a rank holds R/G", nameof(layers));
            if (layer.Backend != layers[0].Backend || layer.Device != layers[0].Device)
                throw new ArgumentException("the layers' expert tensors live on different devices", nameof(layers));
        }
        if (perRank < 1 || slots % perRank != 0)
            throw new ArgumentException($"the layers hold {perRank} slots each, which does not divide R = {slots} over whole ranks", nameof(layers));
        var ranks = slots / perRank;
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, ranks);
        Backend = layers.Count > 0 ? layers[0].Backend : Backend.Cpu;
        if (stream is not null && stream.Backend != Backend)
            throw new ArgumentException($"the stream runs on {stream.Backend}, the expert tensors live on {Backend}", nameof(stream));
        if (stream is null && Backend == Backend.Cuda)
            throw new ArgumentException("CUDA expert tensors need the stream the forward pass runs on (ComputeStream.FromCudaStream)", nameof(stream));
        Rank = rank;
        LogicalExperts = logicalExperts;
        Slots = slots;
        SlotsPerRank = perRank;
        _layers = layers.ToArray();
        _ownsStream = stream is null;
        Stream = stream ?? new ComputeStream(Backend.Cpu);
        _phy2Log = _layers.Select(_ => Enumerable.Range(0, slots).Select(s => s % logicalExperts).ToArray()).ToArray();
    }

    /// <summary>
    /// Rank <paramref name="rank"/> over TorchSharp modules, one per MoE layer: each module's parameters
    /// whose name <paramref name="isExpertParameter"/> accepts (e.g. <c>w13</c>, <c>w2</c> and their scales,
    /// not the gate) become its expert tensors, in the module's registration order (the same on every rank).
    /// </summary>
    /// <exception cref="ArgumentException">A module has no expert parameter, or the views are inconsistent (see the main constructor).</exception>
    public static TorchMixtureOfExperts FromModules(int rank, int logicalExperts, int slots, IEnumerable<nn.Module> moeLayers,
        Func<string, bool> isExpertParameter, ComputeStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(moeLayers);
        ArgumentNullException.ThrowIfNull(isExpertParameter);
        var layers = new List<TorchExpertLayer>();
        try
        {
            foreach (var module in moeLayers)
            {
                var parameters = module.named_parameters().Where(p => isExpertParameter(p.name)).Select(p => (p.name, (Tensor)p.parameter)).ToArray();
                if (parameters.Length == 0)
                    throw new ArgumentException($"module {module.GetName()} has no parameter the filter accepts", nameof(moeLayers));
                layers.Add(new TorchExpertLayer(parameters));
            }
            return new TorchMixtureOfExperts(rank, logicalExperts, slots, layers, stream);
        }
        catch
        {
            foreach (var layer in layers) layer.Dispose();
            throw;
        }
    }

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int Layers => _layers.Length;

    /// <inheritdoc/>
    public int LogicalExperts { get; }

    /// <inheritdoc/>
    public int Slots { get; }

    /// <inheritdoc/>
    public int SlotsPerRank { get; }

    /// <inheritdoc/>
    public Backend Backend { get; }

    /// <inheritdoc/>
    public ComputeStream Stream { get; }

    /// <summary>The expert views of layer <paramref name="layer"/> (its tensors by name).</summary>
    public TorchExpertLayer Layer(int layer) => _layers[layer];

    /// <summary>The EPLB views of each layer, for the layer's router (null until <see cref="EplbState.AddModel"/>).</summary>
    public IReadOnlyList<EplbLayerState>? LayerStates { get; private set; }

    /// <summary>Raised on the thread that calls <see cref="EplbState.Step"/> after a layer's new placement is in force: the layer and its <c>phy2log</c> <c>[R]</c>.</summary>
    public event Action<int, int[]>? ExpertMapUpdated;

    /// <summary>The logical expert of each slot of <paramref name="layer"/> (<c>phy2log</c> <c>[R]</c>), as last committed.</summary>
    public ReadOnlySpan<int> ExpertMap(int layer) => _phy2Log[layer];

    /// <summary>The local slots of <paramref name="layer"/> that hold <paramref name="logicalExpert"/> (a rank can hold two replicas).</summary>
    public IReadOnlyList<int> LocalSlots(int layer, int logicalExpert) => Balancing.ExpertMap.LocalSlots(_phy2Log[layer], Rank, SlotsPerRank, logicalExpert);

    /// <inheritdoc/>
    public IReadOnlyList<ExpertTensor> GetExpertWeights(int layer) => _layers[layer].ExpertTensors;

    /// <inheritdoc/>
    public void SetEplbState(IReadOnlyList<EplbLayerState> layers)
    {
        ArgumentNullException.ThrowIfNull(layers);
        if (layers.Count != Layers) throw new ArgumentException($"{layers.Count} layer states for {Layers} MoE layers", nameof(layers));
        LayerStates = layers;
    }

    /// <inheritdoc/>
    public void UpdateExpertMap(int layer, ReadOnlySpan<int> phy2Log)
    {
        if (phy2Log.Length != Slots) throw new ArgumentException($"phy2Log has {phy2Log.Length} slots, the layer {Slots}", nameof(phy2Log));
        phy2Log.CopyTo(_phy2Log[layer]);
        ExpertMapUpdated?.Invoke(layer, phy2Log.ToArray());
    }

    /// <summary>Releases the expert views (never the tensors) and the stream it made.</summary>
    public void Dispose()
    {
        foreach (var layer in _layers) layer.Dispose();
        if (_ownsStream) Stream.Dispose();
    }
}
