using System.Diagnostics;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// Issue 13 §4: hostile invocations of <c>eplb plan</c> and <c>eplb simulate</c> end in exit code 2 and
/// one line on stderr, write nothing, never replace a device, FIFO or link, fail on a full device,
/// and refuse runs that would not fit in memory before allocating.
/// </summary>
public class CliHostileTests
{
    private string _dir = "";

    [SetUp]
    public void CreateFolder() => _dir = Directory.CreateTempSubdirectory("eplb-hostile-").FullName;

    [TearDown]
    public void DeleteFolder() => Directory.Delete(_dir, recursive: true);

    private static string Dump => Path.Combine(TestSupport.LoadDataDir, "prefill_in512.json");

    /// <summary><c>eplb plan</c> of the real dump onto 288 slots, 32 ranks, 4 nodes; <paramref name="more"/> replaces or adds options.</summary>
    private static string[] Plan(string output, params string[] more)
    {
        var options = new List<(string Name, string? Value)>
        {
            ("--load", Dump), ("--slots", "288"), ("--groups", "8"), ("--nodes", "4"), ("--ranks", "32"), ("--out", output),
        };
        for (var i = 0; i < more.Length; i += 2)
        {
            var at = options.FindIndex(o => o.Name == more[i]);
            if (at >= 0) options[at] = (more[i], more[i + 1]);
            else options.Add((more[i], more[i + 1]));
        }
        return ["plan", .. options.SelectMany(o => new[] { o.Name, o.Value! })];
    }

    private string[] Files() => Directory.GetFileSystemEntries(_dir).Select(Path.GetFileName).Order().ToArray()!;

    /// <summary>Exit 2, one line starting "eplb: " holding <paramref name="expected"/>, no stack trace, no parameter name.</summary>
    private static void AssertOneLine(CliRunner.Result result, string expected)
    {
        Assert.That(result.ExitCode, Is.EqualTo(2), result.Stdout + result.Stderr);
        var lines = result.Stderr.TrimEnd().Split('\n');
        Assert.That(lines, Has.Length.EqualTo(1), result.Stderr);
        Assert.That(lines[0], Does.StartWith("eplb: ").And.Contain(expected));
        Assert.That(lines[0], Does.Not.Contain("(Parameter '").And.Not.Contain(" at Eplb."));
    }

    public static IEnumerable<TestCaseData> HostilePlans()
    {
        yield return new TestCaseData(new[] { "--max-replicas", "2147483647" }, "--max-replicas 2147483647 exceeds --slots 288").SetName("MaxReplicasHuge");
        yield return new TestCaseData(new[] { "--slots", "100000000" }, "needs about").SetName("SlotsHundredMillion");
        yield return new TestCaseData(new[] { "--slots", "2147483647", "--ranks", "1", "--nodes", "1" }, "needs about").SetName("SlotsIntMax");
        yield return new TestCaseData(new[] { "--expert-bytes", "9223372036854775807" }, "--expert-bytes 9223372036854775807 is too large").SetName("ExpertBytesOverflow");
        yield return new TestCaseData(new[] { "--model-layers", "2147483647" }, "--model-layers 2147483647 needs about").SetName("ModelLayersHuge");
        yield return new TestCaseData(new[] { "--policy", "foo" }, "unknown placement policy 'foo'").SetName("UnknownPolicyNamesNoParameter");
        yield return new TestCaseData(new[] { "--load", "/dev/zero" }, "'/dev/zero' is a character device, not a regular file").SetName("LoadDevZero");
        yield return new TestCaseData(new[] { "--load", "/proc/self/mem" }, "'/proc/self/mem'").SetName("LoadProcSelfMem");
        yield return new TestCaseData(new[] { "--old", "/dev/zero" }, "--old '/dev/zero' is a character device").SetName("OldDevZero");
        yield return new TestCaseData(new[] { "--load", "/tmp" }, "'/tmp' is a directory").SetName("LoadDirectory");
    }

    [TestCaseSource(nameof(HostilePlans))]
    public void AHostilePlanIsOneLineExitTwoAndWritesNothing(string[] options, string expected)
    {
        var result = CliRunner.Run(Plan(Path.Combine(_dir, "o.json"), options));
        AssertOneLine(result, expected);
        Assert.That(Files(), Is.Empty, "nothing written, no temporary file left");
    }

    [Test]
    public void TheMemoryLimitIsTheProcesssAndTheHelpSaysSo()
    {
        // A 1 GiB heap: R = 2,000,000 needs tens of GiB for 61 layers, so it is refused before any allocation.
        var env = new Dictionary<string, string?> { ["DOTNET_GCHeapHardLimit"] = "0x40000000" };
        var result = CliRunner.Run(env, Plan(Path.Combine(_dir, "o.json"), "--slots", "2000000", "--ranks", "1", "--nodes", "1", "--max-replicas", "8000"));
        AssertOneLine(result, "more than the limit of 768.0 MiB, three quarters of the 1.0 GiB available to the process");
        Assert.That(Files(), Is.Empty);
        var help = CliRunner.Run("plan", "--help");
        Assert.That(help.ExitCode, Is.Zero);
        Assert.That(Eplb.Cli.Program.OneLine(help.Stdout), Does.Contain("Memory: a run is refused before it starts").And.Contain("three quarters of the")
            .And.Contain("32 x model layers x (R + N x Kmax + N) bytes"));
    }

    [Test]
    public void AnOutputThatIsADirectoryIsRefused()
    {
        var folder = Directory.CreateDirectory(Path.Combine(_dir, "d")).FullName;
        AssertOneLine(CliRunner.Run(Plan(folder)), "is a directory, not a file");
        AssertOneLine(CliRunner.Run(Plan(folder + "/")), "names a directory");
        Assert.That(Files(), Is.EqualTo(new[] { "d" }));
        Assert.That(Directory.GetFileSystemEntries(folder), Is.Empty);
    }

    [Test]
    public void StaleTemporaryFilesDoNotStopARunAndAreLeftAlone()
    {
        var output = Path.Combine(_dir, "o.json");
        // What an earlier, killed run could have left: the old <out>.<pid>.tmp names and the new hidden ones.
        string[] stale = ["o.json.1234.tmp", ".o.json.0123456789ab.tmp", "o.json.report.json.1234.tmp"];
        foreach (var name in stale) File.WriteAllText(Path.Combine(_dir, name), "stale");
        var result = CliRunner.Run(Plan(output));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(Files(), Is.EqualTo(stale.Concat(["o.json", "o.json.report.json"]).Order()));
        Assert.That(stale.Select(name => File.ReadAllText(Path.Combine(_dir, name))), Is.All.EqualTo("stale"));
    }

    [Test]
    public void TheSameFileTwiceIsRefused()
    {
        var output = Path.Combine(_dir, "o.json");
        AssertOneLine(CliRunner.Run(Plan(output, "--report", output)), "--report and --out name the same file");
        Assert.That(Files(), Is.Empty);
    }

    [Test]
    public void ACharacterDeviceIsWrittenThroughNeverReplaced()
    {
        var before = FileKind("/dev/null");
        var result = CliRunner.Run(Plan("/dev/null"));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(result.Stdout, Does.Contain("no report (--out is not a regular file"));
        Assert.That(FileKind("/dev/null"), Is.EqualTo(before).And.StartsWith("character special"));
        // A report can still be asked for, beside the device.
        var report = Path.Combine(_dir, "r.json");
        Assert.That(CliRunner.Run(Plan("/dev/null", "--report", report)).ExitCode, Is.Zero);
        Assert.That(File.ReadAllText(report), Does.Contain("\"policy\":\"deepseek\""));
    }

    [Test]
    public void AFullDeviceFailsTheCommandAndLeavesNothing()
    {
        var report = Path.Combine(_dir, "r.json");
        AssertOneLine(CliRunner.Run(Plan("/dev/full", "--report", report)), "--out '/dev/full': No space left on device");
        Assert.That(Files(), Is.Empty, "the report is not moved in when the placement cannot be written");
    }

    [Test]
    public void AFifoIsWrittenThroughNeverReplaced()
    {
        var fifo = Path.Combine(_dir, "pipe");
        using (var mkfifo = Process.Start("mkfifo", fifo)) mkfifo.WaitForExit();
        var reader = Task.Run(() => File.ReadAllText(fifo));
        var result = CliRunner.Run(Plan(fifo));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(reader.Wait(TimeSpan.FromSeconds(30)), Is.True);
        Assert.That(reader.Result, Does.StartWith("{\"physical_to_logical_map\":[["));
        Assert.That(FileKind(fifo), Does.StartWith("fifo"));
        Assert.That(Files(), Is.EqualTo(new[] { "pipe" }), "no report beside a FIFO unless asked");
    }

    [Test]
    public void ASymlinksTargetIsWrittenAndTheLinkKept()
    {
        var target = Path.Combine(_dir, "target.json");
        File.WriteAllText(target, "old");
        var link = Path.Combine(_dir, "link.json");
        File.CreateSymbolicLink(link, "target.json");
        var result = CliRunner.Run(Plan(link));
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(new FileInfo(link).LinkTarget, Is.EqualTo("target.json"), "the link stays a link");
        Assert.That(File.ReadAllText(target), Does.StartWith("{\"physical_to_logical_map\":[["));
        Assert.That(Files(), Is.EqualTo(new[] { "link.json", "link.json.report.json", "target.json" }));
    }

    [Test]
    public void AWriteThatFailsLeavesNoFileAndNamesTheOption()
    {
        // A disk that fills up while writing: the writer throws as FileStream does on ENOSPC.
        var output = Path.Combine(_dir, "o.json");
        var report = Path.Combine(_dir, "r.json");
        using (var files = Eplb.Cli.OutputFiles.Prepare(("--out", output), ("--report", report)))
        {
            Assert.That(Directory.GetFiles(_dir), Has.Length.EqualTo(2), "the temporary files are reserved before the work");
            files.Write(report, stream => stream.WriteByte(1));
            var error = Assert.Throws<IOException>(() => files.Write(output, _ => throw new IOException("No space left on device : '/x'")))!;
            Assert.That(error.Message, Is.EqualTo($"--out '{output}': No space left on device"));
        }
        Assert.That(Files(), Is.Empty, "disposing without Commit deletes every temporary file");
    }

    [Test]
    public void SimulateChecksEveryOutputBeforeTheWork()
    {
        var json = Path.Combine(_dir, "ok.json");
        var clock = Stopwatch.StartNew();
        AssertOneLine(CliRunner.Run("simulate", "--json", json, "--plot", Path.Combine(_dir, "no", "such", "x.png")), "--plot");
        Assert.That(Files(), Is.Empty, "ok.json is not left behind");
        AssertOneLine(CliRunner.Run("simulate", "--json", _dir), "is a directory");
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(60)), "refused before simulating");
    }

    [Test]
    public void SimulateFailsOnAFullDeviceAndOnImpossibleRanks()
    {
        string[] small = ["--decode-passes", "2", "--prefill-passes", "1", "--tokens", "16", "--prefill-tokens", "32", "--ranks", "8", "--nodes", "1", "--slots", "264",
            "--policy", "deepseek", "--load", Dump];
        var plot = Path.Combine(_dir, "p.png");
        AssertOneLine(CliRunner.Run(["simulate", .. small, "--json", "/dev/full", "--plot", plot]), "--json '/dev/full': No space left on device");
        Assert.That(Files(), Is.Empty, "the plot is not moved in when the JSON cannot be written");
        AssertOneLine(CliRunner.Run("simulate", "--gpus", "1000000", "--load", Dump), "--ranks 1000000");
    }

    // `stat -c %F`: "character special file", "fifo", "regular file", ...
    private static string FileKind(string path)
    {
        var start = new ProcessStartInfo("stat", ["-c", "%F", path]) { RedirectStandardOutput = true };
        using var stat = Process.Start(start)!;
        var kind = stat.StandardOutput.ReadToEnd().Trim();
        stat.WaitForExit();
        return kind;
    }
}
