using Eplb.Runtime;

namespace Eplb.Kernels;

/// <summary>The argument checks every kernel wrapper shares, each with one wording.</summary>
internal static class KernelArguments
{
    /// <summary>Throws unless <paramref name="backend"/> is the stream's.</summary>
    public static void SameBackend(ComputeStream stream, Backend backend, string name) => SameBackend(stream.Backend, backend, name);

    /// <summary>Throws unless a (non-null) view lives on <paramref name="expected"/>; null views pass.</summary>
    public static void SameBackend<T>(Backend expected, DeviceSlice<T> view, string name) where T : unmanaged
    {
        if (!view.IsNull) SameBackend(expected, view.Backend, name);
    }

    /// <summary>Throws unless every (non-null) view lives on the stream's backend.</summary>
    public static void SameBackend<T>(ComputeStream stream, DeviceSlice<T> view, string name) where T : unmanaged =>
        SameBackend(stream.Backend, view, name);

    /// <summary>Throws <see cref="ArgumentNullException"/> for a default (null) view.</summary>
    public static void Require<T>(DeviceSlice<T> view, string name) where T : unmanaged
    {
        if (view.IsNull) throw new ArgumentNullException(name);
    }

    /// <summary>Throws unless the view has <paramref name="expected"/> elements (a null view passes only when none are expected).</summary>
    public static void ExpectLength<T>(DeviceSlice<T> view, long expected, string name) where T : unmanaged
    {
        if (view.IsNull)
        {
            if (expected == 0) return;
            throw new ArgumentException($"{name} is required ({expected} elements)", name);
        }
        ExpectLength(view.Length, expected, name);
    }

    /// <summary>Throws unless a host span or view has <paramref name="expected"/> elements.</summary>
    public static void ExpectLength(long length, long expected, string name)
    {
        if (length != expected) throw new ArgumentException($"{name} has {length} elements; {expected} are needed", name);
    }

    /// <summary>The rows of <paramref name="width"/> elements in <paramref name="length"/>; throws when it does not divide.</summary>
    public static long WholeRows(long length, int width, string name) =>
        length % width == 0
            ? length / width
            : throw new ArgumentException($"{name} has {length} elements, not a multiple of {width}", name);

    private static void SameBackend(Backend expected, Backend actual, string name)
    {
        if (actual != expected) throw new ArgumentException($"{name} lives on {actual} but the stream runs on {expected}", name);
    }
}
