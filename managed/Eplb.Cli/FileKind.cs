using System.Runtime.InteropServices;

namespace Eplb.Cli;

/// <summary>What a path names, as <c>statx</c> sees it (.NET's file APIs do not tell a device or a FIFO from a file).</summary>
internal enum FileKind
{
    /// <summary>Nothing exists there.</summary>
    Missing,
    /// <summary>A regular file.</summary>
    Regular,
    /// <summary>A directory.</summary>
    Directory,
    /// <summary>A symbolic link (only when links are not followed).</summary>
    SymbolicLink,
    /// <summary>A character device (/dev/null, /dev/full, a terminal).</summary>
    CharacterDevice,
    /// <summary>A block device (a disk).</summary>
    BlockDevice,
    /// <summary>A named pipe.</summary>
    Fifo,
    /// <summary>A Unix socket.</summary>
    Socket,
}

/// <summary>The file type of a path (Linux <c>statx</c>: one struct layout on every architecture, glibc &gt;= 2.28).</summary>
internal static class FileKinds
{
    private const int AtFdCwd = -100;
    private const int AtSymlinkNoFollow = 0x100;
    private const uint StatxType = 0x1;
    private const int ModeOffset = 28;  // struct statx: stx_mode (u16) after mask, blksize, attributes, nlink, uid, gid
    private const int StatxSize = 256;
    private const int ENOENT = 2, ENOTDIR = 20;

    /// <summary>What <paramref name="path"/> names; <paramref name="followLinks"/> false reports a link itself.</summary>
    /// <exception cref="IOException">The path cannot be examined (permission, a loop of links).</exception>
    public static FileKind Of(string path, bool followLinks = true)
    {
        var buffer = new byte[StatxSize];
        int result;
        try
        {
            result = Statx(AtFdCwd, path, followLinks ? 0 : AtSymlinkNoFollow, StatxType, buffer);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return Fallback(path, followLinks);
        }
        if (result != 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            if (errno is ENOENT or ENOTDIR) return FileKind.Missing;
            throw new IOException($"cannot examine '{path}': {Marshal.GetPInvokeErrorMessage(errno)}");
        }
        var mode = BitConverter.ToUInt16(buffer, ModeOffset);
        return (mode & 0xF000) switch
        {
            0x8000 => FileKind.Regular,
            0x4000 => FileKind.Directory,
            0xA000 => FileKind.SymbolicLink,
            0x2000 => FileKind.CharacterDevice,
            0x6000 => FileKind.BlockDevice,
            0x1000 => FileKind.Fifo,
            0xC000 => FileKind.Socket,
            _ => FileKind.Regular,
        };
    }

    // Without statx (an old C library): what .NET can tell.
    private static FileKind Fallback(string path, bool followLinks)
    {
        var info = new FileInfo(path);
        if (!followLinks && info.LinkTarget != null) return FileKind.SymbolicLink;
        if (Directory.Exists(path)) return FileKind.Directory;
        return File.Exists(path) ? FileKind.Regular : FileKind.Missing;
    }

    [DllImport("libc.so.6", EntryPoint = "statx", SetLastError = true)]
    private static extern int Statx(int dirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags, uint mask, [Out] byte[] buffer);
}

/// <summary>Checks an input path before it is read.</summary>
internal static class InputFile
{
    /// <summary>
    /// The size of the regular file <paramref name="path"/> names (through links), or 0 when nothing is
    /// there (the reader then says it does not exist). A directory, device, FIFO or socket is refused:
    /// inputs are read whole, and <c>/dev/zero</c> never ends.
    /// </summary>
    /// <exception cref="ArgumentException">The path names something other than a regular file.</exception>
    public static long Check(string option, string path)
    {
        if (string.IsNullOrWhiteSpace(path)) throw new ArgumentException($"{option} must name a file");
        var kind = FileKinds.Of(path);
        return kind switch
        {
            FileKind.Missing => 0,
            FileKind.Regular => new FileInfo(path).Length,
            FileKind.Directory => throw new ArgumentException($"{option} '{path}' is a directory, not a file"),
            _ => throw new ArgumentException($"{option} '{path}' is a {Name(kind)}, not a regular file; eplb reads its inputs whole"),
        };
    }

    internal static string Name(FileKind kind) => kind switch
    {
        FileKind.CharacterDevice => "character device",
        FileKind.BlockDevice => "block device",
        FileKind.Fifo => "FIFO",
        FileKind.Socket => "socket",
        _ => kind.ToString().ToLowerInvariant(),
    };
}
