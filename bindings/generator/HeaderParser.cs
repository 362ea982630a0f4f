// Reads the eplb headers through libclang into HeaderModels, one per header file.
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;

namespace Eplb.Bindings.Generator;

internal sealed unsafe class HeaderParser
{
    private readonly string _includeDir;
    private readonly string _shimDir;
    private readonly Dictionary<string, string> _tagToTypedef = new(StringComparer.Ordinal);
    private readonly HashSet<string> _knownTypedefs = new(StringComparer.Ordinal);
    private readonly HashSet<string> _opaqueTypedefs = new(StringComparer.Ordinal);
    private nint _unit;

    public HeaderParser(string includeDir, string shimDir)
    {
        _includeDir = Path.GetFullPath(includeDir);
        _shimDir = Path.GetFullPath(shimDir);
    }

    /// <summary>Parses the umbrella header; returns one model per header under the include dir.</summary>
    public List<HeaderModel> Parse(string header)
    {
        // A fixed target and the shim's stdint/stddef make the output the same on every machine,
        // whatever system headers (or none) are installed.
        string[] args =
        [
            "-x", "c", "-std=c11", "--target=x86_64-pc-linux-gnu", "-fparse-all-comments",
            "-nostdinc", "-isystem", _shimDir, "-I", _includeDir,
        ];
        var index = LibClang.CreateIndex(0, 0);
        try
        {
            _unit = ParseUnit(index, Path.GetFullPath(header), args);
            try
            {
                return Collect();
            }
            finally
            {
                LibClang.DisposeTranslationUnit(_unit);
            }
        }
        finally
        {
            LibClang.DisposeIndex(index);
        }
    }

    private static nint ParseUnit(nint index, string header, string[] args)
    {
        var argPointers = args.Select(a => Marshal.StringToCoTaskMemUTF8(a)).ToArray();
        var headerPointer = Marshal.StringToCoTaskMemUTF8(header);
        try
        {
            fixed (nint* argv = argPointers)
            {
                var unit = LibClang.ParseTranslationUnit(index, (byte*)headerPointer, (byte**)argv, args.Length, null, 0,
                    LibClang.DetailedPreprocessingRecord | LibClang.SkipFunctionBodies);
                if (unit == 0) throw new InvalidOperationException($"libclang could not parse {header}");
                var errors = new List<string>();
                for (uint i = 0; i < LibClang.GetNumDiagnostics(unit); i++)
                {
                    var diagnostic = LibClang.GetDiagnostic(unit, i);
                    if (LibClang.GetDiagnosticSeverity(diagnostic) >= 3)
                        errors.Add(LibClang.Take(LibClang.FormatDiagnostic(diagnostic, 0)));
                    LibClang.DisposeDiagnostic(diagnostic);
                }
                if (errors.Count > 0)
                {
                    LibClang.DisposeTranslationUnit(unit);
                    throw new InvalidOperationException($"{header} does not compile:\n  " + string.Join("\n  ", errors));
                }
                return unit;
            }
        }
        finally
        {
            foreach (var pointer in argPointers) Marshal.FreeCoTaskMem(pointer);
            Marshal.FreeCoTaskMem(headerPointer);
        }
    }

    private bool IsOurs(string file) =>
        file.Length > 0 && Path.GetFullPath(file).StartsWith(_includeDir + Path.DirectorySeparatorChar, StringComparison.Ordinal);

    private List<HeaderModel> Collect()
    {
        var top = LibClang.Children(LibClang.GetTranslationUnitCursor(_unit))
            .Select(c => (Cursor: c, File: LibClang.FileOf(c)))
            .Where(c => IsOurs(c.File))
            .ToList();

        // Pass 1: typedef names of our structs and enums, and which structs are opaque.
        foreach (var (cursor, _) in top)
        {
            if (cursor.Kind != CXCursorKind.TypedefDecl) continue;
            var name = LibClang.Spelling(cursor);
            var declaration = LibClang.GetTypeDeclaration(LibClang.GetCanonicalType(LibClang.GetTypedefDeclUnderlyingType(cursor)));
            if (declaration.Kind is not (CXCursorKind.StructDecl or CXCursorKind.EnumDecl)) continue;
            _tagToTypedef[LibClang.Spelling(declaration)] = name;
            _knownTypedefs.Add(name);
            if (declaration.Kind == CXCursorKind.StructDecl && LibClang.CursorIsNull(LibClang.GetCursorDefinition(declaration)) != 0)
                _opaqueTypedefs.Add(name);
        }

        // Pass 2: the model, per file, in source order.
        var models = new Dictionary<string, HeaderModel>(StringComparer.Ordinal);
        HeaderModel ModelOf(string file)
        {
            var key = Path.GetRelativePath(_includeDir, Path.GetFullPath(file)).Replace('\\', '/');
            if (!models.TryGetValue(key, out var model)) models[key] = model = new HeaderModel(key);
            return model;
        }

        var seenFunctions = new HashSet<string>(StringComparer.Ordinal);
        var seenConstants = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (cursor, file) in top)
        {
            switch (cursor.Kind)
            {
                case CXCursorKind.MacroDefinition:
                    if (TryConstant(cursor, file) is { } constant && seenConstants.Add(constant.Name))
                        ModelOf(file).Constants.Add(constant);
                    break;
                case CXCursorKind.TypedefDecl:
                    AddTypedef(cursor, ModelOf(file));
                    break;
                case CXCursorKind.FunctionDecl:
                    var name = LibClang.Spelling(cursor);
                    if (seenFunctions.Add(name)) ModelOf(file).Functions.Add(Function(cursor));
                    break;
            }
        }
        return models.Values.Where(m => !m.IsEmpty).OrderBy(m => m.FileName, StringComparer.Ordinal).ToList();
    }

    private void AddTypedef(CXCursor typedef, HeaderModel model)
    {
        var name = LibClang.Spelling(typedef);
        if (!_knownTypedefs.Contains(name)) return;
        var doc = Comment(typedef);
        var declaration = LibClang.GetTypeDeclaration(LibClang.GetCanonicalType(LibClang.GetTypedefDeclUnderlyingType(typedef)));
        if (_opaqueTypedefs.Contains(name))
        {
            model.Opaques.Add(new OpaqueModel(name, doc));
            return;
        }
        var definition = LibClang.GetCursorDefinition(declaration);
        if (doc.Length == 0) doc = Comment(definition);
        if (declaration.Kind == CXCursorKind.EnumDecl)
        {
            var underlying = Primitive(LibClang.GetCanonicalType(LibClang.GetEnumDeclIntegerType(definition)));
            var members = LibClang.Children(definition)
                .Where(c => c.Kind == CXCursorKind.EnumConstantDecl)
                .Select(c => new EnumMemberModel(LibClang.Spelling(c), LibClang.GetEnumConstantDeclValue(c), Comment(c)))
                .ToList();
            model.Enums.Add(new EnumModel(name, underlying, members, doc));
            return;
        }
        var recordType = LibClang.GetCursorType(definition);
        var fields = new List<FieldModel>();
        foreach (var field in LibClang.Children(definition).Where(c => c.Kind == CXCursorKind.FieldDecl))
        {
            var fieldName = LibClang.Spelling(field);
            var type = LibClang.GetCursorType(field);
            var offsetBits = OffsetOf(recordType, fieldName);
            if (type.Kind == CXTypeKind.ConstantArray)
            {
                var element = MapType(LibClang.GetArrayElementType(type));
                fields.Add(new FieldModel(fieldName, element, LibClang.Spelling(type), (int)LibClang.GetArraySize(type),
                    offsetBits / 8, Comment(field)));
            }
            else
            {
                fields.Add(new FieldModel(fieldName, MapType(type), LibClang.Spelling(type), 0, offsetBits / 8, Comment(field)));
            }
        }
        model.Structs.Add(new StructModel(name, LibClang.TypeGetSizeOf(recordType), fields, doc));
    }

    private static long OffsetOf(CXType record, string field)
    {
        var pointer = Marshal.StringToCoTaskMemUTF8(field);
        try
        {
            var bits = LibClang.TypeGetOffsetOf(record, (byte*)pointer);
            if (bits < 0) throw new InvalidOperationException($"libclang has no offset for field {field}");
            return bits;
        }
        finally
        {
            Marshal.FreeCoTaskMem(pointer);
        }
    }

    private FunctionModel Function(CXCursor cursor)
    {
        var parameters = new List<ParameterModel>();
        var count = LibClang.CursorGetNumArguments(cursor);
        for (var i = 0; i < count; i++)
        {
            var argument = LibClang.CursorGetArgument(cursor, (uint)i);
            var name = LibClang.Spelling(argument);
            if (name.Length == 0) name = $"arg{i}";
            var type = LibClang.GetCursorType(argument);
            parameters.Add(new ParameterModel(name, MapType(type), LibClang.Spelling(type)));
        }
        var result = LibClang.GetCursorResultType(cursor);
        return new FunctionModel(LibClang.Spelling(cursor), MapType(result), LibClang.Spelling(result), parameters, Comment(cursor));
    }

    /// <summary>The C# spelling of a C type: our typedef names kept, everything else by canonical kind.</summary>
    private string MapType(CXType type)
    {
        switch (type.Kind)
        {
            case CXTypeKind.Pointer:
            {
                var pointee = LibClang.GetPointeeType(type);
                if (LibClang.GetCanonicalType(pointee).Kind == CXTypeKind.FunctionProto) return "nint";
                return MapType(pointee) + "*";
            }
            case CXTypeKind.Typedef:
            {
                var name = LibClang.Spelling(LibClang.GetTypeDeclaration(type));
                return _knownTypedefs.Contains(name) ? name : MapType(LibClang.GetCanonicalType(type));
            }
            case CXTypeKind.Elaborated:
            case CXTypeKind.Record:
            case CXTypeKind.Enum:
            {
                var canonical = LibClang.GetCanonicalType(type);
                if (canonical.Kind is CXTypeKind.Record or CXTypeKind.Enum)
                {
                    var tag = LibClang.Spelling(LibClang.GetTypeDeclaration(canonical));
                    if (_tagToTypedef.TryGetValue(tag, out var typedef)) return typedef;
                    throw new InvalidOperationException($"type {LibClang.Spelling(type)} has no typedef in the eplb headers");
                }
                return MapType(canonical);
            }
            default:
                return Primitive(type);
        }
    }

    private static string Primitive(CXType type) => type.Kind switch
    {
        CXTypeKind.Void => "void",
        CXTypeKind.Bool => "byte",
        CXTypeKind.CharS or CXTypeKind.CharU or CXTypeKind.UChar => "byte",
        CXTypeKind.SChar => "sbyte",
        CXTypeKind.Short => "short",
        CXTypeKind.UShort => "ushort",
        CXTypeKind.Int => "int",
        CXTypeKind.UInt => "uint",
        // LP64: long is 64-bit (the target is fixed to x86_64 Linux above).
        CXTypeKind.Long or CXTypeKind.LongLong => "long",
        CXTypeKind.ULong or CXTypeKind.ULongLong => "ulong",
        CXTypeKind.Float => "float",
        CXTypeKind.Double => "double",
        _ => throw new InvalidOperationException($"unsupported C type {LibClang.Spelling(type)} (kind {type.Kind})"),
    };

    private ConstantModel? TryConstant(CXCursor cursor, string file)
    {
        if (LibClang.CursorIsMacroFunctionLike(cursor) != 0) return null;
        var tokens = LibClang.Tokens(_unit, cursor);
        if (tokens.Count < 2) return null;
        var text = string.Concat(tokens.Skip(1)).Trim();
        while (text.StartsWith('(') && text.EndsWith(')')) text = text[1..^1].Trim();
        var negative = text.StartsWith('-');
        if (negative) text = text[1..];
        text = text.TrimEnd('u', 'U', 'l', 'L');
        long value;
        if (text.StartsWith("0x", StringComparison.OrdinalIgnoreCase))
        {
            if (!long.TryParse(text[2..], NumberStyles.HexNumber, CultureInfo.InvariantCulture, out value)) return null;
        }
        else if (!long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out value))
        {
            return null;
        }
        return new ConstantModel(tokens[0], negative ? -value : value, CommentAboveLine(file, cursor));
    }

    private static string Comment(CXCursor cursor) => CleanComment(LibClang.Take(LibClang.CursorGetRawCommentText(cursor)));

    // libclang attaches no comments to macros: read the comment block right above the line.
    private static string CommentAboveLine(string file, CXCursor cursor)
    {
        nint cxFile = 0;
        uint line, column, offset;
        LibClang.GetExpansionLocation(LibClang.GetCursorLocation(cursor), &cxFile, &line, &column, &offset);
        var lines = File.ReadAllLines(file);
        var end = (int)line - 2;  // the line above the #define (0-based)
        var start = end;
        while (start >= 0)
        {
            var trimmed = lines[start].Trim();
            if (trimmed.StartsWith("//") || trimmed.StartsWith("/*") || trimmed.StartsWith('*') || trimmed.EndsWith("*/"))
            {
                if (trimmed.StartsWith("/*") || trimmed.StartsWith("//") && (start == 0 || !lines[start - 1].Trim().StartsWith("//")))
                    break;
                start--;
            }
            else
            {
                return "";
            }
        }
        return start < 0 || end < start ? "" : CleanComment(string.Join("\n", lines[start..(end + 1)]));
    }

    /// <summary>Comment text without the comment markers, one logical line per source line.</summary>
    internal static string CleanComment(string raw)
    {
        if (string.IsNullOrWhiteSpace(raw)) return "";
        var builder = new StringBuilder();
        foreach (var rawLine in raw.Replace("\r", "").Split('\n'))
        {
            var line = rawLine.Trim();
            if (line.StartsWith("/**")) line = line[3..];
            else if (line.StartsWith("/*")) line = line[2..];
            else if (line.StartsWith("///")) line = line[3..];
            else if (line.StartsWith("//")) line = line[2..];
            if (line.EndsWith("*/")) line = line[..^2];
            line = line.Trim();
            if (line.StartsWith('*')) line = line[1..].Trim();
            if (builder.Length > 0) builder.Append('\n');
            builder.Append(line);
        }
        return builder.ToString().Trim('\n', ' ');
    }
}
