using NUnit.Framework;

namespace Eplb.Tests;

/// <summary><c>eplb info</c> and the loader's messages, as a user meets them.</summary>
public class CliInfoTests
{
    [Test]
    public void InfoPrintsBackendLibraryAndDevice()
    {
        var result = CliRunner.Run("info");
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        Assert.That(result.Stdout, Does.Contain("backend").And.Contain("libeplb " + EplbRuntime.Info.LibraryVersion).And.Contain("libeplb.so"));
        Assert.That(result.Stdout, Does.Match(EplbRuntime.Info.CudaCompiled ? @"cuda compiled\s+yes" : @"cuda compiled\s+no"));
    }

    [Test]
    public void InfoJsonIsMachineReadable()
    {
        var result = CliRunner.Run("info", "--json");
        Assert.That(result.ExitCode, Is.Zero, result.Stderr);
        using var json = System.Text.Json.JsonDocument.Parse(result.Stdout);
        Assert.That(json.RootElement.GetProperty("info").GetProperty("AbiVersion").GetUInt32(), Is.EqualTo(EplbRuntime.Info.AbiVersion));
    }

    [Test]
    public void MissingNativeLibraryGivesAnActionableLine()
    {
        var result = CliRunner.Run(new Dictionary<string, string?> { ["EPLB_NATIVE_PATH"] = "/nonexistent/libeplb.so" }, "info");
        Assert.That(result.ExitCode, Is.EqualTo(2));
        Assert.That(result.Stderr, Does.StartWith("eplb: EPLB_NATIVE_PATH points at '/nonexistent/libeplb.so'").And.Contain("./build.sh"));
        Assert.That(result.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1));
    }

    [Test]
    public void BadBackendVariableIsOneLineAndExitTwo()
    {
        var result = CliRunner.Run(new Dictionary<string, string?> { ["EPLB_BACKEND"] = "tpu" }, "info");
        Assert.That(result.ExitCode, Is.EqualTo(2));
        Assert.That(result.Stderr.Trim(), Is.EqualTo("eplb: unknown backend 'tpu': use auto, cpu or cuda"));
    }

    [Test]
    public void UnknownCommandIsExitTwo()
    {
        var result = CliRunner.Run("frobnicate");
        Assert.That(result.ExitCode, Is.EqualTo(2));
        Assert.That(result.Stderr, Does.StartWith("eplb: "));
    }
}

/// <summary>Issue 13 §5: where libeplb is loaded from.</summary>
public class NativeLibrarySearchTests
{
    [Test]
    public void ALibraryPlantedAboveAnInstalledAppIsNeverLoaded()
    {
        // An installed app (every file of the build but libeplb.so) under a folder that looks like a
        // checkout: Eplb.sln and build/native/lib/libeplb.so, the real library, one level up.
        var root = Directory.CreateTempSubdirectory("eplb-planted-").FullName;
        try
        {
            var app = Directory.CreateDirectory(Path.Combine(root, "app")).FullName;
            foreach (var entry in Directory.GetFileSystemEntries(AppContext.BaseDirectory))
            {
                var name = Path.GetFileName(entry);
                if (name == "libeplb.so") continue;
                // Copies (a link would make the runtime see the build folder, which holds libeplb.so).
                if (Directory.Exists(entry)) Directory.CreateSymbolicLink(Path.Combine(app, name), entry);
                else File.Copy(entry, Path.Combine(app, name));
            }
            File.WriteAllText(Path.Combine(root, "Eplb.sln"), "");
            var planted = Directory.CreateDirectory(Path.Combine(root, "build", "native", "lib")).FullName;
            File.Copy(Path.Combine(AppContext.BaseDirectory, "libeplb.so"), Path.Combine(planted, "libeplb.so"));

            var result = Run(app, null);
            Assert.That(result.ExitCode, Is.EqualTo(2), result.Stdout + result.Stderr);
            Assert.That(result.Stderr, Does.StartWith("eplb: libeplb.so was not found next to the application"));
            Assert.That(result.Stderr, Does.Not.Contain(Path.Combine(root, "build")), "the folder above the app was not even tried");

            // EPLB_NATIVE_PATH still loads it, deliberately (a folder works, as documented).
            var chosen = Run(app, planted);
            Assert.That(chosen.ExitCode, Is.Zero, chosen.Stderr);
            Assert.That(chosen.Stdout, Does.Contain(Path.Combine(planted, "libeplb.so")));
        }
        finally
        {
            Directory.Delete(root, recursive: true);
        }
    }

    private static CliRunner.Result Run(string app, string? nativePath)
    {
        var start = new System.Diagnostics.ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = app,
        };
        start.ArgumentList.Add(Path.Combine(app, "Eplb.Cli.dll"));
        start.ArgumentList.Add("info");
        start.Environment["EPLB_NATIVE_PATH"] = nativePath;
        using var process = System.Diagnostics.Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEnd();
        process.WaitForExit();
        return new CliRunner.Result(process.ExitCode, stdout.Result, stderr);
    }
}
