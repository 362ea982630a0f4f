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
/// Loads libeplb explicitly: <c>EPLB_NATIVE_PATH</c> when set (a file or a folder; nothing else is
/// tried then), else the application folder and its <c>runtimes/linux-x64/native</c>, the Eplb
/// assembly's folder, then the runtime's own probing (the NuGet <c>runtimes/</c> folders). The build
/// copies libeplb.so next to every assembly that references Eplb, so no folder above the application
/// is searched: a library planted in a parent folder of an installed app is never loaded. The ABI
/// version is checked once, on load (after the library's constructors ran: load only trusted files).
/// </summary>
internal static unsafe class NativeLibraryLoader
{
    internal const string FileName = "libeplb.so";

    /// <summary>The variable that names the library file (or its folder) to load instead of searching.</summary>
    internal const string PathVariable = "EPLB_NATIVE_PATH";
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

            var overridePath = Environment.GetEnvironmentVariable(PathVariable);
            if (!string.IsNullOrWhiteSpace(overridePath))
            {
                // A relative value is taken against the working directory (as dlopen would), made explicit here.
                path = Path.GetFullPath(Directory.Exists(overridePath) ? Path.Combine(overridePath, FileName) : overridePath);
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
                    "libeplb.so was not found next to the application. Build with ./build.sh (it builds build/native/lib/libeplb.so, " +
                    "then the managed projects, which copy it next to their assemblies), or set EPLB_NATIVE_PATH to the library file or its folder.", tried);

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
