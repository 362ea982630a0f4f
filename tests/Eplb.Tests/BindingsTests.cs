using System.Diagnostics;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The committed bindings equal what the header produces (bindings/generator --verify).</summary>
public class BindingsTests
{
    private static string GeneratorDll => Path.Combine(AppContext.BaseDirectory, "Eplb.Bindings.Generator.dll");

    private static (int ExitCode, string Output) RunGenerator(params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        start.ArgumentList.Add(GeneratorDll);
        foreach (var arg in args) start.ArgumentList.Add(arg);
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEnd();
        process.WaitForExit();
        var output = stdout.Result + stderr;
        if (output.Contains("libclang was not found")) Assert.Ignore("libclang-14 is not installed (apt-get install libclang1-14)");
        return (process.ExitCode, output);
    }

    [Test]
    public void CommittedBindingsMatchTheHeader()
    {
        var (code, output) = RunGenerator("--verify", "--repo", TestSupport.RepoRoot);
        Assert.That(code, Is.Zero, output);
        Assert.That(output, Does.Contain("up to date"));
    }

    [Test]
    public void VerifyFailsWhenTheHeaderChangesWithoutRegeneration()
    {
        var scratch = Directory.CreateTempSubdirectory("eplb-bindgen-");
        try
        {
            var include = Path.Combine(scratch.FullName, "include");
            CopyDirectory(Path.Combine(TestSupport.RepoRoot, "native", "include"), include);
            var mapping = Path.Combine(include, "eplb", "eplb_mapping.h");
            var text = File.ReadAllText(mapping).Replace("#ifdef __cplusplus\n}\n#endif",
                "/* A new export nobody regenerated. */\nEPLB_API eplb_status_t eplb_new_function(int32_t value);\n\n#ifdef __cplusplus\n}\n#endif");
            Assert.That(text, Does.Contain("eplb_new_function"));
            File.WriteAllText(mapping, text);
            var (code, output) = RunGenerator("--verify", "--repo", TestSupport.RepoRoot, "--include", include);
            Assert.That(code, Is.EqualTo(1), output);
            Assert.That(output, Does.Contain("eplb_mapping.g.cs").And.Contain("out of date"));

            // A changed struct layout is caught too.
            File.WriteAllText(mapping, File.ReadAllText(mapping).Replace("    int32_t replica_selection;", "    int64_t replica_selection;"));
            (code, output) = RunGenerator("--verify", "--repo", TestSupport.RepoRoot, "--include", include);
            Assert.That(code, Is.EqualTo(1), output);
            Assert.That(output, Does.Contain("eplb_abi_layout.g.h"));
        }
        finally
        {
            scratch.Delete(recursive: true);
        }
    }

    private static void CopyDirectory(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var file in Directory.GetFiles(from)) File.Copy(file, Path.Combine(to, Path.GetFileName(file)));
        foreach (var dir in Directory.GetDirectories(from)) CopyDirectory(dir, Path.Combine(to, Path.GetFileName(dir)));
    }
}
