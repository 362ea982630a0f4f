using System.CommandLine;
using System.Text.Json;
using Eplb.Runtime;

namespace Eplb.Cli;

/// <summary><c>eplb info</c>: what libeplb was built with and what this machine has.</summary>
internal static class InfoCommand
{
    public static Command Create()
    {
        var json = new Option<bool>("--json") { Description = "Print the facts as one JSON object" };
        var command = new Command("info", "Print the runtime info: backend, device, compute capability, SMs, library version and path") { json };
        command.SetAction(parse => Run(parse.GetValue(json)));
        return command;
    }

    private static int Run(bool asJson)
    {
        var info = EplbRuntime.Info;
        var backend = EplbRuntime.DefaultBackend;
        if (asJson)
        {
            Console.WriteLine(JsonSerializer.Serialize(new { backend = backend.ToString().ToLowerInvariant(), info },
                new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }
        var rows = new List<(string, string)>
        {
            ("backend", $"{backend.ToString().ToLowerInvariant()} ({EplbRuntime.BackendVariable}={Environment.GetEnvironmentVariable(EplbRuntime.BackendVariable) ?? "auto"})"),
            ("library", $"libeplb {info.LibraryVersion} (ABI {info.AbiVersion})"),
            ("path", info.LibraryPath),
            ("cuda compiled", info.CudaCompiled ? $"yes (runtime {Version(info.CudaRuntimeVersion)}, archs {info.CudaArchitectures})" : "no"),
            ("cuda driver", info.CudaDriverVersion > 0 ? Version(info.CudaDriverVersion) : "none"),
            ("devices", info.DeviceCount.ToString()),
        };
        if (info.Device >= 0)
        {
            rows.Add(("device", $"{info.Device}: {info.DeviceName}"));
            rows.Add(("compute capability", info.ComputeCapability));
            rows.Add(("SMs", info.SmCount.ToString()));
            rows.Add(("memory", $"{info.TotalMemoryBytes / (1024.0 * 1024 * 1024):F1} GiB"));
            rows.Add(("cooperative launch", info.CooperativeLaunch ? "yes" : "no"));
        }
        if (EplbRuntime.UnavailableReason(Backend.Cuda) is { } reason) rows.Add(("cuda backend", reason));
        if (info.LastCudaError != 0) rows.Add(("last CUDA error", $"{info.LastCudaError}: {info.LastCudaErrorText}"));
        var width = rows.Max(r => r.Item1.Length);
        foreach (var (key, value) in rows) Console.WriteLine($"{key.PadRight(width)}  {value}");
        return 0;
    }

    private static string Version(int v) => $"{v / 1000}.{v % 1000 / 10}";
}
