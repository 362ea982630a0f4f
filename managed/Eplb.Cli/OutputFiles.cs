using System.Runtime.InteropServices;

namespace Eplb.Cli;

/// <summary>
/// The files one command writes, for every command: each path is checked before the work, each
/// output is written to a temporary file, and only when all are written are they put in place, so
/// a command that fails writes nothing (the temporary files are deleted, also on Ctrl-C).
/// <list type="bullet">
/// <item>A regular file, or a new one: the temporary file sits beside it (<c>.name.random.tmp</c>), is
/// flushed to disk and renamed over it.</item>
/// <item>A symbolic link: its final target is written that way; the link stays.</item>
/// <item>A character device or a FIFO (<c>/dev/null</c>, <c>/dev/stdout</c>, a named pipe): written
/// through at the end, never replaced; a write that fails (<c>/dev/full</c>) fails the command.</item>
/// <item>A directory, a block device, a socket, a folder that does not exist, the same file named
/// twice: refused before the work, naming the option.</item>
/// </list>
/// </summary>
internal sealed class OutputFiles : IDisposable
{
    private readonly List<Output> _outputs = [];
    private readonly List<PosixSignalRegistration> _signals = [];

    private OutputFiles()
    {
    }

    /// <summary>Checks every (option, path) pair (null paths are skipped) and reserves their temporary files.</summary>
    /// <exception cref="ArgumentException">A path is empty, a directory, a block device or socket, or named twice.</exception>
    /// <exception cref="IOException">The folder does not exist or cannot be written.</exception>
    public static OutputFiles Prepare(params (string Option, string? Path)[] outputs)
    {
        var files = new OutputFiles();
        try
        {
            foreach (var (option, path) in outputs)
            {
                if (path is null) continue;
                var output = Check(option, path);
                var twin = files._outputs.FirstOrDefault(o => o.Target == output.Target);
                if (twin != null)
                    throw new ArgumentException($"{option} and {twin.Option} name the same file '{output.Target}'");
                files._outputs.Add(output);
                output.Temporary = Reserve(output);
            }
            foreach (var signal in new[] { PosixSignal.SIGINT, PosixSignal.SIGTERM, PosixSignal.SIGHUP })
                files._signals.Add(PosixSignalRegistration.Create(signal, _ => files.DeleteTemporaries()));
        }
        catch
        {
            files.Dispose();
            throw;
        }
        return files;
    }

    /// <summary>Whether <paramref name="path"/> (through any links) is a character device or FIFO, which is written through rather than replaced.</summary>
    public static bool IsWrittenThrough(string path) =>
        !string.IsNullOrWhiteSpace(path) && FileKinds.Of(Path.GetFullPath(path)) is FileKind.CharacterDevice or FileKind.Fifo;

    /// <summary>Writes the output for <paramref name="path"/> (as given to <see cref="Prepare"/>) into its temporary file.</summary>
    public void Write(string path, Action<Stream> write)
    {
        var output = Find(path);
        Naming(output, () =>
        {
            using var stream = new FileStream(output.Temporary!, FileMode.Truncate, FileAccess.Write, FileShare.None);
            write(stream);
            stream.Flush(flushToDisk: true);
        });
        output.Written = true;
    }

    /// <summary>As <see cref="Write(string, Action{Stream})"/>, for writers that take a file name (it is the temporary file's).</summary>
    public void WriteFile(string path, Action<string> write)
    {
        var output = Find(path);
        Naming(output, () =>
        {
            write(output.Temporary!);
            using var stream = new FileStream(output.Temporary!, FileMode.Open, FileAccess.Write, FileShare.None);
            stream.Flush(flushToDisk: true);
        });
        output.Written = true;
    }

    /// <summary>Puts every output in place: renames over regular files, writes devices and FIFOs through.</summary>
    /// <exception cref="InvalidOperationException">An output was prepared but never written.</exception>
    public void Commit()
    {
        if (_outputs.FirstOrDefault(o => !o.Written) is { } unwritten)
            throw new InvalidOperationException($"{unwritten.Option}: nothing was written");
        // Write-through targets first: they are the ones that can still fail (a full device).
        foreach (var output in _outputs.Where(o => o.WriteThrough))
        {
            Naming(output, () =>
            {
                using var source = new FileStream(output.Temporary!, FileMode.Open, FileAccess.Read);
                using var target = new FileStream(output.Target, FileMode.Open, FileAccess.Write, FileShare.ReadWrite, bufferSize: 1);
                source.CopyTo(target);
                target.Flush();
            });
        }
        foreach (var output in _outputs.Where(o => !o.WriteThrough)) Naming(output, () => File.Move(output.Temporary!, output.Target, overwrite: true));
        DeleteTemporaries();
    }

    /// <summary>Deletes the temporary files (all of them when <see cref="Commit"/> did not run).</summary>
    public void Dispose()
    {
        foreach (var signal in _signals) signal.Dispose();
        _signals.Clear();
        DeleteTemporaries();
    }

    private void DeleteTemporaries()
    {
        foreach (var output in _outputs)
        {
            if (output.Temporary is null) continue;
            try
            {
                File.Delete(output.Temporary);
            }
            catch (IOException)
            {
            }
            catch (UnauthorizedAccessException)
            {
            }
        }
    }

    // A failed write names the option and the file the user gave, not the temporary file.
    private static void Naming(Output output, Action action)
    {
        try
        {
            action();
        }
        catch (IOException e)
        {
            throw new IOException($"{output.Option} '{output.Path}': {IoReason(e)}", e);
        }
    }

    /// <summary>The system's reason in an <see cref="IOException"/> without the path .NET appends ("No space left on device : '/x'").</summary>
    internal static string IoReason(IOException e)
    {
        var message = e.Message;
        var at = message.LastIndexOf(" : '", StringComparison.Ordinal);
        return at > 0 && message.EndsWith('\'') ? message[..at] : message;
    }

    private Output Find(string path)
    {
        return _outputs.FirstOrDefault(o => o.Path == path)
               ?? throw new InvalidOperationException($"'{path}' was not prepared as an output");
    }

    // What the path names and how it is written; everything that can be refused is refused here.
    private static Output Check(string option, string path)
    {
        if (string.IsNullOrWhiteSpace(path)) throw new ArgumentException($"{option} must name a file");
        if (path.EndsWith(Path.DirectorySeparatorChar) || path.EndsWith(Path.AltDirectorySeparatorChar))
            throw new ArgumentException($"{option} '{path}' names a directory, not a file");
        var target = Path.GetFullPath(path);
        if (FileKinds.Of(target, followLinks: false) == FileKind.SymbolicLink)
        {
            // Write what the link points at; the link itself stays.
            var resolved = new FileInfo(target).ResolveLinkTarget(returnFinalTarget: true)
                           ?? throw new ArgumentException($"{option} '{path}' is a link that cannot be resolved");
            target = resolved.FullName;
        }
        var kind = FileKinds.Of(target);
        var writeThrough = false;
        switch (kind)
        {
            case FileKind.Missing:
            case FileKind.Regular:
                var folder = Path.GetDirectoryName(target);
                if (folder != null && FileKinds.Of(folder) != FileKind.Directory)
                    throw new DirectoryNotFoundException($"{option} '{path}': the folder '{folder}' does not exist");
                break;
            case FileKind.Directory:
                throw new ArgumentException($"{option} '{path}' is a directory, not a file");
            case FileKind.CharacterDevice:
            case FileKind.Fifo:
                writeThrough = true;
                break;
            default:
                throw new ArgumentException($"{option} '{path}' is a {InputFile.Name(kind)}; eplb writes regular files, character devices and FIFOs only");
        }
        return new Output(option, path, target, writeThrough);
    }

    // A new, empty temporary file: beside a regular target (same file system, so the rename is atomic),
    // in the system's temporary folder for a device or FIFO. Creating it proves the folder is writable.
    private static string Reserve(Output output)
    {
        var folder = output.WriteThrough ? Path.GetTempPath() : Path.GetDirectoryName(output.Target)!;
        var name = Path.GetFileName(output.Target);
        for (var attempt = 0; ; attempt++)
        {
            var temporary = Path.Combine(folder, $".{name}.{Convert.ToHexStringLower(Guid.NewGuid().ToByteArray().AsSpan(0, 6))}.tmp");
            try
            {
                using (new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None))
                {
                }
                return temporary;
            }
            catch (IOException) when (attempt < 3 && File.Exists(temporary))
            {
                // A name taken by chance: draw another.
            }
            catch (UnauthorizedAccessException)
            {
                throw new UnauthorizedAccessException($"{output.Option} '{output.Path}': cannot write in the folder '{folder}'");
            }
            catch (IOException e) when (!File.Exists(temporary))
            {
                // Not a name taken by chance: the folder refuses new files (/proc, a read-only mount).
                throw new IOException($"{output.Option} '{output.Path}': cannot write in the folder '{folder}' ({e.Message})", e);
            }
        }
    }

    private sealed class Output(string option, string path, string target, bool writeThrough)
    {
        public string Option { get; } = option;
        public string Path { get; } = path;
        public string Target { get; } = target;
        public bool WriteThrough { get; } = writeThrough;
        public string? Temporary { get; set; }
        public bool Written { get; set; }
    }
}
