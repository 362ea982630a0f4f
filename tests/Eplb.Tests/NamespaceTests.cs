using System.Text.RegularExpressions;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The house rules of managed/ (docs/ARCHITECTURE.md, "Layout"): every file's namespace is its
/// folder's, the namespaces use each other only as the layer table there allows, and the namespace
/// graph has no cycle. The checker is tried on small made-up trees first, so a pass means something.
/// </summary>
public class NamespaceTests
{
    private static readonly Dictionary<string, string> NoExceptions = [];

    [Test]
    public void TheCheckerSeesAFileOutsideItsFolder()
    {
        var files = new[]
        {
            new SourceFile("Eplb/Kernels/Router.cs", "namespace Eplb.Kernels;\nclass Router { }"),
            new SourceFile("Eplb/Kernels/EplbLayerState.cs", "using Eplb.Runtime;\n\nnamespace Eplb;\nclass EplbLayerState { }"),
            new SourceFile("Eplb.Cli/Program.cs", "namespace Eplb.Cli\n{\n    class Program { }\n}"),
        };
        Assert.That(NamespaceLayout.FolderMismatches(files, NoExceptions),
            Is.EqualTo(new[] { "Eplb/Kernels/EplbLayerState.cs: namespace Eplb, but its folder is Eplb.Kernels" }));
        var allowed = new Dictionary<string, string> { ["Eplb/Kernels/EplbLayerState.cs"] = "Eplb" };
        Assert.That(NamespaceLayout.FolderMismatches(files, allowed), Is.Empty);
    }

    [Test]
    public void TheCheckerSeesATypeNamedLikeItsNamespace()
    {
        var files = new[]
        {
            new SourceFile("Eplb/Placement/Placement.cs", "namespace Eplb.Placement;\npublic sealed class Placement { void F<T>() where T : class { } }"),
            new SourceFile("Eplb/Placement/ExpertPlacement.cs", "namespace Eplb.Placement;\npublic readonly record struct ExpertPlacement;"),
        };
        Assert.That(NamespaceLayout.TypesNamedLikeTheirNamespace(files),
            Is.EqualTo(new[] { "Eplb/Placement/Placement.cs: type Placement in namespace Eplb.Placement" }));
    }

    [Test]
    public void TheCheckerFindsCyclesOfAnyLength()
    {
        var files = new[]
        {
            new SourceFile("Eplb/A/X.cs", "using Eplb.B;\nnamespace Eplb.A;"),
            new SourceFile("Eplb/B/X.cs", "namespace Eplb.B;\nclass X { void F() => Eplb.C.Y.G(); }"),
            // A relative name inside namespace Eplb: C.Z means Eplb.C.Z.
            new SourceFile("Eplb/C/X.cs", "namespace Eplb.C;\n/// <see cref=\"A.Q\"/>\nclass Y { }"),
            new SourceFile("Eplb/D/X.cs", "namespace Eplb.D;\n// A.Q in a comment and \"B.Q\" in a string are not uses.\nclass W { string s = \"B.Q\"; }"),
        };
        var graph = NamespaceLayout.Dependencies(files);
        Assert.That(graph["Eplb.A"], Is.EquivalentTo(new[] { "Eplb.B" }));
        Assert.That(graph["Eplb.B"], Is.EquivalentTo(new[] { "Eplb.C" }));
        Assert.That(graph["Eplb.C"], Is.EquivalentTo(new[] { "Eplb.A" }));
        Assert.That(graph["Eplb.D"], Is.Empty);
        Assert.That(NamespaceLayout.Cycles(graph), Is.EqualTo(new[] { "Eplb.A -> Eplb.B -> Eplb.C -> Eplb.A" }));

        var twoCycle = NamespaceLayout.Dependencies([
            new SourceFile("Eplb/Balancing/X.cs", "using Eplb.Migration;\nnamespace Eplb.Balancing;"),
            new SourceFile("Eplb/Migration/X.cs", "namespace Eplb.Migration;\ninterface I { Balancing.K Kind { get; } }"),
        ]);
        Assert.That(NamespaceLayout.Cycles(twoCycle), Is.EqualTo(new[] { "Eplb.Balancing -> Eplb.Migration -> Eplb.Balancing" }));
    }

    [Test]
    public void TheCheckerReportsUsesTheLayerTableDoesNotAllow()
    {
        var graph = NamespaceLayout.Dependencies([
            new SourceFile("Eplb/Placement/X.cs", "using Eplb.Runtime;\nnamespace Eplb.Placement;"),
            new SourceFile("Eplb/Runtime/X.cs", "namespace Eplb.Runtime;"),
            new SourceFile("Eplb/Extra/X.cs", "namespace Eplb.Extra;"),
        ]);
        var table = new Dictionary<string, IReadOnlySet<string>>
        {
            ["Eplb.Placement"] = new HashSet<string>(),
            ["Eplb.Runtime"] = new HashSet<string>(),
        };
        Assert.That(NamespaceLayout.Disallowed(graph, table), Is.EqualTo(new[]
        {
            "Eplb.Extra is not in the layer table of docs/ARCHITECTURE.md",
            "Eplb.Placement uses Eplb.Runtime, which the layer table does not allow",
        }));
    }

    [Test]
    public void ManagedFollowsTheLayout()
    {
        var files = NamespaceLayout.Read(Path.Combine(TestSupport.RepoRoot, "managed"));
        Assert.That(files, Has.Count.GreaterThan(40));
        // By .NET convention AddX extensions live in the namespace of IServiceCollection.
        var exceptions = new Dictionary<string, string>
        {
            ["Eplb/Balancing/EplbServiceCollectionExtensions.cs"] = "Microsoft.Extensions.DependencyInjection",
            ["Eplb/Balancing/EplbBuilder.cs"] = "Microsoft.Extensions.DependencyInjection",
        };
        Assert.That(NamespaceLayout.FolderMismatches(files, exceptions), Is.Empty);
        Assert.That(NamespaceLayout.TypesNamedLikeTheirNamespace(files), Is.Empty);
        var graph = NamespaceLayout.Dependencies(files);
        TestContext.Out.WriteLine(string.Join("\n", graph.Select(p => $"{p.Key} uses {string.Join(", ", p.Value)}")));
        Assert.That(NamespaceLayout.Cycles(graph), Is.Empty);
        var table = NamespaceLayout.ReadLayerTable(Path.Combine(TestSupport.RepoRoot, "docs", "ARCHITECTURE.md"));
        Assert.That(table.Keys, Does.Contain("Eplb").And.Contain("Eplb.Interop").And.Contain("Eplb.Simulation"));
        Assert.That(NamespaceLayout.Disallowed(graph, table), Is.Empty);
        Assert.That(NamespaceLayout.Cycles(table.ToDictionary(p => p.Key, p => (ISet<string>)p.Value.ToHashSet())), Is.Empty,
            "the layer table itself is acyclic");
    }
}

/// <summary>A C# file of managed/: its path below managed/ ('/' separators) and its text.</summary>
internal sealed record SourceFile(string Path, string Text);

/// <summary>Reads namespaces and their uses out of C# sources (a text scan: using directives, qualified and relative names, crefs).</summary>
internal static class NamespaceLayout
{
    private static readonly Regex Namespace = new(@"^\s*namespace\s+([\w.]+)\s*[;{]?", RegexOptions.Multiline);
    private static readonly Regex Using = new(@"^\s*(?:global\s+)?using\s+(?:static\s+)?(?:\w+\s*=\s*)?([\w.]+)\s*;", RegexOptions.Multiline);
    private static readonly Regex Cref = new("cref=\"([^\"]*)\"");
    private static readonly Regex Comment = new(@"//[^\n]*|/\*.*?\*/", RegexOptions.Singleline);
    private static readonly Regex StringLiteral = new("@\"(?:\"\"|[^\"])*\"|\"(?:\\\\.|[^\"\\\\\\n])*\"");
    private static readonly Regex TypeDeclaration = new(@"\b(?:record\s+(?:struct|class)|record|class|struct|interface|enum)\s+([A-Za-z_]\w*)");
    private static readonly Regex QualifiedName = new(@"(?<![\w.])((?:[A-Z]\w*\.)+)[A-Z]\w*");

    /// <summary>Every .cs file below <paramref name="managed"/>, outside bin/ and obj/.</summary>
    public static IReadOnlyList<SourceFile> Read(string managed) =>
        Directory.EnumerateFiles(managed, "*.cs", SearchOption.AllDirectories)
            .Select(f => Path.GetRelativePath(managed, f).Replace(Path.DirectorySeparatorChar, '/'))
            .Where(f => !f.Split('/').Any(part => part is "bin" or "obj"))
            .Order(StringComparer.Ordinal)
            .Select(f => new SourceFile(f, File.ReadAllText(Path.Combine(managed, f))))
            .ToList();

    /// <summary>The namespace a file's folder names: the project folder, then each sub-folder.</summary>
    public static string FolderNamespace(string path)
    {
        var parts = path.Split('/');
        return string.Join('.', parts[..^1]);
    }

    /// <summary>Files whose namespace is not their folder's (or the one <paramref name="exceptions"/> grants them).</summary>
    public static IReadOnlyList<string> FolderMismatches(IEnumerable<SourceFile> files, IReadOnlyDictionary<string, string> exceptions)
    {
        var problems = new List<string>();
        foreach (var file in files)
        {
            var expected = exceptions.TryGetValue(file.Path, out var granted) ? granted : FolderNamespace(file.Path);
            var declared = Namespace.Matches(Code(file.Text)).Select(m => m.Groups[1].Value).ToList();
            if (declared.Count == 0) problems.Add($"{file.Path}: no namespace, but its folder is {expected}");
            foreach (var name in declared.Where(n => n != expected))
                problems.Add($"{file.Path}: namespace {name}, but its folder is {expected}");
        }
        return problems;
    }

    /// <summary>Types whose name is the last part of their namespace (<c>Eplb.Placement.Placement</c>): a reader cannot tell them apart.</summary>
    public static IReadOnlyList<string> TypesNamedLikeTheirNamespace(IEnumerable<SourceFile> files)
    {
        var problems = new List<string>();
        foreach (var file in files)
        {
            var code = Code(file.Text);
            var name = Namespace.Match(code).Groups[1].Value;
            var last = name[(name.LastIndexOf('.') + 1)..];
            foreach (Match m in TypeDeclaration.Matches(code))
                if (m.Groups[1].Value == last) problems.Add($"{file.Path}: type {last} in namespace {name}");
        }
        return problems;
    }

    /// <summary>
    /// The namespaces of the files and, for each, the other namespaces of the set it uses: using
    /// directives, fully qualified names, and names qualified relative to an enclosing namespace
    /// (<c>Migration.ExpertTensor</c> inside <c>Eplb.Kernels</c>), in code and in crefs.
    /// </summary>
    public static SortedDictionary<string, SortedSet<string>> Dependencies(IEnumerable<SourceFile> files)
    {
        var parsed = files.Select(f => (File: f, Code: Code(f.Text))).ToList();
        var graph = new SortedDictionary<string, SortedSet<string>>(StringComparer.Ordinal);
        foreach (var (_, code) in parsed)
            foreach (Match m in Namespace.Matches(code))
                if (!graph.ContainsKey(m.Groups[1].Value)) graph[m.Groups[1].Value] = new SortedSet<string>(StringComparer.Ordinal);
        var known = graph.Keys.ToHashSet();
        foreach (var (file, code) in parsed)
        {
            var own = Namespace.Match(code).Groups[1].Value;
            if (own.Length == 0) continue;
            var uses = graph[own];
            void Use(string? name)
            {
                if (name != null && name != own) uses.Add(name);
            }
            foreach (Match m in Using.Matches(code)) Use(LongestKnownPrefix(m.Groups[1].Value, own, known, relative: false));
            var body = Using.Replace(Namespace.Replace(code, ""), "");
            foreach (Match m in QualifiedName.Matches(body))
                Use(LongestKnownPrefix(m.Groups[1].Value.TrimEnd('.'), own, known, relative: true));
        }
        return graph;
    }

    /// <summary>Every cycle of the graph, one per strongly connected component, as "A -> B -> ... -> A".</summary>
    public static IReadOnlyList<string> Cycles<TSet>(IDictionary<string, TSet> graph) where TSet : IEnumerable<string>
    {
        // Tarjan's strongly connected components; a component of two or more namespaces holds a cycle.
        var index = new Dictionary<string, int>();
        var low = new Dictionary<string, int>();
        var stack = new Stack<string>();
        var onStack = new HashSet<string>();
        var cycles = new List<string>();
        IEnumerable<string> Next(string node) => graph.TryGetValue(node, out var edges) ? edges.Where(graph.ContainsKey).Order(StringComparer.Ordinal) : [];
        void Visit(string node)
        {
            index[node] = low[node] = index.Count;
            stack.Push(node);
            onStack.Add(node);
            foreach (var next in Next(node))
            {
                if (!index.ContainsKey(next))
                {
                    Visit(next);
                    low[node] = Math.Min(low[node], low[next]);
                }
                else if (onStack.Contains(next))
                {
                    low[node] = Math.Min(low[node], index[next]);
                }
            }
            if (low[node] != index[node]) return;
            var component = new HashSet<string>();
            string member;
            do
            {
                member = stack.Pop();
                onStack.Remove(member);
                component.Add(member);
            } while (member != node);
            if (component.Count > 1) cycles.Add(CyclePath(component, Next));
        }
        foreach (var node in graph.Keys.Order(StringComparer.Ordinal))
            if (!index.ContainsKey(node)) Visit(node);
        return cycles.Order(StringComparer.Ordinal).ToList();
    }

    /// <summary>Namespaces missing from the layer table, and uses it does not allow.</summary>
    public static IReadOnlyList<string> Disallowed(IDictionary<string, SortedSet<string>> graph, IReadOnlyDictionary<string, IReadOnlySet<string>> table)
    {
        var problems = new List<string>();
        foreach (var (name, uses) in graph)
        {
            if (!table.TryGetValue(name, out var allowed))
            {
                problems.Add($"{name} is not in the layer table of docs/ARCHITECTURE.md");
                continue;
            }
            foreach (var use in uses.Where(u => !allowed.Contains(u)))
                problems.Add($"{name} uses {use}, which the layer table does not allow");
        }
        return problems;
    }

    /// <summary>
    /// The layer table of docs/ARCHITECTURE.md: rows <c>| `folder` | `Namespace` | `A`, `B` |</c>
    /// after the line that mentions this test; a namespace may use the ones in its last column.
    /// </summary>
    public static IReadOnlyDictionary<string, IReadOnlySet<string>> ReadLayerTable(string markdown)
    {
        var table = new Dictionary<string, IReadOnlySet<string>>();
        var inTable = false;
        foreach (var line in File.ReadLines(markdown))
        {
            if (line.Contains("NamespaceTests")) inTable = true;
            else if (inTable && line.StartsWith('|'))
            {
                var cells = line.Trim('|').Split('|');
                if (cells.Length < 3) continue;
                var name = Regex.Match(cells[1], "`([\\w.]+)`");
                if (!name.Success) continue;
                table[name.Groups[1].Value] = Regex.Matches(cells[^1], "`([\\w.]+)`").Select(m => m.Groups[1].Value).ToHashSet();
            }
            else if (inTable && table.Count > 0) break;
        }
        return table;
    }

    // The code of a file without comments and string literals, but with the names its crefs cite.
    private static string Code(string text)
    {
        var crefs = string.Join(' ', Cref.Matches(text).Select(m => m.Groups[1].Value.Split('(')[0]));
        return StringLiteral.Replace(Comment.Replace(text, ""), "\"\"") + "\n" + crefs;
    }

    // The namespace a name refers to, resolved as C# does: its first identifier is looked up in the
    // file's namespace, then in each enclosing one, then globally (relative names only from the
    // inside out); the result is the longest known namespace the name then starts with.
    private static string? LongestKnownPrefix(string name, string own, HashSet<string> known, bool relative)
    {
        var first = name.Split('.')[0];
        var scope = relative ? own : "";
        while (true)
        {
            var prefix = scope.Length > 0 ? scope + "." : "";
            if (known.Any(k => k == prefix + first || k.StartsWith(prefix + first + ".", StringComparison.Ordinal)))
            {
                for (var candidate = prefix + name; candidate.Length > prefix.Length; candidate = candidate[..Math.Max(0, candidate.LastIndexOf('.'))])
                    if (known.Contains(candidate)) return candidate;
                return null;
            }
            if (scope.Length == 0) return null;
            scope = scope.Contains('.') ? scope[..scope.LastIndexOf('.')] : "";
        }
    }

    private static string CyclePath(HashSet<string> component, Func<string, IEnumerable<string>> next)
    {
        // The shortest cycle through the component's first namespace (breadth-first).
        var start = component.Order(StringComparer.Ordinal).First();
        var parent = new Dictionary<string, string>();
        var queue = new Queue<string>([start]);
        while (queue.Count > 0)
        {
            var node = queue.Dequeue();
            foreach (var n in next(node).Where(component.Contains))
            {
                if (n == start)
                {
                    var path = new List<string> { start };
                    for (var at = node; at != start; at = parent[at]) path.Insert(1, at);
                    path.Add(start);
                    return string.Join(" -> ", path);
                }
                if (parent.ContainsKey(n)) continue;
                parent[n] = node;
                queue.Enqueue(n);
            }
        }
        return string.Join(" -> ", component.Order(StringComparer.Ordinal));
    }
}
