// eplb bindings generator: reads native/include/eplb/eplb.h through libclang and writes the
// [LibraryImport] layer (bindings/generated/*.g.cs) and the C layout asserts (eplb_abi_layout.g.h).
//
//   dotnet run --project bindings/generator                 # regenerate
//   dotnet run --project bindings/generator -- --verify     # exit 1 when the committed files differ
//
// Options: --repo DIR (default: found from the working directory), --header FILE,
// --include DIR, --out DIR.
namespace Eplb.Bindings.Generator;

public static class Program
{
    public static int Main(string[] args)
    {
        try
        {
            return Run(args, Console.Out, Console.Error);
        }
        catch (Exception e) when (e is InvalidOperationException or DllNotFoundException or IOException or ArgumentException)
        {
            Console.Error.WriteLine($"eplb-bindgen: {e.Message}");
            return 2;
        }
    }

    /// <summary>Runs the generator; returns the process exit code (0 ok, 1 verify found drift, 2 error).</summary>
    public static int Run(string[] args, TextWriter output, TextWriter error)
    {
        string? repo = null, header = null, include = null, outDir = null;
        var verify = false;
        for (var i = 0; i < args.Length; i++)
        {
            string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
            switch (args[i])
            {
                case "--verify": verify = true; break;
                case "--repo": repo = Next(); break;
                case "--header": header = Next(); break;
                case "--include": include = Next(); break;
                case "--out": outDir = Next(); break;
                default: throw new ArgumentException($"unknown argument '{args[i]}'");
            }
        }
        repo ??= FindRepo(Directory.GetCurrentDirectory())
                 ?? FindRepo(AppContext.BaseDirectory)
                 ?? throw new ArgumentException("cannot find the repository root (Eplb.sln); pass --repo");
        include ??= Path.Combine(repo, "native", "include");
        header ??= Path.Combine(include, "eplb", "eplb.h");
        outDir ??= Path.Combine(repo, "bindings", "generated");
        var shim = Path.Combine(repo, "bindings", "shim");

        var models = new HeaderParser(include, shim).Parse(header);
        var files = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var model in models) files[CSharpEmitter.FileNameFor(model)] = CSharpEmitter.Emit(model);
        files[CLayoutEmitter.FileName] = CLayoutEmitter.Emit(models);

        if (verify) return Verify(files, outDir, output, error);
        Directory.CreateDirectory(outDir);
        foreach (var stale in StaleFiles(files, outDir))
        {
            File.Delete(Path.Combine(outDir, stale));
            output.WriteLine($"removed {stale}");
        }
        foreach (var (name, text) in files)
        {
            var path = Path.Combine(outDir, name);
            if (File.Exists(path) && File.ReadAllText(path) == text) continue;
            File.WriteAllText(path, text);
            output.WriteLine($"wrote {Path.GetRelativePath(repo, path)}");
        }
        output.WriteLine($"bindings: {models.Sum(m => m.Functions.Count)} functions, {models.Sum(m => m.Structs.Count)} structs, " +
                         $"{models.Sum(m => m.Enums.Count)} enums, {models.Sum(m => m.Opaques.Count)} handles from {models.Count} headers");
        return 0;
    }

    private static int Verify(SortedDictionary<string, string> files, string outDir, TextWriter output, TextWriter error)
    {
        var problems = new List<string>();
        foreach (var (name, text) in files)
        {
            var path = Path.Combine(outDir, name);
            if (!File.Exists(path))
            {
                problems.Add($"{name}: missing");
                continue;
            }
            var committed = File.ReadAllText(path);
            if (committed != text) problems.Add($"{name}: differs ({FirstDifference(committed, text)})");
        }
        problems.AddRange(StaleFiles(files, outDir).Select(s => $"{s}: no header produces it any more"));
        if (problems.Count == 0)
        {
            output.WriteLine($"bindings up to date ({files.Count} files)");
            return 0;
        }
        error.WriteLine("bindings are out of date with the headers; run ./build.sh bindings:");
        foreach (var problem in problems) error.WriteLine($"  {problem}");
        return 1;
    }

    private static IEnumerable<string> StaleFiles(SortedDictionary<string, string> files, string outDir) =>
        Directory.Exists(outDir)
            ? Directory.GetFiles(outDir).Select(Path.GetFileName).OfType<string>()
                .Where(n => (n.EndsWith(".g.cs") || n.EndsWith(".g.h")) && !files.ContainsKey(n)).Order()
            : [];

    private static string FirstDifference(string committed, string generated)
    {
        var a = committed.Split('\n');
        var b = generated.Split('\n');
        for (var i = 0; i < Math.Max(a.Length, b.Length); i++)
        {
            var left = i < a.Length ? a[i] : "<end of file>";
            var right = i < b.Length ? b[i] : "<end of file>";
            if (left != right) return $"line {i + 1}: committed '{left.Trim()}', header gives '{right.Trim()}'";
        }
        return "whitespace";
    }

    private static string? FindRepo(string start)
    {
        for (var dir = new DirectoryInfo(start); dir != null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Eplb.sln"))) return dir.FullName;
        return null;
    }
}
