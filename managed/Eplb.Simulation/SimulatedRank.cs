using Eplb.Balancing;
using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Runtime;

namespace Eplb.Simulation;

/// <summary>
/// One expert-parallel rank of a model held in this process, for tests and the simulator: per layer,
/// a few weight tensors (float32, any sizes, like weights and their scales) of <c>R/G</c> local
/// experts. Initial weights follow the placement <c>slot s -> expert s % N</c> and are filled with
/// <see cref="ExpectedValue"/>, so any slot's content tells which expert it holds.
/// </summary>
public sealed class SimulatedRank : IMixtureOfExperts, IDisposable
{
    private readonly DeviceBuffer<float>[][] _buffers;
    private readonly ExpertTensor[][] _tensors;
    private readonly int[][] _phy2Log;
    private readonly bool _ownsStream;

    /// <summary>
    /// Creates rank <paramref name="rank"/> of <paramref name="ranks"/> with the given per-expert tensor
    /// sizes (in floats), its weights laid out for <paramref name="initialPhy2Log"/> (default: slot s
    /// holds expert s % N, the placement EPLB starts from).
    /// </summary>
    public SimulatedRank(int rank, int ranks, int layers, int logicalExperts, int slots, IReadOnlyList<int> tensorSizes, Backend backend = Backend.Cpu,
        ComputeStream? stream = null, IReadOnlyList<int[]>? initialPhy2Log = null)
    {
        var topology = new ExpertTopology(layers, logicalExperts, slots, ranks);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, ranks);
        Rank = rank;
        Layers = layers;
        LogicalExperts = logicalExperts;
        Slots = slots;
        SlotsPerRank = topology.SlotsPerRank;
        Backend = backend;
        _ownsStream = stream is null;
        Stream = stream ?? new ComputeStream(backend);
        TensorSizes = tensorSizes.ToArray();
        if (initialPhy2Log != null && (initialPhy2Log.Count != layers || initialPhy2Log.Any(p => p.Length != slots)))
            throw new ArgumentException($"initialPhy2Log must hold {layers} layers of {slots} slots", nameof(initialPhy2Log));
        _phy2Log = Enumerable.Range(0, layers)
            .Select(l => initialPhy2Log?[l].ToArray() ?? Enumerable.Range(0, slots).Select(s => s % logicalExperts).ToArray())
            .ToArray();
        _buffers = new DeviceBuffer<float>[layers][];
        _tensors = new ExpertTensor[layers][];
        for (var l = 0; l < layers; l++)
        {
            _buffers[l] = new DeviceBuffer<float>[TensorSizes.Count];
            _tensors[l] = new ExpertTensor[TensorSizes.Count];
            for (var t = 0; t < TensorSizes.Count; t++)
            {
                var size = TensorSizes[t];
                var values = new float[SlotsPerRank * size];
                for (var j = 0; j < SlotsPerRank; j++)
                    for (var i = 0; i < size; i++)
                        values[j * size + i] = ExpectedValue(_phy2Log[l][rank * SlotsPerRank + j], l, t, i);
                _buffers[l][t] = new DeviceBuffer<float>(backend, values);
                _tensors[l][t] = ExpertTensor.Create($"w{t}", _buffers[l][t].AsSlice(), SlotsPerRank);
            }
        }
    }

    /// <summary>The value element <paramref name="index"/> of tensor <paramref name="tensor"/> of an expert holds (vLLM's test weights).</summary>
    public static float ExpectedValue(int expert, int layer, int tensor, int index) => expert * 1000 + layer * 100 + tensor * 10 + index;

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int Layers { get; }

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

    /// <summary>Floats per expert of each tensor.</summary>
    public IReadOnlyList<int> TensorSizes { get; }

    /// <summary>The EPLB views handed over by <see cref="SetEplbState"/> (null before).</summary>
    public IReadOnlyList<EplbLayerState>? LayerStates { get; private set; }

    /// <summary>The slot assignment the model was last told about, per layer.</summary>
    public ReadOnlySpan<int> KnownPhy2Log(int layer) => _phy2Log[layer];

    /// <summary>Times <see cref="UpdateExpertMap"/> was called.</summary>
    public int MapUpdates { get; private set; }

    /// <inheritdoc/>
    public IReadOnlyList<ExpertTensor> GetExpertWeights(int layer) => _tensors[layer];

    /// <inheritdoc/>
    public void SetEplbState(IReadOnlyList<EplbLayerState> layers) => LayerStates = layers;

    /// <inheritdoc/>
    public void UpdateExpertMap(int layer, ReadOnlySpan<int> phy2Log)
    {
        phy2Log.CopyTo(_phy2Log[layer]);
        MapUpdates++;
    }

    /// <summary>The expert each local slot's weights belong to (-1 when the content matches none).</summary>
    public int[] ExpertsInWeights(int layer)
    {
        var experts = new int[SlotsPerRank];
        var contents = _buffers[layer].Select(b => b.ToArray()).ToArray();
        for (var j = 0; j < SlotsPerRank; j++)
        {
            var expert = (int)Math.Round((contents[0][j * TensorSizes[0]] - layer * 100) / 1000.0);
            for (var t = 0; t < TensorSizes.Count && expert >= 0; t++)
                for (var i = 0; i < TensorSizes[t]; i++)
                    if (contents[t][j * TensorSizes[t] + i] != ExpectedValue(expert, layer, t, i))
                    {
                        expert = -1;
                        break;
                    }
            experts[j] = expert;
        }
        return experts;
    }

    /// <summary>A copy of every weight of every layer (for bit-for-bit comparisons).</summary>
    public float[][][] Snapshot() => _buffers.Select(layer => layer.Select(b => b.ToArray()).ToArray()).ToArray();

    /// <summary>Releases the weights.</summary>
    public void Dispose()
    {
        foreach (var layer in _buffers)
            foreach (var buffer in layer) buffer.Dispose();
        if (_ownsStream) Stream.Dispose();
    }
}
