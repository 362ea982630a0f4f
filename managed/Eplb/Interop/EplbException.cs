using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Eplb.Interop;

/// <summary>
/// A failure reported by libeplb. Invalid arguments surface as <see cref="ArgumentException"/> and
/// out-of-memory as <see cref="OutOfMemoryException"/>; everything else is this type, with the
/// native status and message.
/// </summary>
public class EplbException : Exception
{
    /// <summary>Creates an exception for a native status.</summary>
    public EplbException(EplbStatus status, string message) : base(message) => Status = status;

    /// <summary>Creates an exception with an inner cause.</summary>
    public EplbException(EplbStatus status, string message, Exception inner) : base(message, inner) => Status = status;

    /// <summary>The native status.</summary>
    public EplbStatus Status { get; }

    /// <summary>
    /// The one choke point from native status to exception (docs/ARCHITECTURE.md): does nothing for OK, otherwise
    /// throws with the thread's last native error message and the failing call's expression.
    /// </summary>
    internal static unsafe void ThrowIfFailed(eplb_status_t status, [CallerArgumentExpression(nameof(status))] string? call = null)
    {
        if (status == eplb_status_t.EPLB_STATUS_OK) return;
        var message = Marshal.PtrToStringUTF8((nint)NativeMethods.eplb_last_error_message()) ?? "";
        var code = (EplbStatus)(int)status;
        var where = CallName(call);
        throw code switch
        {
            EplbStatus.InvalidArgument => new ArgumentException($"{where}: {message}"),
            EplbStatus.OutOfMemory => new OutOfMemoryException($"{where}: {message}"),
            _ => new EplbException(code, $"{where}: {message}"),
        };
    }

    private static string CallName(string? call)
    {
        if (string.IsNullOrEmpty(call)) return "libeplb";
        var paren = call.IndexOf('(');
        var name = paren > 0 ? call[..paren] : call;
        return name.Replace("NativeMethods.", "").Trim();
    }
}

/// <summary>libeplb could not be loaded, or is not the version this assembly needs.</summary>
public sealed class EplbNativeLibraryException : DllNotFoundException
{
    internal EplbNativeLibraryException(string message, IReadOnlyList<string> searched)
        : base(message + (searched.Count > 0 ? " Searched: " + string.Join("; ", searched) + "." : "")) =>
        Searched = searched;

    /// <summary>The paths that were tried, in order.</summary>
    public IReadOnlyList<string> Searched { get; }
}
