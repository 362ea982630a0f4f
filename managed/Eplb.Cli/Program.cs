using System.CommandLine.Invocation;
using System.CommandLine;
using Eplb.Interop;

namespace Eplb.Cli;

/// <summary>
/// The <c>eplb</c> command-line tool. Every command reports bad input as one line on stderr
/// ("eplb: ...") and exit code 2; nothing is written on error.
/// </summary>
public static class Program
{
    /// <summary>Exit code for bad arguments or input.</summary>
    public const int BadInput = 2;

    public static int Main(string[] args)
    {
        var root = new RootCommand("eplb: expert-parallel load balancing for Mixture-of-Experts inference");
        root.Subcommands.Add(SimulateCommand.Create());
        root.Subcommands.Add(InfoCommand.Create());
        root.Subcommands.Add(PlanCommand.Create());

        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            Console.Error.WriteLine($"eplb: {OneLine(parse.Errors[0].Message)}");
            return BadInput;
        }
        try
        {
            return parse.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception e) when (IsUserError(e))
        {
            Console.Error.WriteLine($"eplb: {OneLine(e.Message)}");
            return BadInput;
        }
    }

    /// <summary>A message on one line (System.CommandLine lists allowed values on separate lines).</summary>
    internal static string OneLine(string message) =>
        string.Join(' ', message.Split(['\r', '\n', '\t'], StringSplitOptions.RemoveEmptyEntries).Select(part => part.Trim()));

    /// <summary>Failures caused by the user's input or machine rather than by a bug.</summary>
    internal static bool IsUserError(Exception e) =>
        e is ArgumentException or FileNotFoundException or DirectoryNotFoundException or System.Text.Json.JsonException
            or FormatException or InvalidDataException or EplbException or EplbNativeLibraryException or UnauthorizedAccessException;
}
