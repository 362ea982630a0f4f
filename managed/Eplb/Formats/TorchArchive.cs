using System.IO.Compression;
using System.Text;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>How much a <see cref="TorchArchive"/> may read, so a hostile file cannot make it allocate gigabytes.</summary>
public sealed record TorchArchiveLimits
{
    /// <summary>The defaults: a 256 MiB pickle, 1 GiB per storage, 2^28 elements per tensor.</summary>
    public static TorchArchiveLimits Default { get; } = new();

    /// <summary>The largest <c>data.pkl</c> read, in bytes.</summary>
    public long MaxPickleBytes { get; init; } = 256L << 20;

    /// <summary>The largest storage record read, in bytes (SGLang's stat dump of 1000 steps of DeepSeek-V3 is 62 MB).</summary>
    public long MaxStorageBytes { get; init; } = 1L << 30;

    /// <summary>The most elements one tensor may have.</summary>
    public long MaxTensorElements { get; init; } = 1L << 28;
}

/// <summary>
/// A <c>torch.save</c> archive (PyTorch 1.6 and later: a zip holding <c>{name}/data.pkl</c>, the pickled
/// object, and one record <c>{name}/data/{key}</c> per tensor storage), read without running anything
/// the pickle asks for: <see cref="PickleGuard"/> lets through only the opcodes and globals of tensors
/// (<c>torch._utils._rebuild_tensor_v2</c>, int32/int64/float32/float64 storages,
/// <c>collections.OrderedDict</c>), numbers, strings, lists and dicts, and Razorvine.Pickle unpickles.
/// Not thread-safe; tensors read their storage from the open archive, so dispose it after using them.
/// </summary>
public sealed class TorchArchive : IDisposable
{
    private static readonly byte[] ZipMagic = "PK\u0003\u0004"u8.ToArray();

    private readonly ZipArchive _zip;
    private readonly string _prefix;
    private readonly string _source;
    private readonly TorchArchiveLimits _limits;

    private TorchArchive(ZipArchive zip, string prefix, string source, TorchArchiveLimits limits)
    {
        _zip = zip;
        _prefix = prefix;
        _source = source;
        _limits = limits;
    }

    /// <summary>
    /// The unpickled object: <see cref="IReadOnlyDictionary{TKey, TValue}"/> of string keys for dicts,
    /// <see cref="IReadOnlyList{T}"/> for lists and tuples, <see cref="long"/>, <see cref="double"/>,
    /// <see cref="bool"/>, <see cref="string"/>, null and <see cref="TorchTensor"/>.
    /// </summary>
    public object? Root { get; private set; }

    /// <summary>The folder all records are in (torch names it after the file it saved to, or <c>archive</c>).</summary>
    public string RecordFolder => _prefix.TrimEnd('/');

    /// <summary>Whether <paramref name="head"/> (the first bytes of a file) starts a zip archive, as every <c>torch.save</c> file since PyTorch 1.6 does.</summary>
    public static bool IsZip(ReadOnlySpan<byte> head) => head.StartsWith(ZipMagic);

    /// <summary>Opens and unpickles an archive file.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is not a readable tensor archive; the message says what was wrong.</exception>
    public static TorchArchive Open(string path, TorchArchiveLimits? limits = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"'{path}' does not exist", path);
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        try
        {
            return Open(stream, path, limits);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    /// <summary>Opens and unpickles an archive from a seekable stream, which the archive then owns.</summary>
    /// <param name="stream">The archive; disposed with the archive.</param>
    /// <param name="source">The name used in messages (a path).</param>
    /// <param name="limits">Size limits; <see cref="TorchArchiveLimits.Default"/> when null.</param>
    /// <exception cref="InvalidDataException">The stream is not a readable tensor archive; the message says what was wrong.</exception>
    public static TorchArchive Open(Stream stream, string source, TorchArchiveLimits? limits = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        limits ??= TorchArchiveLimits.Default;
        ZipArchive zip;
        try
        {
            zip = new ZipArchive(stream, ZipArchiveMode.Read, leaveOpen: false);
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"{source}: not a readable zip archive (truncated or damaged?): {e.Message}", e);
        }
        try
        {
            var pickles = zip.Entries.Where(e => e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal) && e.FullName.Count(c => c == '/') == 1).ToList();
            if (pickles.Count == 0) throw new InvalidDataException($"{source}: a zip archive, but not a torch.save one: it has no <name>/data.pkl record");
            if (pickles.Count > 1) throw new InvalidDataException($"{source}: {pickles.Count} data.pkl records ({string.Join(", ", pickles.Select(p => p.FullName))})");
            var prefix = pickles[0].FullName[..^"data.pkl".Length];
            var archive = new TorchArchive(zip, prefix, source, limits);
            archive.CheckByteOrder();
            var pickle = archive.ReadRecord(pickles[0], limits.MaxPickleBytes, "data.pkl");
            try
            {
                PickleGuard.Check(pickle, TorchPickling.CheckGlobal);
                archive.Root = TorchPickling.Unpickle(pickle, archive.OpenStorage, limits.MaxTensorElements);
            }
            catch (InvalidDataException e) when (!e.Message.StartsWith(source, StringComparison.Ordinal))
            {
                throw new InvalidDataException($"{source}: {e.Message}", e);
            }
            catch (Exception e) when (e is not (InvalidDataException or OutOfMemoryException))
            {
                // Razorvine reports a malformed stack (SETITEMS without a dict, REDUCE on a string, ...) with its own exceptions.
                throw new InvalidDataException($"{source}: malformed pickle: {e.Message}", e);
            }
            return archive;
        }
        catch
        {
            zip.Dispose();
            throw;
        }
    }

    /// <summary>Disposes the archive and its stream.</summary>
    public void Dispose() => _zip.Dispose();

    private void CheckByteOrder()
    {
        // PyTorch >= 2.1 records the byte order; older archives are little-endian.
        if (_zip.GetEntry(_prefix + "byteorder") is not { } entry) return;
        var text = Encoding.ASCII.GetString(ReadRecord(entry, 16, "byteorder")).Trim();
        if (text != "little") throw new InvalidDataException($"{_source}: byte order '{text}': only little-endian archives are read");
    }

    private TorchStorage OpenStorage(TorchDType dtype, string key, long elements)
    {
        var size = TorchTensor.ElementSize(dtype);
        if (elements > _limits.MaxStorageBytes / size)
            throw new InvalidDataException($"storage '{key}' declares {elements} {dtype.ToString().ToLowerInvariant()} elements, above the limit of {_limits.MaxStorageBytes} bytes");
        var bytes = elements * size;
        var name = $"data/{key}";
        var entry = _zip.GetEntry(_prefix + name) ?? throw new InvalidDataException($"storage '{key}' has no {name} record in the archive");
        if (entry.Length != bytes)
            throw new InvalidDataException($"record {name} holds {entry.Length} bytes, but its storage declares {elements} {dtype.ToString().ToLowerInvariant()} elements = {bytes} bytes");
        return TorchStorage.InArchive(dtype, key, elements, () => ReadRecord(entry, bytes, name));
    }

    // Reads a record whole, allocating only as bytes arrive (a declared length is not trusted).
    private byte[] ReadRecord(ZipArchiveEntry entry, long limit, string name)
    {
        if (entry.Length > limit) throw new InvalidDataException($"{_source}: record {name} has {entry.Length} bytes, above the limit of {limit}");
        try
        {
            using var stream = entry.Open();
            using var buffer = new MemoryStream((int)Math.Min(entry.Length, 1 << 20));
            var chunk = new byte[1 << 16];
            int read;
            while ((read = stream.Read(chunk)) > 0)
            {
                if (buffer.Length + read > entry.Length)
                    throw new InvalidDataException($"{_source}: record {name} is longer than the {entry.Length} bytes its header declares");
                buffer.Write(chunk, 0, read);
            }
            if (buffer.Length != entry.Length)
                throw new InvalidDataException($"{_source}: record {name} ends after {buffer.Length} of {entry.Length} bytes (truncated?)");
            var bytes = buffer.ToArray();
            // torch's reader (miniz) checks each record's CRC-32; ZipArchive does not.
            if (System.IO.Hashing.Crc32.HashToUInt32(bytes) != entry.Crc32)
                throw new InvalidDataException($"{_source}: record {name} fails its CRC-32 check (damaged?)");
            return bytes;
        }
        catch (InvalidDataException e) when (!e.Message.StartsWith(_source, StringComparison.Ordinal))
        {
            throw new InvalidDataException($"{_source}: record {name} cannot be read: {e.Message}", e);
        }
        catch (IOException e)
        {
            throw new InvalidDataException($"{_source}: record {name} cannot be read: {e.Message}", e);
        }
    }

    /// <summary>
    /// Writes an archive <c>torch.load</c> reads (PyTorch 1.6 and later, <c>weights_only=True</c> included):
    /// <c>archive/data.pkl</c> (pickle protocol 2, as <c>torch.save</c> writes), one <c>archive/data/{i}</c>
    /// record per tensor, <c>archive/byteorder</c> and <c>archive/version</c>.
    /// </summary>
    /// <param name="stream">Where the archive goes; left open.</param>
    /// <param name="root">
    /// The object: dicts (<see cref="IReadOnlyDictionary{TKey, TValue}"/> of string keys), lists, tuples
    /// (<c>object[]</c>), integers, doubles, booleans, strings, null and <see cref="TorchTensor"/>s.
    /// </param>
    public static void Save(Stream stream, object? root)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var tensors = new List<TorchTensor>();
        var keyed = WithStorageKeys(root, tensors);
        var pickle = TorchPickling.Pickle(keyed);
        using var zip = new ZipArchive(stream, ZipArchiveMode.Create, leaveOpen: true);
        // The first record names the folder: torch's reader takes the archive name from it.
        Write(zip, "archive/data.pkl", pickle);
        Write(zip, "archive/byteorder", "little"u8.ToArray());
        foreach (var tensor in tensors) Write(zip, $"archive/data/{tensor.Storage.Key}", tensor.Storage.Read());
        Write(zip, "archive/version", "3\n"u8.ToArray());
    }

    private static void Write(ZipArchive zip, string name, byte[] bytes)
    {
        // Stored, not deflated, as torch writes records.
        using var entry = zip.CreateEntry(name, CompressionLevel.NoCompression).Open();
        entry.Write(bytes);
    }

    // Gives every tensor's storage its own record key (in the order the pickle meets them).
    private static object? WithStorageKeys(object? value, List<TorchTensor> tensors) => value switch
    {
        TorchTensor tensor => Keyed(tensor, tensors),
        string => value,
        IReadOnlyDictionary<string, object?> dict => dict.ToDictionary(pair => pair.Key, pair => WithStorageKeys(pair.Value, tensors)),
        object?[] tuple => tuple.Select(item => WithStorageKeys(item, tensors)).ToArray(),
        System.Collections.IList list => list.Cast<object?>().Select(item => WithStorageKeys(item, tensors)).ToList(),
        null or bool or int or long or double => value,
        _ => throw new ArgumentException($"a {value.GetType().Name} cannot be saved in a tensor archive", nameof(value)),
    };

    private static TorchTensor Keyed(TorchTensor tensor, List<TorchTensor> tensors)
    {
        var keyed = tensor.WithStorageKey(tensors.Count.ToString(System.Globalization.CultureInfo.InvariantCulture));
        tensors.Add(keyed);
        return keyed;
    }
}
