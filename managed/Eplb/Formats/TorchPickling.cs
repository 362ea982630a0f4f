using System.Collections;
using System.Numerics;
using System.Text;
using Razorvine.Pickle;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>
/// The pieces Razorvine.Pickle needs to read and write <c>torch.save</c> pickles: constructors for the
/// few allowed globals, the persistent-id hook that turns a storage reference into a
/// <see cref="TorchStorage"/>, and picklers that write tensors the way torch does.
/// </summary>
internal static class TorchPickling
{
    /// <summary>The storage globals torch writes, with the dtype each stands for.</summary>
    public static readonly IReadOnlyDictionary<string, TorchDType> StorageTypes = new Dictionary<string, TorchDType>
    {
        ["IntStorage"] = TorchDType.Int32,
        ["LongStorage"] = TorchDType.Int64,
        ["FloatStorage"] = TorchDType.Float32,
        ["DoubleStorage"] = TorchDType.Float64,
    };

    private const string RebuildModule = "torch._utils";
    private const string RebuildName = "_rebuild_tensor_v2";

    static TorchPickling()
    {
        // Razorvine's registries are process-wide; these names are torch's own and PickleGuard lets
        // no other global through, so registering them once here changes nothing else.
        Unpickler.registerConstructor(RebuildModule, RebuildName, new RebuildTensor());
        Unpickler.registerConstructor("collections", "OrderedDict", new EmptyOrderedDict());
        foreach (var (name, dtype) in StorageTypes) Unpickler.registerConstructor("torch", name, new StorageType(name, dtype));
        Pickler.registerCustomPickler(typeof(TorchTensor), new TensorPickler());
        Pickler.registerCustomPickler(typeof(StorageType), new GlobalPickler());
    }

    /// <summary>Why a global is refused, or null for the allowed ones (PickleGuard's callback).</summary>
    public static string? CheckGlobal(string module, string name)
    {
        if (module == RebuildModule && name == RebuildName) return null;
        if (module == "collections" && name == "OrderedDict") return null;
        if (module == "torch" && StorageTypes.ContainsKey(name)) return null;
        if (module == "torch" && name.EndsWith("Storage", StringComparison.Ordinal))
            return "tensors of this type are not read (int32, int64, float32 and float64 are)";
        return "only torch._utils._rebuild_tensor_v2, collections.OrderedDict and torch.{Int,Long,Float,Double}Storage are allowed";
    }

    /// <summary>Unpickles a pickle that <see cref="PickleGuard"/> has passed; storages come from <paramref name="openStorage"/>.</summary>
    public static object? Unpickle(byte[] pickle, Func<TorchDType, string, long, TorchStorage> openStorage, long maxTensorElements)
    {
        using var unpickler = new TorchUnpickler(openStorage);
        var raw = unpickler.loads(pickle);
        return Normalize(raw, maxTensorElements, 0);
    }

    private const int MaxDepth = 64;

    // Razorvine's objects -> plain values: Dictionary<string, object?>, List<object?> (lists and
    // tuples), long, double, bool, string, null and TorchTensor. Anything else is refused.
    private static object? Normalize(object? value, long maxTensorElements, int depth)
    {
        if (depth > MaxDepth) throw new InvalidDataException($"the pickle nests deeper than {MaxDepth} levels (or refers to itself)");
        switch (value)
        {
            case null: return null;
            case string or bool or double or long: return value;
            case int i: return (long)i;
            case BigInteger big:
                if (big < long.MinValue || big > long.MaxValue) throw new InvalidDataException($"the integer {big} does not fit 64 bits");
                return (long)big;
            case TensorArguments tensor: return tensor.Build(maxTensorElements);
            case Hashtable table:
                var dict = new Dictionary<string, object?>(table.Count);
                foreach (DictionaryEntry entry in table)
                {
                    if (entry.Key is not string key)
                        throw new InvalidDataException($"a dict key is a {entry.Key?.GetType().Name ?? "None"}: only string keys are read");
                    dict[key] = Normalize(entry.Value, maxTensorElements, depth + 1);
                }
                return dict;
            case ArrayList list:
                return list.Cast<object?>().Select(item => Normalize(item, maxTensorElements, depth + 1)).ToList();
            case object?[] tuple:
                return tuple.Select(item => Normalize(item, maxTensorElements, depth + 1)).ToList();
            case TorchStorage:
                throw new InvalidDataException("a storage appears outside a tensor");
            case StorageType type:
                throw new InvalidDataException($"torch.{type.Name} appears outside a storage reference");
            default:
                throw new InvalidDataException($"the pickle holds a {value.GetType().Name}, which a tensor archive does not");
        }
    }

    private static long ToInt64(object? value, string what) => value switch
    {
        int i => i,
        long l => l,
        BigInteger big when big >= long.MinValue && big <= long.MaxValue => (long)big,
        _ => throw new InvalidDataException($"{what} is {Describe(value)}, not an integer"),
    };

    private static string Describe(object? value) => value switch
    {
        null => "None",
        string s => $"the string '{s}'",
        _ => $"a {value.GetType().Name}",
    };

    private static long[] ToInt64s(object? value, string what)
    {
        if (value is not object?[] tuple) throw new InvalidDataException($"{what} is {Describe(value)}, not a tuple");
        return tuple.Select((item, d) => ToInt64(item, $"{what}[{d}]")).ToArray();
    }

    /// <summary>Torch's persistent ids: <c>('storage', torch.XStorage, key, location, numel)</c>.</summary>
    private sealed class TorchUnpickler(Func<TorchDType, string, long, TorchStorage> openStorage) : Unpickler
    {
        private readonly Dictionary<string, TorchStorage> _storages = [];

        protected override object persistentLoad(object pid)
        {
            if (pid is not object?[] { Length: 5 } parts || parts[0] is not "storage")
                throw new InvalidDataException($"a persistent id is {Describe(pid)}, not ('storage', type, key, location, numel)");
            if (parts[1] is not StorageType type) throw new InvalidDataException($"a storage's type is {Describe(parts[1])}");
            if (parts[2] is not string key || key.Length == 0 || !key.All(char.IsAsciiLetterOrDigit))
                throw new InvalidDataException($"a storage key is {Describe(parts[2])}, not a record name");
            if (parts[3] is not string) throw new InvalidDataException($"storage '{key}' has location {Describe(parts[3])}");
            var elements = ToInt64(parts[4], $"storage '{key}''s element count");
            if (elements < 0) throw new InvalidDataException($"storage '{key}' declares {elements} elements");
            if (_storages.TryGetValue(key, out var known))
            {
                if (known.DType != type.DType || known.Elements != elements)
                    throw new InvalidDataException($"storage '{key}' is declared twice with different types or sizes");
                return known;
            }
            return _storages[key] = openStorage(type.DType, key, elements);
        }
    }

    /// <summary><c>torch.IntStorage</c> and friends: they only name a dtype inside a persistent id.</summary>
    private sealed class StorageType(string name, TorchDType dtype) : IObjectConstructor
    {
        public string Name { get; } = name;

        public TorchDType DType { get; } = dtype;

        public object construct(object[] args) => throw new InvalidDataException($"torch.{Name} is called; torch.save never calls a storage type");
    }

    /// <summary><c>collections.OrderedDict()</c>: torch's empty backward-hooks argument.</summary>
    private sealed class EmptyOrderedDict : IObjectConstructor
    {
        public object construct(object[] args) => args.Length == 0
            ? new Hashtable()
            : throw new InvalidDataException("collections.OrderedDict is called with arguments; only the empty one of torch's backward hooks is read");
    }

    /// <summary>
    /// <c>torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])</c>: keeps the arguments; <see cref="Normalize"/> checks them against the limits.
    /// </summary>
    private sealed class RebuildTensor : IObjectConstructor
    {
        public object construct(object[] args)
        {
            if (args.Length is not (6 or 7))
                throw new InvalidDataException($"_rebuild_tensor_v2 gets {args.Length} arguments, expected 6 or 7");
            if (args[0] is not TorchStorage storage) throw new InvalidDataException($"_rebuild_tensor_v2's storage is {Describe(args[0])}");
            if (args[4] is not bool) throw new InvalidDataException($"_rebuild_tensor_v2's requires_grad is {Describe(args[4])}");
            if (args[5] is not Hashtable { Count: 0 }) throw new InvalidDataException("_rebuild_tensor_v2's backward hooks are not an empty OrderedDict");
            return new TensorArguments(storage, ToInt64(args[1], "a tensor's storage offset"), ToInt64s(args[2], "a tensor's size"),
                ToInt64s(args[3], "a tensor's stride"));
        }
    }

    private sealed record TensorArguments(TorchStorage Storage, long Offset, long[] Shape, long[] Strides)
    {
        public TorchTensor Build(long maxElements) => new(Storage, Offset, Shape, Strides, maxElements);
    }

    /// <summary>Writes a pickle torch reads: the same opcodes <c>torch.save</c> writes for a dict of tensors.</summary>
    public static byte[] Pickle(object? root)
    {
        using var pickler = new TorchPickler();
        return pickler.dumps(root);
    }

    /// <summary>Storages become persistent ids; the archive writer stores each under its key.</summary>
    private sealed class TorchPickler : Pickler
    {
        protected override bool persistentId(object pid, out object newpid)
        {
            if (pid is TorchStorage storage)
            {
                var name = StorageTypes.Single(pair => pair.Value == storage.DType).Key;
                newpid = new object[] { "storage", new StorageType(name, storage.DType), storage.Key, "cpu", storage.Elements };
                return true;
            }
            newpid = null!;
            return false;
        }
    }

    private sealed class GlobalPickler : IObjectPickler
    {
        public void pickle(object o, Stream outs, Pickler currentPickler)
        {
            var type = (StorageType)o;
            WriteGlobal(outs, "torch", type.Name);
        }
    }

    private sealed class TensorPickler : IObjectPickler
    {
        public void pickle(object o, Stream outs, Pickler currentPickler)
        {
            var tensor = (TorchTensor)o;
            WriteGlobal(outs, RebuildModule, RebuildName);
            outs.WriteByte((byte)'(');  // MARK: the argument tuple
            currentPickler.save(tensor.Storage);
            currentPickler.save(tensor.StorageOffset);
            currentPickler.save(tensor.Shape.Cast<object>().ToArray());
            currentPickler.save(tensor.Strides.Cast<object>().ToArray());
            currentPickler.save(false);
            WriteGlobal(outs, "collections", "OrderedDict");
            outs.WriteByte((byte)')');  // EMPTY_TUPLE
            outs.WriteByte((byte)'R');  // REDUCE: OrderedDict()
            outs.WriteByte((byte)'t');  // TUPLE
            outs.WriteByte((byte)'R');  // REDUCE: _rebuild_tensor_v2(...)
        }
    }

    private static void WriteGlobal(Stream outs, string module, string name)
    {
        outs.WriteByte((byte)'c');
        var text = Encoding.ASCII.GetBytes($"{module}\n{name}\n");
        outs.Write(text, 0, text.Length);
    }
}
