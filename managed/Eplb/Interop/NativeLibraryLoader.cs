using System.Reflection;
using System.Runtime.InteropServices;

namespace Eplb.Interop;

/// <summary>Hand-written companions of the generated bindings.</summary>
internal static partial class NativeMethods
{
    /// <summary>The name every generated <c>[LibraryImport]</c> uses; resolved by <see cref="NativeLibraryLoader"/>.</summary>
    internal const string LibraryName = "eplb";

    // Runs before the first binding is called: libeplb is then resolved by our loader, never by
    // the runtime's default search alone.
    static NativeMethods() => NativeLibraryLoader.Register();
}

/// <summary>Size and field offsets of one ABI struct, as libclang computed them from the header.</summary>
internal sealed record StructLayoutInfo(string Name, Type Type, long Size, (string Field, long Offset)[] Fields);

/// <summary>
/// Loads libeplb explicitly: <c>EPLB_NATIVE_PATH</c> first (a file or a folder), then the
/// runtime's own probing (the NuGet <c>runtimes/</c> folders), then the application folder, then a
/// repository build (<c>build/native/lib</c>) above it. The ABI version is checked once, on load.
/// </summary>
internal static unsafe class NativeLibraryLoader
{
    internal const string FileName = "libeplb.so";
    private static readonly object Gate = new();
    private static nint _handle;
    private static string? _path;

    /// <summary>The file libeplb was loaded from, or null before the first native call.</summary>
    internal static string? LoadedPath => _path;

    internal static void Register() =>
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraryLoader).Assembly, Resolve);

    private static nint Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath) =>
        name == NativeMethods.LibraryName ? Load(assembly, searchPath) : 0;

    /// <summary>Loads (once) and returns the library handle; throws <see cref="EplbNativeLibraryException"/>.</summary>
    internal static nint Load(Assembly? assembly = null, DllImportSearchPath? searchPath = null)
    {
        lock (Gate)
        {
            if (_handle != 0) return _handle;
            assembly ??= typeof(NativeLibraryLoader).Assembly;
            var tried = new List<string>();
            nint handle = 0;
            string? path = null;

            var overridePath = Environment.GetEnvironmentVariable("EPLB_NATIVE_PATH");
            if (!string.IsNullOrWhiteSpace(overridePath))
            {
                path = Directory.Exists(overridePath) ? Path.Combine(overridePath, FileName) : overridePath;
                tried.Add(path + " (EPLB_NATIVE_PATH)");
                if (!NativeLibrary.TryLoad(path, out handle))
                    throw new EplbNativeLibraryException(
                        $"EPLB_NATIVE_PATH points at '{overridePath}', but {path} could not be loaded. " +
                        "Point it at a libeplb.so built by ./build.sh (build/native/lib) or unset it.", tried);
            }
            else
            {
                foreach (var candidate in Candidates(assembly))
                {
                    tried.Add(candidate);
                    if (File.Exists(candidate) && NativeLibrary.TryLoad(candidate, out handle))
                    {
                        path = candidate;
                        break;
                    }
                }
                if (handle == 0)
                {
                    tried.Add("runtime probing for 'eplb'");
                    if (NativeLibrary.TryLoad(NativeMethods.LibraryName, assembly, searchPath, out handle))
                        path = "eplb (runtime probing)";
                }
            }
            if (handle == 0)
                throw new EplbNativeLibraryException(
                    "libeplb.so was not found. Build it with ./build.sh (it lands in build/native/lib), " +
                    "or set EPLB_NATIVE_PATH to the library file or its folder.", tried);

            CheckAbi(handle, path!, tried);
            _path = path;
            _handle = handle;
            return handle;
        }
    }

    private static IEnumerable<string> Candidates(Assembly assembly)
    {
        var baseDir = AppContext.BaseDirectory;
        yield return Path.Combine(baseDir, FileName);
        yield return Path.Combine(baseDir, "runtimes", "linux-x64", "native", FileName);
        var assemblyDir = Path.GetDirectoryName(assembly.Location);
        if (!string.IsNullOrEmpty(assemblyDir) && assemblyDir != baseDir.TrimEnd(Path.DirectorySeparatorChar))
            yield return Path.Combine(assemblyDir, FileName);
        // A development checkout: build/native/lib above the running binaries.
        for (var dir = new DirectoryInfo(baseDir); dir != null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Eplb.sln")))
            {
                yield return Path.Combine(dir.FullName, "build", "native", "lib", FileName);
                break;
            }
        }
    }

    private static void CheckAbi(nint handle, string path, List<string> tried)
    {
        if (!NativeLibrary.TryGetExport(handle, "eplb_abi_version", out var export))
        {
            NativeLibrary.Free(handle);
            throw new EplbNativeLibraryException($"{path} is not libeplb (it has no eplb_abi_version).", tried);
        }
        var version = ((delegate* unmanaged[Cdecl]<uint>)export)();
        if (version != NativeConstants.EPLB_ABI_VERSION)
        {
            NativeLibrary.Free(handle);
            throw new EplbNativeLibraryException(
                $"{path} has ABI version {version}, but this Eplb assembly was generated against version " +
                $"{NativeConstants.EPLB_ABI_VERSION}. Rebuild the native library (./build.sh) or point EPLB_NATIVE_PATH at a matching one.",
                tried);
        }
    }
}
