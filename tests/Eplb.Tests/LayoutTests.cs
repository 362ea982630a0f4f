using System.Reflection;
using System.Runtime.InteropServices;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// The generated structs have the sizes and offsets libclang computed from eplb.h (the C side
/// asserts the same numbers with static_assert in eplb_abi_layout.g.h).
/// </summary>
public class LayoutTests
{
    private static IEnumerable<StructLayoutInfo> Structs() =>
        typeof(NativeLayout).GetFields(BindingFlags.Static | BindingFlags.NonPublic | BindingFlags.Public)
            .Where(f => f.FieldType == typeof(StructLayoutInfo[]))
            .SelectMany(f => (StructLayoutInfo[])f.GetValue(null)!);

    [Test]
    public void EveryHeaderStructIsListed()
    {
        var names = Structs().Select(s => s.Name).ToList();
        Assert.That(names, Does.Contain("eplb_runtime_info_t").And.Contain("eplb_buffer_info_t").And.Contain("eplb_expert_map_t"));
    }

    private static IEnumerable<string> StructNames() => Structs().Select(s => s.Name);

    [TestCaseSource(nameof(StructNames))]
    public void SizeAndOffsetsMatchTheHeader(string name)
    {
        var layout = Structs().Single(s => s.Name == name);
        Assert.That(Marshal.SizeOf(layout.Type), Is.EqualTo(layout.Size), $"sizeof({layout.Name})");
        foreach (var (field, offset) in layout.Fields)
            Assert.That((long)Marshal.OffsetOf(layout.Type, field), Is.EqualTo(offset), $"offsetof({layout.Name}, {field})");
    }

    // Public enums written by hand beside the ones the bindings generate: same values, same names.
    [TestCase(typeof(Backend), typeof(eplb_backend_t), "EPLB_BACKEND_")]
    [TestCase(typeof(ReplicaSelection), typeof(eplb_replica_selection_t), "EPLB_REPLICA_SELECTION_")]
    [TestCase(typeof(RoutingScore), typeof(eplb_routing_score_t), "EPLB_ROUTING_SCORE_")]
    [TestCase(typeof(EplbStatus), typeof(eplb_status_t), "EPLB_STATUS_")]
    public void PublicEnumsMirrorTheHeader(Type mirror, Type native, string prefix)
    {
        static string Pascal(string name, string prefix) =>
            string.Concat(name[prefix.Length..].Split('_').Select(p => p[..1] + p[1..].ToLowerInvariant()));
        var expected = Enum.GetValues(native).Cast<object>().ToDictionary(v => Convert.ToInt64(v), v => Pascal(v.ToString()!, prefix));
        var actual = Enum.GetValues(mirror).Cast<object>().ToDictionary(v => Convert.ToInt64(v), v => v.ToString()!);
        Assert.That(actual, Is.EquivalentTo(expected));
    }
}
