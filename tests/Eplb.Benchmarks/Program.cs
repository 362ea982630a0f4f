using BenchmarkDotNet.Running;

namespace Eplb.Benchmarks;

/// <summary>
/// BenchmarkDotNet suite for the managed hot paths and the CPU kernels.
/// Run all: <c>./build.sh bench</c>; one class: <c>./build.sh bench --filter '*Mapping*'</c>.
/// </summary>
public static class Program
{
    public static void Main(string[] args) => BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
}
