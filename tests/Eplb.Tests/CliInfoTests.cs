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
