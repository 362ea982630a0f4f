using System.Diagnostics;
using System.IO.Compression;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The Eplb NuGet package as a host application meets it: packed fresh, restored by the sample app
/// (samples/Eplb.Sample: its appsettings.json, AddEplb's runtime, a model over ranks that EplbState
/// rearranges), built and run from another folder.
/// </summary>
public class PackagingTests
{
    private static string Configuration =>
        AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";

    private static (int ExitCode, string Output) Dotnet(string workingDirectory, params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = workingDirectory,
        };
        foreach (var arg in args) start.ArgumentList.Add(arg);
        start.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        start.Environment["DOTNET_NOLOGO"] = "1";
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, stdout.Result + stderr);
    }

    [Test]
    public void SampleAppRunsAgainstTheFreshlyPackedPackage()
    {
        var repo = TestSupport.RepoRoot;
        var native = Environment.GetEnvironmentVariable("EPLB_NATIVE_BUILD_DIR") is { Length: > 0 } dir ? dir : Path.Combine(repo, "build", "native");
        if (!File.Exists(Path.Combine(native, "lib", "libeplb.so"))) Assert.Ignore($"no native build in {native} (run ./build.sh)");
        // A version of its own, so the restore cannot pick up an older package from the cache.
        var version = $"{File.ReadAllText(Path.Combine(repo, "VERSION")).Trim()}-test.{DateTime.UtcNow:yyyyMMddHHmmssfff}";
        var scratch = Directory.CreateTempSubdirectory("eplb-pack-");
        var cached = Path.Combine(Environment.GetEnvironmentVariable("NUGET_PACKAGES") ??
                                  Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages"), "eplb", version);
        try
        {
            var feed = Path.Combine(scratch.FullName, "feed");
            var (code, output) = Dotnet(repo, "pack", Path.Combine(repo, "managed", "Eplb", "Eplb.csproj"), "-c", Configuration, "--no-build",
                "-o", feed, $"-p:Version={version}", $"-p:EplbNativeBuildDir={native}");
            Assert.That(code, Is.Zero, output);
            var package = Path.Combine(feed, $"Eplb.{version}.nupkg");
            using (var zip = ZipFile.OpenRead(package))
            {
                var entries = zip.Entries.Select(e => e.FullName).ToList();
                Assert.That(entries, Does.Contain("runtimes/linux-x64/native/libeplb.so"));
                Assert.That(entries, Does.Contain("lib/net10.0/Eplb.dll"));
                Assert.That(entries, Does.Contain("lib/net10.0/Eplb.xml"), "XML docs ship with the package");
                using var nuspec = new StreamReader(zip.GetEntry("Eplb.nuspec")!.Open());
                Assert.That(nuspec.ReadToEnd(), Does.Not.Contain("TorchSharp").IgnoreCase, "the TorchSharp adapter is a package of its own");
            }

            // The sample, copied out of the tree so its restore and build leave the checkout alone.
            var app = Path.Combine(scratch.FullName, "sample");
            Directory.CreateDirectory(app);
            // Its nuget.config (the checkout's artifacts/packages) stays behind: the fresh feed is passed instead.
            foreach (var file in Directory.GetFiles(Path.Combine(repo, "samples", "Eplb.Sample")).Where(f => Path.GetFileName(f) != "nuget.config"))
                File.Copy(file, Path.Combine(app, Path.GetFileName(file)));
            (code, output) = Dotnet(app, "build", "-c", "Release", "-o", Path.Combine(app, "out"), $"-p:EplbPackageVersion={version}",
                $"-p:RestoreAdditionalProjectSources={feed}", "-p:TreatWarningsAsErrors=false");
            Assert.That(code, Is.Zero, output);
            Assert.That(File.Exists(Path.Combine(app, "out", "runtimes", "linux-x64", "native", "libeplb.so")), Is.True,
                "the native library comes from the package's runtimes folder");

            // Run from another folder: the sample reads the appsettings.json beside it, not the current directory's.
            (code, output) = Dotnet(scratch.FullName, Path.Combine(app, "out", "Eplb.Sample.dll"));
            Assert.That(code, Is.Zero, output);
            Assert.That(output, Does.Contain("policy=locality").And.Contain("failed=0").And.Contain("weights follow placement=yes"));
            Assert.That(output, Does.Match(@"metrics: .*eplb\.rearrangements\{completed\}=[1-9]"), "the sample reads EPLB's meter");
            var completed = System.Text.RegularExpressions.Regex.Match(output, @"rearrangements completed=(\d+)");
            Assert.That(completed.Success && int.Parse(completed.Groups[1].Value) > 0, Is.True, output);
            var balancedness = System.Text.RegularExpressions.Regex.Match(output, @"balancedness ([0-9.]+) -> ([0-9.]+)");
            Assert.That(balancedness.Success, Is.True, output);
            Assert.That(double.Parse(balancedness.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture),
                Is.GreaterThan(double.Parse(balancedness.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)), output);
        }
        finally
        {
            scratch.Delete(recursive: true);
            if (Directory.Exists(cached)) Directory.Delete(cached, recursive: true);
        }
    }
}
