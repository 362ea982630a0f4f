using System.Diagnostics;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// `eplb simulate` outside the checkout (issue 15 §5): published to a temporary folder (its own
/// artifacts path, so the checkout's outputs stay as they are), run from another folder with no
/// argument naming a load: the loads ship inside the tool, and only linux-x64 natives ship with it.
/// </summary>
public class SimulationPublishTests
{
    private static (int ExitCode, string Stdout, string Stderr) Start(string file, string workingDirectory, params string[] args)
    {
        var start = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = workingDirectory,
        };
        foreach (var arg in args) start.ArgumentList.Add(arg);
        start.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        start.Environment["DOTNET_NOLOGO"] = "1";
        start.Environment.Remove("EPLB_NATIVE_PATH");
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, stdout.Result, stderr);
    }

    [Test]
    public void APublishedEplbSimulatesFromAnyFolder()
    {
        var repo = TestSupport.RepoRoot;
        var native = Environment.GetEnvironmentVariable("EPLB_NATIVE_BUILD_DIR") is { Length: > 0 } dir ? dir : Path.Combine(repo, "build", "native");
        if (!File.Exists(Path.Combine(native, "lib", "libeplb.so"))) Assert.Ignore($"no native build in {native} (run ./build.sh)");
        var scratch = Directory.CreateTempSubdirectory("eplb-publish-");
        try
        {
            var output = Path.Combine(scratch.FullName, "eplb");
            var publish = Start(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet", repo, "publish",
                Path.Combine(repo, "managed", "Eplb.Cli", "Eplb.Cli.csproj"), "-c", "Release", "-o", output,
                "--artifacts-path", Path.Combine(scratch.FullName, "artifacts"), $"-p:EplbNativeBuildDir={native}", "-nologo", "-v", "q");
            Assert.That(publish.ExitCode, Is.Zero, publish.Stdout + publish.Stderr);
            Assert.That(File.Exists(Path.Combine(output, "libeplb.so")), Is.True);
            // Only the published runtime's natives (ScottPlot's SkiaSharp brings 15 platforms' otherwise).
            Assert.That(Directory.Exists(Path.Combine(output, "runtimes")), Is.False, "no runtimes/<rid> folders");
            var bytes = Directory.EnumerateFiles(output, "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length);
            Assert.That(bytes, Is.LessThan(40L << 20), $"{bytes >> 20} MiB published");

            var elsewhere = Directory.CreateDirectory(Path.Combine(scratch.FullName, "elsewhere")).FullName;
            var run = Start(Path.Combine(output, "eplb"), elsewhere, "simulate", "--ranks", "8", "--nodes", "2", "--decode-passes", "3",
                "--prefill-passes", "1", "--tokens", "8", "--prefill-tokens", "16", "--backend", "cpu");
            Assert.That(run.ExitCode, Is.Zero, run.Stderr);
            Assert.That(run.Stdout, Does.Contain("decode_in1000out1000").And.Contain("prefill_in4096").And.Contain("no EPLB"));
        }
        finally
        {
            scratch.Delete(recursive: true);
        }
    }
}
