using System.CommandLine.Invocation;
using System.CommandLine;
using System.Text.Json;
using Eplb.Interop;

namespace Eplb.Cli;

/// <summary>
/// The <c>eplb</c> command-line tool. Whatever goes wrong ends in one line on stderr ("eplb: ..."),
/// never a stack trace: exit code 2 for bad input, the machine (a file, the disk, memory) or a run
/// that would not fit (<see cref="MemoryBudget"/>); exit code 1 for a fault of eplb itself. A
/// command that fails writes nothing (<see cref="OutputFiles"/>).
/// </summary>
public static class Program
{
    /// <summary>Exit code for bad arguments or input, or what the machine refused.</summary>
    public const int BadInput = 2;

    /// <summary>Exit code for a fault of eplb itself (a bug): still one line.</summary>
    public const int InternalError = 1;

    /// <summary>Runs a command; see the class summary for the exit codes.</summary>
    public static int Main(string[] args)
    {
        try
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
            return parse.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception e)
        {
            var (code, message) = Describe(e);
            Console.Error.WriteLine($"eplb: {OneLine(message)}");
            return code;
        }
    }

    /// <summary>The exit code and the line for an exception that ended a command.</summary>
    internal static (int Code, string Message) Describe(Exception e)
    {
        e = Unwrap(e);
        return e switch
        {
            ArgumentException argument => (BadInput, WithoutParameterName(argument)),
            OutOfMemoryException or InsufficientMemoryException =>
                (BadInput, $"out of memory ({e.Message.TrimEnd('.')}); the run needs more than the {MemoryBudget.Describe()}"),
            OverflowException => (BadInput, $"a value is too large for the computation ({e.Message.TrimEnd('.')})"),
            IOException io when io.Message.EndsWith('\'') && io.Message.LastIndexOf(" : '", StringComparison.Ordinal) is > 0 and var at =>
                (BadInput, $"{io.Message[(at + 3)..]}: {OutputFiles.IoReason(io)}"),
            _ when IsUserError(e) => (BadInput, e.Message),
            _ => (InternalError, $"internal error ({e.GetType().Name}): {e.Message}"),
        };
    }

    /// <summary>A message on one line (System.CommandLine lists allowed values on separate lines).</summary>
    internal static string OneLine(string message) =>
        string.Join(' ', message.Split(['\r', '\n', '\t'], StringSplitOptions.RemoveEmptyEntries).Select(part => part.Trim()));

    /// <summary>Failures caused by the user's input or machine rather than by a bug.</summary>
    internal static bool IsUserError(Exception e) =>
        e is ArgumentException or IOException or JsonException or FormatException or InvalidDataException or EplbException
            or EplbNativeLibraryException or UnauthorizedAccessException or OutOfMemoryException or OverflowException;

    // The first real fault inside the wrappers parallel loops and reflection add.
    private static Exception Unwrap(Exception e)
    {
        while (true)
        {
            switch (e)
            {
                case AggregateException { InnerExceptions.Count: > 0 } aggregate:
                    e = aggregate.InnerExceptions.FirstOrDefault(IsUserError) ?? aggregate.InnerExceptions[0];
                    continue;
                case System.Reflection.TargetInvocationException { InnerException: { } inner }:
                    e = inner;
                    continue;
                default:
                    return e;
            }
        }
    }

    // ArgumentException.Message appends " (Parameter 'name')": a detail of the code, not of the input.
    private static string WithoutParameterName(ArgumentException e)
    {
        var message = e.Message;
        var suffix = e.ParamName is null ? null : $" (Parameter '{e.ParamName}')";
        if (suffix != null)
        {
            var at = message.IndexOf(suffix, StringComparison.Ordinal);
            if (at >= 0) message = message.Remove(at, suffix.Length);
        }
        return message;
    }
}
