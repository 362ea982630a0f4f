// The slice of libclang's C API (clang-c/Index.h, LLVM 14) the generator uses, bound by hand:
// NuGet has no ClangSharp here, and this is all we need.
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Eplb.Bindings.Generator;

[StructLayout(LayoutKind.Sequential)]
internal struct CXString
{
    public nint Data;
    public uint PrivateFlags;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CXCursor
{
    public CXCursorKind Kind;
    public int XData;
    public nint Data0, Data1, Data2;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CXType
{
    public CXTypeKind Kind;
    public nint Data0, Data1;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CXSourceLocation
{
    public nint Ptr0, Ptr1;
    public uint IntData;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CXSourceRange
{
    public nint Ptr0, Ptr1;
    public uint BeginIntData, EndIntData;
}

[StructLayout(LayoutKind.Sequential)]
internal struct CXToken
{
    public uint Int0, Int1, Int2, Int3;
    public nint PtrData;
}

internal enum CXCursorKind
{
    StructDecl = 2,
    UnionDecl = 3,
    EnumDecl = 5,
    FieldDecl = 6,
    EnumConstantDecl = 7,
    FunctionDecl = 8,
    ParmDecl = 10,
    TypedefDecl = 20,
    MacroDefinition = 501,
}

internal enum CXTypeKind
{
    Invalid = 0,
    Void = 2,
    Bool = 3,
    CharU = 4,
    UChar = 5,
    UShort = 8,
    UInt = 9,
    ULong = 10,
    ULongLong = 11,
    CharS = 13,
    SChar = 14,
    Short = 16,
    Int = 17,
    Long = 18,
    LongLong = 19,
    Float = 21,
    Double = 22,
    Pointer = 101,
    Record = 105,
    Enum = 106,
    Typedef = 107,
    FunctionProto = 111,
    ConstantArray = 112,
    Elaborated = 119,
}

internal enum CXChildVisitResult
{
    Break = 0,
    Continue = 1,
    Recurse = 2,
}

internal static unsafe partial class LibClang
{
    private const string Name = "clang";

    // libclang1-14 ships libclang-14.so.1 only (no unversioned libclang.so): resolve it explicitly,
    // with LIBCLANG_PATH as an override.
    static LibClang()
    {
        NativeLibrary.SetDllImportResolver(typeof(LibClang).Assembly, (name, assembly, path) =>
        {
            if (name != Name) return 0;
            var candidates = new List<string>();
            var overridePath = Environment.GetEnvironmentVariable("LIBCLANG_PATH");
            if (!string.IsNullOrEmpty(overridePath)) candidates.Add(overridePath);
            candidates.AddRange(["libclang-14.so.1", "libclang.so.1", "libclang-14.so", "libclang.so",
                "/usr/lib/x86_64-linux-gnu/libclang-14.so.1", "/usr/lib/llvm-14/lib/libclang.so.1"]);
            foreach (var candidate in candidates)
                if (NativeLibrary.TryLoad(candidate, out var handle)) return handle;
            throw new DllNotFoundException(
                "libclang was not found (tried " + string.Join(", ", candidates) + "). " +
                "Install it (Debian: apt-get install libclang1-14) or set LIBCLANG_PATH to the library file.");
        });
    }

    public const uint DetailedPreprocessingRecord = 0x01;
    public const uint SkipFunctionBodies = 0x40;

    [LibraryImport(Name, EntryPoint = "clang_createIndex")]
    public static partial nint CreateIndex(int excludeDeclarationsFromPch, int displayDiagnostics);

    [LibraryImport(Name, EntryPoint = "clang_disposeIndex")]
    public static partial void DisposeIndex(nint index);

    [LibraryImport(Name, EntryPoint = "clang_parseTranslationUnit")]
    public static partial nint ParseTranslationUnit(nint index, byte* sourceFilename, byte** commandLineArgs,
        int numCommandLineArgs, void* unsavedFiles, uint numUnsavedFiles, uint options);

    [LibraryImport(Name, EntryPoint = "clang_disposeTranslationUnit")]
    public static partial void DisposeTranslationUnit(nint unit);

    [LibraryImport(Name, EntryPoint = "clang_getNumDiagnostics")]
    public static partial uint GetNumDiagnostics(nint unit);

    [LibraryImport(Name, EntryPoint = "clang_getDiagnostic")]
    public static partial nint GetDiagnostic(nint unit, uint index);

    [LibraryImport(Name, EntryPoint = "clang_getDiagnosticSeverity")]
    public static partial int GetDiagnosticSeverity(nint diagnostic);

    [LibraryImport(Name, EntryPoint = "clang_formatDiagnostic")]
    public static partial CXString FormatDiagnostic(nint diagnostic, uint options);

    [LibraryImport(Name, EntryPoint = "clang_disposeDiagnostic")]
    public static partial void DisposeDiagnostic(nint diagnostic);

    [LibraryImport(Name, EntryPoint = "clang_getTranslationUnitCursor")]
    public static partial CXCursor GetTranslationUnitCursor(nint unit);

    [LibraryImport(Name, EntryPoint = "clang_visitChildren")]
    public static partial uint VisitChildren(CXCursor parent,
        delegate* unmanaged[Cdecl]<CXCursor, CXCursor, nint, CXChildVisitResult> visitor, nint clientData);

    [LibraryImport(Name, EntryPoint = "clang_getCursorKind")]
    public static partial CXCursorKind GetCursorKind(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getCursorSpelling")]
    public static partial CXString GetCursorSpelling(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getCString")]
    public static partial byte* GetCString(CXString text);

    [LibraryImport(Name, EntryPoint = "clang_disposeString")]
    public static partial void DisposeString(CXString text);

    [LibraryImport(Name, EntryPoint = "clang_getCursorType")]
    public static partial CXType GetCursorType(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getTypeSpelling")]
    public static partial CXString GetTypeSpelling(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_getCanonicalType")]
    public static partial CXType GetCanonicalType(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_getPointeeType")]
    public static partial CXType GetPointeeType(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_getTypeDeclaration")]
    public static partial CXCursor GetTypeDeclaration(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_getTypedefDeclUnderlyingType")]
    public static partial CXType GetTypedefDeclUnderlyingType(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getEnumDeclIntegerType")]
    public static partial CXType GetEnumDeclIntegerType(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getEnumConstantDeclValue")]
    public static partial long GetEnumConstantDeclValue(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getCursorResultType")]
    public static partial CXType GetCursorResultType(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_Cursor_getNumArguments")]
    public static partial int CursorGetNumArguments(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_Cursor_getArgument")]
    public static partial CXCursor CursorGetArgument(CXCursor cursor, uint index);

    [LibraryImport(Name, EntryPoint = "clang_Type_getSizeOf")]
    public static partial long TypeGetSizeOf(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_Type_getOffsetOf")]
    public static partial long TypeGetOffsetOf(CXType type, byte* field);

    [LibraryImport(Name, EntryPoint = "clang_getArraySize")]
    public static partial long GetArraySize(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_getArrayElementType")]
    public static partial CXType GetArrayElementType(CXType type);

    [LibraryImport(Name, EntryPoint = "clang_Cursor_getRawCommentText")]
    public static partial CXString CursorGetRawCommentText(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getCursorLocation")]
    public static partial CXSourceLocation GetCursorLocation(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getExpansionLocation")]
    public static partial void GetExpansionLocation(CXSourceLocation location, nint* file, uint* line, uint* column,
        uint* offset);

    [LibraryImport(Name, EntryPoint = "clang_getFileName")]
    public static partial CXString GetFileName(nint file);

    [LibraryImport(Name, EntryPoint = "clang_Cursor_isMacroFunctionLike")]
    public static partial uint CursorIsMacroFunctionLike(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getCursorExtent")]
    public static partial CXSourceRange GetCursorExtent(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_tokenize")]
    public static partial void Tokenize(nint unit, CXSourceRange range, CXToken** tokens, uint* numTokens);

    [LibraryImport(Name, EntryPoint = "clang_getTokenSpelling")]
    public static partial CXString GetTokenSpelling(nint unit, CXToken token);

    [LibraryImport(Name, EntryPoint = "clang_disposeTokens")]
    public static partial void DisposeTokens(nint unit, CXToken* tokens, uint numTokens);

    [LibraryImport(Name, EntryPoint = "clang_isCursorDefinition")]
    public static partial uint IsCursorDefinition(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_getCursorDefinition")]
    public static partial CXCursor GetCursorDefinition(CXCursor cursor);

    [LibraryImport(Name, EntryPoint = "clang_Cursor_isNull")]
    public static partial int CursorIsNull(CXCursor cursor);

    /// <summary>Copies a CXString into a managed string and disposes it.</summary>
    public static string Take(CXString text)
    {
        try
        {
            var pointer = GetCString(text);
            return pointer == null ? "" : Marshal.PtrToStringUTF8((nint)pointer) ?? "";
        }
        finally
        {
            DisposeString(text);
        }
    }

    public static string Spelling(CXCursor cursor) => Take(GetCursorSpelling(cursor));

    public static string Spelling(CXType type) => Take(GetTypeSpelling(type));

    /// <summary>The direct children of a cursor, in source order.</summary>
    public static List<CXCursor> Children(CXCursor parent)
    {
        var children = new List<CXCursor>();
        var handle = GCHandle.Alloc(children);
        try
        {
            VisitChildren(parent, &CollectChild, GCHandle.ToIntPtr(handle));
        }
        finally
        {
            handle.Free();
        }
        return children;
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static CXChildVisitResult CollectChild(CXCursor cursor, CXCursor parent, nint clientData)
    {
        var list = (List<CXCursor>)GCHandle.FromIntPtr(clientData).Target!;
        list.Add(cursor);
        return CXChildVisitResult.Continue;
    }

    /// <summary>The file a cursor was spelled in, or "" for built-ins.</summary>
    public static string FileOf(CXCursor cursor)
    {
        nint file = 0;
        uint line, column, offset;
        GetExpansionLocation(GetCursorLocation(cursor), &file, &line, &column, &offset);
        return file == 0 ? "" : Take(GetFileName(file));
    }

    /// <summary>The spelled tokens of a cursor's extent.</summary>
    public static List<string> Tokens(nint unit, CXCursor cursor)
    {
        CXToken* tokens = null;
        uint count = 0;
        Tokenize(unit, GetCursorExtent(cursor), &tokens, &count);
        var result = new List<string>((int)count);
        for (uint i = 0; i < count; i++) result.Add(Take(GetTokenSpelling(unit, tokens[i])));
        if (tokens != null) DisposeTokens(unit, tokens, count);
        return result;
    }
}
