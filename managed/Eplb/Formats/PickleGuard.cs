using System.Buffers.Binary;
using System.Text;

using Eplb.Load;
using Eplb.Placement;

namespace Eplb.Formats;

/// <summary>
/// Walks a pickle's opcodes before anything unpickles it, and refuses every opcode and every global
/// that a <c>torch.save</c> archive of tensors, numbers, strings, lists and dicts does not need.
/// </summary>
/// <remarks>
/// Razorvine.Pickle cannot be restricted by itself: its constructor registry is process-wide and an
/// unknown global silently becomes a <c>ClassDict</c>. This walk is the allow-list that Python's
/// <c>Unpickler.find_class</c> override (and <c>torch.load(weights_only=True)</c>) would be. It knows
/// only each opcode's argument length (the pickle protocol's <c>pickletools</c> table); Razorvine does
/// the unpickling. Both stop at the first STOP, so they read the same opcodes.
/// </remarks>
internal static class PickleGuard
{
    private enum Arg
    {
        None,
        Fixed1,
        Fixed2,
        Fixed4,
        Fixed8,
        Line,       // one '\n'-terminated line
        TwoLines,   // GLOBAL and INST: module and name lines
        Counted1,   // a 1-byte length, then that many bytes
        Counted4,   // a 4-byte little-endian length, then that many bytes
        Counted8,   // an 8-byte little-endian length, then that many bytes
    }

    private readonly record struct Opcode(string Name, Arg Arg, bool Allowed);

    // Every opcode of pickle protocols 0-5 (CPython's Lib/pickletools.py), and whether torch.save's
    // protocol-2 pickles (plus protocol-4 framing and short strings) need it.
    private static readonly Dictionary<byte, Opcode> Opcodes = new()
    {
        [(byte)'('] = new("MARK", Arg.None, true),
        [(byte)'.'] = new("STOP", Arg.None, true),
        [(byte)'0'] = new("POP", Arg.None, false),
        [(byte)'1'] = new("POP_MARK", Arg.None, false),
        [(byte)'2'] = new("DUP", Arg.None, false),
        [(byte)'F'] = new("FLOAT", Arg.Line, false),
        [(byte)'I'] = new("INT", Arg.Line, true),
        [(byte)'J'] = new("BININT", Arg.Fixed4, true),
        [(byte)'K'] = new("BININT1", Arg.Fixed1, true),
        [(byte)'L'] = new("LONG", Arg.Line, false),
        [(byte)'M'] = new("BININT2", Arg.Fixed2, true),
        [(byte)'N'] = new("NONE", Arg.None, true),
        [(byte)'P'] = new("PERSID", Arg.Line, false),
        [(byte)'Q'] = new("BINPERSID", Arg.None, true),
        [(byte)'R'] = new("REDUCE", Arg.None, true),
        [(byte)'S'] = new("STRING", Arg.Line, false),
        [(byte)'T'] = new("BINSTRING", Arg.Counted4, false),
        [(byte)'U'] = new("SHORT_BINSTRING", Arg.Counted1, false),
        [(byte)'V'] = new("UNICODE", Arg.Line, false),
        [(byte)'X'] = new("BINUNICODE", Arg.Counted4, true),
        [(byte)'a'] = new("APPEND", Arg.None, true),
        [(byte)'b'] = new("BUILD", Arg.None, false),
        [(byte)'c'] = new("GLOBAL", Arg.TwoLines, true),
        [(byte)'d'] = new("DICT", Arg.None, true),
        [(byte)'}'] = new("EMPTY_DICT", Arg.None, true),
        [(byte)'e'] = new("APPENDS", Arg.None, true),
        [(byte)'g'] = new("GET", Arg.Line, false),
        [(byte)'h'] = new("BINGET", Arg.Fixed1, true),
        [(byte)'i'] = new("INST", Arg.TwoLines, false),
        [(byte)'j'] = new("LONG_BINGET", Arg.Fixed4, true),
        [(byte)'l'] = new("LIST", Arg.None, true),
        [(byte)']'] = new("EMPTY_LIST", Arg.None, true),
        [(byte)'o'] = new("OBJ", Arg.None, false),
        [(byte)'p'] = new("PUT", Arg.Line, false),
        [(byte)'q'] = new("BINPUT", Arg.Fixed1, true),
        [(byte)'r'] = new("LONG_BINPUT", Arg.Fixed4, true),
        [(byte)'s'] = new("SETITEM", Arg.None, true),
        [(byte)'t'] = new("TUPLE", Arg.None, true),
        [(byte)')'] = new("EMPTY_TUPLE", Arg.None, true),
        [(byte)'u'] = new("SETITEMS", Arg.None, true),
        [(byte)'G'] = new("BINFLOAT", Arg.Fixed8, true),
        [0x80] = new("PROTO", Arg.Fixed1, true),
        [0x81] = new("NEWOBJ", Arg.None, false),
        [0x82] = new("EXT1", Arg.Fixed1, false),
        [0x83] = new("EXT2", Arg.Fixed2, false),
        [0x84] = new("EXT4", Arg.Fixed4, false),
        [0x85] = new("TUPLE1", Arg.None, true),
        [0x86] = new("TUPLE2", Arg.None, true),
        [0x87] = new("TUPLE3", Arg.None, true),
        [0x88] = new("NEWTRUE", Arg.None, true),
        [0x89] = new("NEWFALSE", Arg.None, true),
        [0x8a] = new("LONG1", Arg.Counted1, true),
        [0x8b] = new("LONG4", Arg.Counted4, false),
        [(byte)'B'] = new("BINBYTES", Arg.Counted4, false),
        [(byte)'C'] = new("SHORT_BINBYTES", Arg.Counted1, false),
        [0x8c] = new("SHORT_BINUNICODE", Arg.Counted1, true),
        [0x8d] = new("BINUNICODE8", Arg.Counted8, true),
        [0x8e] = new("BINBYTES8", Arg.Counted8, false),
        [0x8f] = new("EMPTY_SET", Arg.None, false),
        [0x90] = new("ADDITEMS", Arg.None, false),
        [0x91] = new("FROZENSET", Arg.None, false),
        [0x92] = new("NEWOBJ_EX", Arg.None, false),
        [0x93] = new("STACK_GLOBAL", Arg.None, false),
        [0x94] = new("MEMOIZE", Arg.None, true),
        [0x95] = new("FRAME", Arg.Fixed8, true),
        [0x96] = new("BYTEARRAY8", Arg.Counted8, false),
        [0x97] = new("NEXT_BUFFER", Arg.None, false),
        [0x98] = new("READONLY_BUFFER", Arg.None, false),
    };

    /// <summary>The highest pickle protocol the walk (and Razorvine) reads.</summary>
    public const int HighestProtocol = 5;

    /// <summary>
    /// Checks every opcode up to the first STOP and that nothing follows it. <paramref name="checkGlobal"/>
    /// gets each GLOBAL's module and name and returns why it is refused, or null to allow it.
    /// </summary>
    /// <exception cref="InvalidDataException">The first refused or malformed opcode, with its byte offset.</exception>
    public static void Check(ReadOnlySpan<byte> pickle, Func<string, string, string?> checkGlobal)
    {
        var at = 0;
        while (true)
        {
            if (at >= pickle.Length) throw new InvalidDataException($"the pickle ends at byte {pickle.Length} without a STOP opcode (truncated?)");
            var code = pickle[at];
            if (!Opcodes.TryGetValue(code, out var op))
                throw new InvalidDataException($"unknown pickle opcode 0x{code:x2} at byte {at}");
            if (!op.Allowed)
                throw new InvalidDataException($"pickle opcode {op.Name} (0x{code:x2}) at byte {at} is not allowed: a tensor archive needs only tensors, numbers, strings, lists and dicts");
            var start = at++;
            switch (op.Arg)
            {
                case Arg.None:
                    break;
                case Arg.Fixed1:
                case Arg.Fixed2:
                case Arg.Fixed4:
                case Arg.Fixed8:
                    var width = op.Arg switch { Arg.Fixed1 => 1, Arg.Fixed2 => 2, Arg.Fixed4 => 4, _ => 8 };
                    Need(pickle, at, width, op, start);
                    if (code == 0x80 && pickle[at] > HighestProtocol)
                        throw new InvalidDataException($"pickle protocol {pickle[at]} is above {HighestProtocol}");
                    at += width;
                    break;
                case Arg.Line:
                    at = LineEnd(pickle, at, op, start) + 1;
                    break;
                case Arg.TwoLines:
                    var moduleEnd = LineEnd(pickle, at, op, start);
                    var nameEnd = LineEnd(pickle, moduleEnd + 1, op, start);
                    var module = Encoding.UTF8.GetString(pickle[at..moduleEnd]);
                    var name = Encoding.UTF8.GetString(pickle[(moduleEnd + 1)..nameEnd]);
                    if (checkGlobal(module, name) is { } refusal)
                        throw new InvalidDataException($"pickle global {module}.{name} at byte {start} is refused: {refusal}");
                    at = nameEnd + 1;
                    break;
                case Arg.Counted1:
                case Arg.Counted4:
                case Arg.Counted8:
                    var prefix = op.Arg switch { Arg.Counted1 => 1, Arg.Counted4 => 4, _ => 8 };
                    Need(pickle, at, prefix, op, start);
                    var length = op.Arg switch
                    {
                        Arg.Counted1 => pickle[at],
                        Arg.Counted4 => (long)BinaryPrimitives.ReadUInt32LittleEndian(pickle[at..]),
                        _ => BinaryPrimitives.ReadInt64LittleEndian(pickle[at..]),
                    };
                    at += prefix;
                    if (length < 0 || length > pickle.Length - at)
                        throw new InvalidDataException($"pickle opcode {op.Name} at byte {start} declares {length} bytes, but {pickle.Length - at} remain");
                    at += (int)length;
                    break;
            }
            if (code == (byte)'.')
            {
                if (at != pickle.Length)
                    throw new InvalidDataException($"{pickle.Length - at} bytes follow the pickle's STOP opcode at byte {start}");
                return;
            }
        }
    }

    private static void Need(ReadOnlySpan<byte> pickle, int at, int count, Opcode op, int start)
    {
        if (pickle.Length - at < count)
            throw new InvalidDataException($"the pickle ends inside opcode {op.Name} at byte {start} (truncated?)");
    }

    private static int LineEnd(ReadOnlySpan<byte> pickle, int at, Opcode op, int start)
    {
        var end = at < pickle.Length ? pickle[at..].IndexOf((byte)'\n') : -1;
        if (end < 0) throw new InvalidDataException($"the pickle ends inside opcode {op.Name} at byte {start} (truncated?)");
        return at + end;
    }
}
