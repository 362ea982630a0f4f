using System.Globalization;

namespace Eplb.Cli;

/// <summary>
/// How much memory a command may ask for: its estimate, made from the arguments before anything
/// large is allocated, must stay within three quarters of the memory available to the process (what
/// the .NET GC sees: physical memory, a container's limit, or <c>DOTNET_GCHeapHardLimit</c>). A run
/// that cannot fit is refused with one line naming both figures, instead of growing until the
/// machine runs out.
/// </summary>
internal static class MemoryBudget
{
    /// <summary>The fraction of the available memory a run may use.</summary>
    public const double Share = 0.75;

    /// <summary>The memory available to this process, in bytes.</summary>
    public static long Available => GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;

    /// <summary>The most a run may need, in bytes.</summary>
    public static long Limit => (long)(Available * Share);

    /// <summary>The limit as the help texts print it ("12.0 GiB, three quarters of 16.0 GiB").</summary>
    public static string Describe() => $"{Format(Limit)}, three quarters of the {Format(Available)} available to the process";

    /// <summary>
    /// Refuses a run whose estimate exceeds <see cref="Limit"/>. The estimate is a double so that any
    /// product of arguments fits.
    /// </summary>
    /// <exception cref="ArgumentException">The estimate exceeds the limit (the message names both and what drives the estimate).</exception>
    public static void Check(string what, double bytes, string drivenBy)
    {
        if (double.IsFinite(bytes) && bytes <= Limit) return;
        throw new ArgumentException($"{what} needs about {Format(bytes)} of memory ({drivenBy}), more than the limit of {Describe()}");
    }

    /// <summary>Bytes in binary units with three figures ("1.50 GiB").</summary>
    public static string Format(double bytes)
    {
        if (!double.IsFinite(bytes)) return "an unbounded amount";
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        var unit = 0;
        for (; bytes >= 1024 && unit < units.Length - 1; unit++) bytes /= 1024;
        return unit == 0
            ? string.Create(CultureInfo.InvariantCulture, $"{bytes:F0} {units[unit]}")
            : string.Create(CultureInfo.InvariantCulture, $"{bytes:F1} {units[unit]}");
    }
}
