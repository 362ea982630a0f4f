// What the generator reads out of the headers: a language-neutral model of the ABI.
namespace Eplb.Bindings.Generator;

/// <summary>An integer <c>#define</c>.</summary>
internal sealed record ConstantModel(string Name, long Value, string Doc);

internal sealed record EnumMemberModel(string Name, long Value, string Doc);

/// <summary>A C enum, named by its typedef.</summary>
internal sealed record EnumModel(string Name, string UnderlyingType, IReadOnlyList<EnumMemberModel> Members, string Doc);

/// <summary>A struct field. <paramref name="ArrayLength"/> is 0 unless the field is a fixed array.</summary>
internal sealed record FieldModel(string Name, string CSharpType, string CType, int ArrayLength, long Offset, string Doc);

/// <summary>A C struct with a definition, named by its typedef.</summary>
internal sealed record StructModel(string Name, long Size, IReadOnlyList<FieldModel> Fields, string Doc);

/// <summary>A struct declared but never defined: only pointers to it cross the ABI.</summary>
internal sealed record OpaqueModel(string Name, string Doc);

internal sealed record ParameterModel(string Name, string CSharpType, string CType);

internal sealed record FunctionModel(string Name, string ReturnCSharpType, string ReturnCType,
    IReadOnlyList<ParameterModel> Parameters, string Doc)
{
    /// <summary>The C prototype, as written above each binding.</summary>
    public string Prototype =>
        $"{ReturnCType} {Name}({(Parameters.Count == 0 ? "void" : string.Join(", ", Parameters.Select(p => $"{p.CType} {p.Name}")))})";
}

/// <summary>Everything one header file declares, in source order.</summary>
internal sealed class HeaderModel(string fileName)
{
    public string FileName { get; } = fileName;
    public List<ConstantModel> Constants { get; } = [];
    public List<EnumModel> Enums { get; } = [];
    public List<StructModel> Structs { get; } = [];
    public List<OpaqueModel> Opaques { get; } = [];
    public List<FunctionModel> Functions { get; } = [];

    public bool IsEmpty => Constants.Count + Enums.Count + Structs.Count + Opaques.Count + Functions.Count == 0;
}
