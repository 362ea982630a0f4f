using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using System.Text.Json;
using Eplb.Formats;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The <c>torch.save</c> reader and writer: golden files made by real torch (Fixtures/sglang/make_fixtures.py),
/// round trips on fresh random tensors, and hostile archives that must each end in one
/// <see cref="InvalidDataException"/> naming what was wrong.
/// </summary>
public class TorchArchiveTests
{
    private string _dir = "";

    [SetUp]
    public void CreateFolder() => _dir = Directory.CreateTempSubdirectory("eplb-torch-").FullName;

    [TearDown]
    public void DeleteFolder() => Directory.Delete(_dir, recursive: true);

    internal static string FixtureDir => Path.Combine(TestSupport.RepoRoot, "tests", "Eplb.Tests", "Fixtures", "sglang");

    internal static double[][] Expected(string fixture)
    {
        using var json = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(FixtureDir, "expected.json")));
        return json.RootElement.GetProperty(fixture).EnumerateArray().Select(row => row.EnumerateArray().Select(v => v.GetDouble()).ToArray()).ToArray();
    }

    [TestCase("recorder_stat.pt", ExpertLoadFormat.SglangRecorderStat, "4 buffer steps summed, rank 0, average utilization over the window 0.812")]
    [TestCase("recorder_stat_int64_strided.pt", ExpertLoadFormat.SglangRecorderStat, "3 buffer steps summed, rank 0")]
    [TestCase("recorder_stat_float32_offset.pt", ExpertLoadFormat.SglangRecorderStat, "1 buffer step summed, rank 0")]
    [TestCase("recorder_per_pass.pt", ExpertLoadFormat.SglangRecorderPerPass, "3 forward passes summed (rank 1), 10 physical slots folded to 8 logical experts")]
    public void RealTorchDumpsReadAsTorchComputesThem(string fixture, ExpertLoadFormat format, string details)
    {
        var file = ExpertLoadFile.Read(Path.Combine(FixtureDir, fixture));
        var expected = Expected(fixture);
        Assert.That(file.Sources.Single().Format, Is.EqualTo(format));
        Assert.That(file.Sources.Single().Description, Does.Contain(details));
        Assert.That(file.ModelLayers, Is.EqualTo(6));
        Assert.That(file.Load.LogicalExperts, Is.EqualTo(8));
        for (var l = 0; l < 6; l++) Assert.That(file.Load.Layer(l).ToArray(), Is.EqualTo(expected[l]), $"layer {l}");
        Assert.That(file.UnplannedLayerIds, Is.EqualTo(new[] { 0, 1 }));
        Assert.That(file.PlannedLayerIds, Is.EqualTo(new[] { 2, 3, 4, 5 }));
    }

    [Test]
    public void TheRawArchiveKeepsDtypesShapesStridesAndScalars()
    {
        using (var stat = TorchArchive.Open(Path.Combine(FixtureDir, "recorder_stat.pt")))
        {
            var root = (IReadOnlyDictionary<string, object?>)stat.Root!;
            Assert.That(root["rank"], Is.EqualTo(0L));
            Assert.That(root["average_utilization_rate_over_window"], Is.EqualTo(0.8125));
            var counts = (TorchTensor)root["logical_count"]!;
            Assert.That((counts.DType, counts.Shape, counts.Strides), Is.EqualTo((TorchDType.Int32, new long[] { 4, 6, 8 }, new long[] { 48, 8, 1 })));
            Assert.That(stat.RecordFolder, Is.EqualTo("recorder_stat"));
        }
        using (var strided = TorchArchive.Open(Path.Combine(FixtureDir, "recorder_stat_int64_strided.pt")))
        {
            var root = (IReadOnlyDictionary<string, object?>)strided.Root!;
            Assert.That(root["average_utilization_rate_over_window"], Is.Null);
            var counts = (TorchTensor)root["logical_count"]!;
            Assert.That((counts.DType, counts.Shape, counts.Strides), Is.EqualTo((TorchDType.Int64, new long[] { 3, 6, 8 }, new long[] { 8, 24, 1 })));
        }
        using var offset = TorchArchive.Open(Path.Combine(FixtureDir, "recorder_stat_float32_offset.pt"));
        var tensor = (TorchTensor)((IReadOnlyDictionary<string, object?>)offset.Root!)["logical_count"]!;
        Assert.That((tensor.DType, tensor.StorageOffset, tensor.Storage.Elements), Is.EqualTo((TorchDType.Float32, 5L, 53L)));
        Assert.That(tensor.ToDoubles(), Is.EqualTo(Expected("recorder_stat_float32_offset.pt").SelectMany(r => r)));
    }

    [Test]
    public void WrittenArchivesReadBackWithEveryDtypeAndShape()
    {
        var random = TestSupport.NewRandom();
        for (var trial = 0; trial < 20; trial++)
        {
            var rank = random.Next(0, 4);
            var shape = Enumerable.Range(0, rank).Select(_ => (long)random.Next(0, 6)).ToArray();
            var count = (int)shape.Aggregate(1L, (a, b) => a * b);
            var dtype = (TorchDType)random.Next(0, 4);
            var values = Enumerable.Range(0, count).Select(_ => dtype is TorchDType.Int32 or TorchDType.Int64
                ? random.Next(-1_000_000, 1_000_000) * (dtype == TorchDType.Int64 ? 4096.0 : 1.0)
                : dtype == TorchDType.Float32 ? (double)(float)(random.NextDouble() * 1e6 - 5e5) : random.NextDouble() * 1e9).ToArray();
            var tensor = dtype switch
            {
                TorchDType.Int32 => TorchTensor.FromInt32(values.Select(v => (int)v).ToArray(), shape),
                TorchDType.Int64 => TorchTensor.FromInt64(values.Select(v => (long)v).ToArray(), shape),
                TorchDType.Float32 => TorchTensor.FromFloat32(values.Select(v => (float)v).ToArray(), shape),
                _ => TorchTensor.FromFloat64(values, shape),
            };
            var path = Path.Combine(_dir, $"t{trial}.pt");
            using (var stream = File.Create(path))
                TorchArchive.Save(stream, new Dictionary<string, object?>
                {
                    ["t"] = tensor, ["n"] = null, ["i"] = -7L, ["big"] = 1L << 40, ["f"] = 0.25, ["b"] = true, ["s"] = "é",
                    ["l"] = new List<object?> { 1L, "x", new object?[] { 2L, tensor } },
                });
            using var archive = TorchArchive.Open(path);
            var root = (IReadOnlyDictionary<string, object?>)archive.Root!;
            var read = (TorchTensor)root["t"]!;
            Assert.That((read.DType, read.Shape), Is.EqualTo((dtype, shape)), $"trial {trial}");
            Assert.That(read.ToDoubles(), Is.EqualTo(values), $"trial {trial}");
            Assert.That((root["n"], root["i"], root["big"], root["f"], root["b"], root["s"]), Is.EqualTo(((object?)null, -7L, 1L << 40, 0.25, true, "é")));
            var list = (IReadOnlyList<object?>)root["l"]!;
            Assert.That(((TorchTensor)((IReadOnlyList<object?>)list[2]!)[1]!).ToDoubles(), Is.EqualTo(values));
        }
    }

    [Test]
    public void WrittenArchivesHaveTorchsLayout()
    {
        var path = Path.Combine(_dir, "p.pt");
        using (var stream = File.Create(path)) TorchArchive.Save(stream, new Dictionary<string, object?> { ["x"] = TorchTensor.FromInt64([1, 2, 3], 3) });
        using var zip = ZipFile.OpenRead(path);
        Assert.That(zip.Entries.Select(e => e.FullName), Is.EqualTo(new[] { "archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/version" }));
        Assert.That(zip.Entries.All(e => e.CompressedLength == e.Length), "records are stored, not deflated");
        Assert.That(zip.GetEntry("archive/data/0")!.Length, Is.EqualTo(24));
    }

    // ---------------------------------------------------------------------------------------------
    // Hostile input: every case is one InvalidDataException naming the problem, nothing else.

    private static byte[] Int32s(params int[] values)
    {
        var bytes = new byte[values.Length * 4];
        for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(i * 4), values[i]);
        return bytes;
    }

    private static byte[] Float32s(params float[] values)
    {
        var bytes = new byte[values.Length * 4];
        for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), values[i]);
        return bytes;
    }

    private string Archive(byte[]? pickle, params (string Name, byte[] Bytes)[] records)
    {
        var path = Path.Combine(_dir, $"hostile{Directory.GetFiles(_dir).Length}.pt");
        using var zip = ZipFile.Open(path, ZipArchiveMode.Create);
        if (pickle != null)
            using (var s = zip.CreateEntry("dump/data.pkl", CompressionLevel.NoCompression).Open()) s.Write(pickle);
        foreach (var (name, bytes) in records)
            using (var s = zip.CreateEntry("dump/" + name, CompressionLevel.NoCompression).Open()) s.Write(bytes);
        return path;
    }

    /// <summary>A recorder dump {"logical_count": tensor} with the given tensor arguments.</summary>
    private static byte[] Dump(string storageType, long elements, long offset, long[] shape, long[] strides, string key = "logical_count",
        string location = "cpu") =>
        new PickleBuilder().Proto().Op('}').Op('(').Str(key).Tensor(storageType, "0", elements, offset, shape, strides, location).Op('u').Op('.').Build();

    private static readonly byte[] Counts2x3 = Int32s(1, 2, 3, 4, 5, 6);

    private static void AssertRefused(string path, string expected)
    {
        var e = Assert.Throws<InvalidDataException>(() => ExpertLoadFile.Read(path));
        Assert.That(e!.Message, Does.StartWith(path).And.Contain(expected));
        Assert.That(e.Message, Does.Not.Contain("\n"));
    }

    [Test]
    public void AWellFormedHandBuiltDumpIsRead()
    {
        // The control for the cases below: the same builder, nothing wrong. SGLang saves its map from
        // the GPU: a storage's location ("cuda:0") does not matter to the reader.
        var path = Archive(Dump("IntStorage", 6, 0, [1, 2, 3], [6, 3, 1], location: "cuda:0"), ("data/0", Counts2x3));
        Assert.That(ExpertLoadFile.Read(path).Load.Values.ToArray(), Is.EqualTo(new double[] { 1, 2, 3, 4, 5, 6 }));
    }

    [Test]
    public void NotAZipNotJsonEmptyOrLegacy()
    {
        var random = Path.Combine(_dir, "random.pt");
        File.WriteAllBytes(random, [0x13, 0x37, 0x00, 0xff, 0x42]);
        AssertRefused(random, "neither a torch.save archive (zip) nor JSON (it starts with bytes 133700ff)");
        var empty = Path.Combine(_dir, "empty.pt");
        File.WriteAllBytes(empty, []);
        AssertRefused(empty, "the file is empty");
        var legacy = Path.Combine(_dir, "legacy.pt");
        File.WriteAllBytes(legacy, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc]);
        AssertRefused(legacy, "legacy (pre-zip) torch.save file");
    }

    [Test]
    public void TruncatedArchivesAtAnyLength()
    {
        var whole = File.ReadAllBytes(Path.Combine(FixtureDir, "recorder_stat.pt"));
        var random = TestSupport.NewRandom();
        var cuts = new[] { 4, 30, whole.Length / 2, whole.Length - 23, whole.Length - 1 }.Concat(Enumerable.Range(0, 10).Select(_ => random.Next(4, whole.Length)));
        foreach (var cut in cuts)
        {
            var path = Path.Combine(_dir, $"cut{cut}.pt");
            File.WriteAllBytes(path, whole[..cut]);
            var e = Assert.Throws<InvalidDataException>(() => ExpertLoadFile.Read(path), $"cut at {cut} of {whole.Length}");
            Assert.That(e!.Message, Does.StartWith(path));
        }
    }

    [Test]
    public void ADamagedRecordFailsItsChecksum()
    {
        // Flip one byte inside the stored logical_count record: the archive still opens, the counts would be wrong.
        var bytes = File.ReadAllBytes(Path.Combine(FixtureDir, "recorder_stat.pt"));
        using (var zip = new ZipArchive(new MemoryStream(bytes)))
        {
            var data = zip.GetEntry("recorder_stat/data/0")!;
            var record = new byte[data.Length];
            using (var s = data.Open()) s.ReadExactly(record);
            var pattern = record.AsSpan(64, 32);  // step 0, layer 2: random counts (layers 0 and 1 are zero)
            var at = bytes.AsSpan().IndexOf(pattern);
            Assert.That(at, Is.GreaterThan(0));
            Assert.That(bytes.AsSpan().LastIndexOf(pattern), Is.EqualTo(at), "the counts occur once in the file");
            bytes[at + 1] ^= 0xff;
        }
        var path = Path.Combine(_dir, "damaged.pt");
        File.WriteAllBytes(path, bytes);
        AssertRefused(path, "record data/0 fails its CRC-32 check (damaged?)");
    }

    [Test]
    public void ZipsThatAreNotTorchArchives()
    {
        AssertRefused(Archive(null, ("other.txt", [1, 2, 3])), "it has no <name>/data.pkl record");
        var two = Path.Combine(_dir, "two.pt");
        using (var zip = ZipFile.Open(two, ZipArchiveMode.Create))
        {
            zip.CreateEntry("a/data.pkl");
            zip.CreateEntry("b/data.pkl");
        }
        AssertRefused(two, "2 data.pkl records");
        AssertRefused(Archive(Dump("IntStorage", 6, 0, [1, 2, 3], [6, 3, 1]), ("data/0", Counts2x3), ("byteorder", "big"u8.ToArray())),
            "byte order 'big'");
    }

    public static IEnumerable<TestCaseData> RefusedPickles()
    {
        PickleBuilder Start() => new PickleBuilder().Proto().Op('}').Op('(').Str("logical_count");
        yield return new TestCaseData(Start().Raw(0xff).Build(), "unknown pickle opcode 0xff at byte").SetName("UnknownOpcode");
        yield return new TestCaseData(Start().Global("os", "system").Str("echo hi").Raw(0x85).Op('R').Op('u').Op('.').Build(),
            "pickle global os.system at byte").SetName("GlobalOsSystem");
        yield return new TestCaseData(Start().Global("builtins", "eval").Build(), "pickle global builtins.eval").SetName("GlobalEval");
        yield return new TestCaseData(Start().Global("datetime", "datetime").Build(), "pickle global datetime.datetime").SetName("GlobalRazorvineKnows");
        yield return new TestCaseData(Start().Global("torch", "HalfStorage").Build(), "pickle global torch.HalfStorage at byte 22 is refused: tensors of this type are not read")
            .SetName("HalfStorage");
        yield return new TestCaseData(Start().Op('}').Op('}').Op('b').Build(), "pickle opcode BUILD (0x62)").SetName("Build");
        yield return new TestCaseData(Start().Op('(').Op('i').Raw("os\nsystem\n"u8.ToArray()).Build(), "pickle opcode INST").SetName("Inst");
        yield return new TestCaseData(Start().Str("os").Str("system").Raw(0x93).Build(), "pickle opcode STACK_GLOBAL").SetName("StackGlobal");
        yield return new TestCaseData(Start().Raw(0x82, 1).Build(), "pickle opcode EXT1").SetName("Ext1");
        yield return new TestCaseData(Start().Op('P').Raw("0\n"u8.ToArray()).Build(), "pickle opcode PERSID").SetName("TextPersistentId");
        yield return new TestCaseData(Start().Raw((byte)'C', 3, 1, 2, 3).Build(), "pickle opcode SHORT_BINBYTES").SetName("Bytes");
        yield return new TestCaseData(Start().Int(1).Op('u').Build(), "without a STOP opcode").SetName("NoStop");
        yield return new TestCaseData(Start().Int(1).Op('u').Op('.').Raw(0, 0).Build(), "2 bytes follow the pickle's STOP opcode").SetName("TrailingBytes");
        yield return new TestCaseData(Start().Raw((byte)'X', 0xff, 0xff, 0xff, 0x7f).Build(), "declares 2147483647 bytes").SetName("HugeString");
        yield return new TestCaseData(Start().Raw(0x8d, 0, 0, 0, 0, 0, 0, 0, 0x80).Build(), "declares -9223372036854775808 bytes").SetName("NegativeLength8");
        yield return new TestCaseData(new PickleBuilder().Raw(0x80, 9).Build(), "pickle protocol 9").SetName("Protocol9");
        yield return new TestCaseData(Start().Str("x").Op(')').Op('R').Op('u').Op('.').Build(), "malformed pickle").SetName("ReduceOnAString");
        yield return new TestCaseData(new PickleBuilder().Proto().Op(']').Raw((byte)'q', 0).Raw((byte)'h', 0).Op('a').Op('.').Build(),
            "nests deeper than 64 levels (or refers to itself)").SetName("SelfReference");
        yield return new TestCaseData(Start().Global("collections", "OrderedDict").Op('(').Str("a").Int(1).Op('t').Raw(0x85).Op('R').Op('u').Op('.').Build(),
            "collections.OrderedDict is called with arguments").SetName("OrderedDictWithItems");
        yield return new TestCaseData(Start().Global("torch", "IntStorage").Op(')').Op('R').Op('u').Op('.').Build(), "torch.IntStorage is called")
            .SetName("StorageTypeCalled");
        yield return new TestCaseData(Start().Op('(').Str("storage").Op('t').Op('Q').Op('u').Op('.').Build(), "not ('storage', type, key, location, numel)")
            .SetName("BadPersistentId");
        yield return new TestCaseData(Start().Op('(').Str("storage").Global("torch", "IntStorage").Str("../../etc/passwd").Str("cpu").Int(6).Op('t').Op('Q')
            .Op('u').Op('.').Build(), "a storage key is the string '../../etc/passwd', not a record name").SetName("StorageKeyWithPath");
        yield return new TestCaseData(Start().Global("torch._utils", "_rebuild_tensor_v2").Op('(').Int(0).Op('t').Op('R').Op('u').Op('.').Build(),
            "_rebuild_tensor_v2 gets 1 arguments, expected 6 or 7").SetName("RebuildWithOneArgument");
        yield return new TestCaseData(Start().Int(1).Op('u').Op('.').Build()[..^3], "the pickle ends inside opcode BININT at byte 22 (truncated?)")
            .SetName("TruncatedPickle");
    }

    [TestCaseSource(nameof(RefusedPickles))]
    public void RefusedPicklesNameTheProblem(byte[] pickle, string expected) =>
        AssertRefused(Archive(pickle, ("data/0", Counts2x3)), expected);

    public static IEnumerable<TestCaseData> BadTensors()
    {
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 2, 3 }, new long[] { 3, 1 }, Counts2x3[..20],
            "record data/0 holds 20 bytes, but its storage declares 6 int32 elements = 24 bytes").SetName("ShortRecord");
        yield return new TestCaseData("LongStorage", 6L, 0L, new long[] { 2, 3 }, new long[] { 3, 1 }, Counts2x3,
            "record data/0 holds 24 bytes, but its storage declares 6 int64 elements = 48 bytes").SetName("WrongDtypeForBytes");
        yield return new TestCaseData("IntStorage", 1L << 40, 0L, new long[] { 2, 3 }, new long[] { 3, 1 }, Counts2x3,
            "storage '0' declares 1099511627776 int32 elements, above the limit of 1073741824 bytes").SetName("HugeStorage");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 10 }, new long[] { 1 }, Counts2x3,
            "reaches element 9 of storage '0', which holds 6").SetName("ViewBeyondStorage");
        yield return new TestCaseData("IntStorage", 6L, 4L, new long[] { 2, 2 }, new long[] { 1, 1 }, Counts2x3,
            "reaches element 6 of storage '0', which holds 6").SetName("OffsetBeyondStorage");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 1L << 20, 1L << 20 }, new long[] { 0, 0 }, Counts2x3,
            "has 1099511627776 elements, above the limit of 268435456").SetName("StrideZeroBomb");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 2, -3 }, new long[] { 3, 1 }, Counts2x3,
            "size -3 in dimension 1").SetName("NegativeSize");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 2, 3 }, new long[] { 3, -1 }, Counts2x3,
            "stride -1 in dimension 1").SetName("NegativeStride");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { long.MaxValue, 2 }, new long[] { 2, 1 }, Counts2x3,
            "overflows 64-bit indexing").SetName("OverflowingShape");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 6 }, new long[] { 1 }, Counts2x3,
            "logical_count has shape [6]: expected [buffer_steps][layers][experts] or [layers][experts]").SetName("OneDimensional");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 1, 1, 2, 3 }, new long[] { 6, 6, 3, 1 }, Counts2x3,
            "logical_count has shape [1, 1, 2, 3]").SetName("FourDimensional");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 0, 2, 3 }, new long[] { 6, 3, 1 }, Counts2x3,
            "no buffer steps").SetName("NoSteps");
        yield return new TestCaseData("IntStorage", 6L, 0L, new long[] { 2, 3 }, new long[] { 3, 1 }, Int32s(1, 2, 3, 4, -5, 6),
            "logical_count[1][1] = -5: counts must be finite and >= 0").SetName("NegativeCount");
        yield return new TestCaseData("FloatStorage", 6L, 0L, new long[] { 2, 3 }, new long[] { 3, 1 }, Float32s(1, 2, float.NaN, 4, 5, 6),
            "logical_count[0][2] = NaN: counts must be finite and >= 0").SetName("NaNCount");
        yield return new TestCaseData("FloatStorage", 6L, 0L, new long[] { 2, 3 }, new long[] { 3, 1 }, Float32s(1, 2, 3, float.PositiveInfinity, 5, 6),
            "logical_count[1][0] = Infinity: counts must be finite and >= 0").SetName("InfiniteCount");
    }

    [TestCaseSource(nameof(BadTensors))]
    public void BadTensorsNameTheProblem(string storageType, long elements, long offset, long[] shape, long[] strides, byte[] record, string expected) =>
        AssertRefused(Archive(Dump(storageType, elements, offset, shape, strides), ("data/0", record)), expected);

    [Test]
    public void AMissingStorageRecordIsNamed() =>
        AssertRefused(Archive(Dump("IntStorage", 6, 0, [2, 3], [3, 1])), "storage '0' has no data/0 record in the archive");

    [Test]
    public void LimitsAreHonoured()
    {
        var path = Archive(Dump("IntStorage", 6, 0, [2, 3], [3, 1]), ("data/0", Counts2x3));
        var e = Assert.Throws<InvalidDataException>(() => ExpertLoadFile.Read(path, new ExpertLoadReadOptions { Limits = new TorchArchiveLimits { MaxPickleBytes = 50 } }));
        Assert.That(e!.Message, Does.Contain("record data.pkl has").And.Contain("above the limit of 50"));
        e = Assert.Throws<InvalidDataException>(() => ExpertLoadFile.Read(path, new ExpertLoadReadOptions { Limits = new TorchArchiveLimits { MaxStorageBytes = 20 } }));
        Assert.That(e!.Message, Does.Contain("declares 6 int32 elements, above the limit of 20 bytes"));
        e = Assert.Throws<InvalidDataException>(() => ExpertLoadFile.Read(path, new ExpertLoadReadOptions { Limits = new TorchArchiveLimits { MaxTensorElements = 5 } }));
        Assert.That(e!.Message, Does.Contain("has 6 elements, above the limit of 5"));
    }

    [Test]
    public void ArchivesThatAreNotRecorderDumps()
    {
        var placement = Archive(Dump("LongStorage", 6, 0, [2, 3], [3, 1], key: PlacementFile.MapKey), ("data/0", new byte[48]));
        AssertRefused(placement, "the archive holds a placement (physical_to_logical_map), not an expert load");
        var other = Archive(Dump("IntStorage", 6, 0, [2, 3], [3, 1], key: "weights"), ("data/0", Counts2x3));
        AssertRefused(other, "the archive's dict has keys [weights]: an SGLang recorder dump has logical_count");
        var list = Archive(new PickleBuilder().Proto().Op(']').Op('.').Build());
        AssertRefused(list, "the archive holds a list, not an SGLang recorder dump");
        var notTensor = Archive(new PickleBuilder().Proto().Op('}').Op('(').Str("logical_count").Float(1.5).Op('u').Op('.').Build());
        AssertRefused(notTensor, "logical_count is a double, not a tensor");
    }

    [Test]
    public void PerPassDumpsWithBadMapsOrRecords()
    {
        byte[] PerPass(string mapType, long[] mapShape, long recordLayers) => new PickleBuilder().Proto().Op('}').Op('(')
            .Str("records").Op(']').Op('(').Op('}').Op('(').Str("global_physical_count")
            .Tensor("IntStorage", "1", recordLayers * 3, 0, [recordLayers, 3], [3, 1]).Op('u').Op('e')
            .Str("last_physical_to_logical_map").Tensor(mapType, "0", mapShape[0] * mapShape[1], 0, mapShape, [mapShape[1], 1])
            .Op('u').Op('.').Build();
        byte[] Longs(params long[] values) => values.SelectMany(v => BitConverter.GetBytes(v)).ToArray();

        var good = Archive(PerPass("LongStorage", [2, 3], 2), ("data/0", Longs(0, 1, 0, 1, 0, 1)), ("data/1", Int32s(5, 6, 7, 1, 2, 3)));
        Assert.That(ExpertLoadFile.Read(good).Load.Values.ToArray(), Is.EqualTo(new double[] { 12, 6, 2, 4 }));
        AssertRefused(Archive(PerPass("FloatStorage", [2, 3], 2), ("data/0", new byte[24]), ("data/1", Int32s(5, 6, 7, 1, 2, 3))),
            "expected an integer tensor, found float32");
        AssertRefused(Archive(PerPass("LongStorage", [2, 3], 2), ("data/0", Longs(0, 1, 2, 0, 0, 2)), ("data/1", Int32s(5, 6, 7, 1, 2, 3))),
            "last_physical_to_logical_map[1] has no slot for logical expert 1 of 0..2");
        AssertRefused(Archive(PerPass("LongStorage", [2, 3], 2), ("data/0", Longs(0, 1, 0, 1, 0, -1)), ("data/1", Int32s(5, 6, 7, 1, 2, 3))),
            "holds the id -1, outside [0, 3) slots");
        AssertRefused(Archive(PerPass("LongStorage", [2, 3], 2), ("data/0", Longs(0, 1, 0, 1, 0, 1L << 40)), ("data/1", Int32s(5, 6, 7, 1, 2, 3))),
            "holds the id 1099511627776, outside [0, 3) slots");
        AssertRefused(Archive(PerPass("LongStorage", [2, 3], 1), ("data/0", Longs(0, 1, 0, 1, 0, 1)), ("data/1", Int32s(5, 6, 7))),
            "records[0].global_physical_count is a tensor (int32, shape [1, 3]), expected a [2, 3] tensor");
    }
}

/// <summary>Assembles pickles opcode by opcode, to build archives torch would never write.</summary>
internal sealed class PickleBuilder
{
    private readonly MemoryStream _bytes = new();

    public PickleBuilder Op(char opcode) { _bytes.WriteByte((byte)opcode); return this; }

    public PickleBuilder Raw(params byte[] bytes) { _bytes.Write(bytes); return this; }

    public PickleBuilder Proto() => Raw(0x80, 2);

    public PickleBuilder Str(string value)
    {
        var utf8 = Encoding.UTF8.GetBytes(value);
        Op('X');
        Span<byte> length = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(length, utf8.Length);
        return Raw(length.ToArray()).Raw(utf8);
    }

    public PickleBuilder Int(long value)
    {
        if (value is >= int.MinValue and <= int.MaxValue)
        {
            Op('J');
            Span<byte> bytes = stackalloc byte[4];
            BinaryPrimitives.WriteInt32LittleEndian(bytes, (int)value);
            return Raw(bytes.ToArray());
        }
        Raw(0x8a, 8);
        Span<byte> wide = stackalloc byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(wide, value);
        return Raw(wide.ToArray());
    }

    public PickleBuilder Float(double value)
    {
        Op('G');
        Span<byte> bytes = stackalloc byte[8];
        BinaryPrimitives.WriteDoubleBigEndian(bytes, value);
        return Raw(bytes.ToArray());
    }

    public PickleBuilder Global(string module, string name) => Op('c').Raw(Encoding.ASCII.GetBytes($"{module}\n{name}\n"));

    public PickleBuilder Tuple(params long[] values)
    {
        Op('(');
        foreach (var v in values) Int(v);
        return Op('t');
    }

    /// <summary>A tensor as torch pickles it: _rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict()).</summary>
    public PickleBuilder Tensor(string storageType, string key, long elements, long offset, long[] shape, long[] strides, string location = "cpu")
    {
        Global("torch._utils", "_rebuild_tensor_v2").Op('(');
        Op('(').Str("storage").Global("torch", storageType).Str(key).Str(location).Int(elements).Op('t').Op('Q');
        Int(offset).Tuple(shape).Tuple(strides).Raw(0x89).Global("collections", "OrderedDict").Op(')').Op('R');
        return Op('t').Op('R');
    }

    public byte[] Build() => _bytes.ToArray();
}
