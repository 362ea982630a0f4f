using Eplb.Kernels;
using Eplb.Migration;
using Eplb.Runtime;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace Eplb.TorchSharp.Tests;

/// <summary>
/// TorchSharp tensors as Eplb buffers and expert views (issue 16 §1, §3): the tensor's own memory,
/// never a copy — what torch writes Eplb reads and the other way round.
/// </summary>
public class TensorMemoryTests
{
    [Test]
    public void WrappingATensorNeverCopiesIt()
    {
        var random = TestSupport.NewRandom();
        var t = TestSupport.Uniform(random, 1f, 5, 7);
        using var buffer = TensorMemory.Wrap<float>(t);
        Assert.That((buffer.Backend, buffer.Device, buffer.Length, buffer.IsWrapped), Is.EqualTo((Backend.Cpu, -1, 35L, true)));
        Assert.That(buffer.ToArray(), Is.EqualTo(t.data<float>().ToArray()));

        // torch writes, Eplb reads.
        t[2, 3] = tensor(42.5f);
        Assert.That(buffer.ToArray()[2 * 7 + 3], Is.EqualTo(42.5f));
        t.mul_(2f);
        Assert.That(buffer.ToArray(), Is.EqualTo(t.data<float>().ToArray()));
        // Eplb writes, torch reads.
        buffer.Fill(-1.25f, 7, 7);
        Assert.That(t[1].data<float>().ToArray(), Is.All.EqualTo(-1.25f));
        var values = Enumerable.Range(0, 35).Select(i => (float)i).ToArray();
        buffer.CopyFrom(values);
        Assert.That(t.data<float>().ToArray(), Is.EqualTo(values));
    }

    [Test]
    public void ViewsWithAStorageOffsetAndEveryElementTypeReachTheirOwnElements()
    {
        var random = TestSupport.NewRandom();
        var stacked = TestSupport.Uniform(random, 1f, 4, 3, 5);
        var third = stacked[2];  // a view: storage offset 30
        using (var buffer = TensorMemory.Wrap<float>(third))
        {
            buffer.Fill(9f);
            Assert.That(stacked[2].data<float>().ToArray(), Is.All.EqualTo(9f));
            Assert.That(stacked[1].data<float>().ToArray(), Is.Not.All.EqualTo(9f));
        }

        var bf16 = stacked.to(ScalarType.BFloat16);
        using (var buffer = TensorMemory.Wrap<BFloat16>(bf16))
        {
            var want = stacked.data<float>().ToArray().Select(v => ((BFloat16)v).Bits);
            Assert.That(buffer.ToArray().Select(v => v.Bits), Is.EqualTo(want), "torch's bf16 rounding equals Eplb's (RNE)");
            buffer.Fill((BFloat16)0.5f, 0, 1);
            Assert.That(bf16[0, 0, 0].to(ScalarType.Float32).item<float>(), Is.EqualTo(0.5f));
        }

        var longs = arange(10, dtype: ScalarType.Int64);
        using (var buffer = TensorMemory.Wrap<long>(longs[3..]))
            Assert.That(buffer.ToArray(), Is.EqualTo(new long[] { 3, 4, 5, 6, 7, 8, 9 }));
        var ints = zeros(6, dtype: ScalarType.Int32);
        using (var bytes = TensorMemory.WrapBytes(ints))
        {
            Assert.That(bytes.Length, Is.EqualTo(24));
            bytes.Fill(0x01, 4, 4);
            Assert.That(ints[1].item<int>(), Is.EqualTo(0x01010101));
        }
    }

    [Test]
    public void WhatCannotBeWrappedIsRefusedWithTheReason()
    {
        var matrix = zeros(3, 4);
        var notContiguous = Assert.Throws<ArgumentException>(() => TensorMemory.Wrap<float>(matrix.t()))!;
        Assert.That(notContiguous.Message, Does.Contain("not contiguous").And.Contain("[4, 3]"));
        var wrongType = Assert.Throws<ArgumentException>(() => TensorMemory.Wrap<int>(matrix))!;
        Assert.That(wrongType.Message, Does.Contain("Float32").And.Contain("Int32"));
        Assert.Throws<ArgumentException>(() => TensorMemory.Wrap<float>(zeros(0)));
        Assert.Throws<NotSupportedException>(() => TensorMemory.Wrap<ulong>(matrix));
    }

    [Test]
    public void ExpertTensorsOverStackedParametersMoveEveryTensorOfAnExpertInPlace()
    {
        var random = TestSupport.NewRandom();
        const int slots = 3, hidden = 8, intermediate = 4;
        var w13 = TestSupport.Uniform(random, 1f, slots, 2 * intermediate, hidden).to(ScalarType.BFloat16);
        var w2 = TestSupport.Uniform(random, 1f, slots, hidden, intermediate).to(ScalarType.BFloat16);
        var scale = TestSupport.Uniform(random, 1f, slots, 2 * intermediate / 4, hidden / 4);  // block scales, float32
        var before = new[] { w13, w2, scale }.Select(t => Enumerable.Range(0, slots).Select(j => TestSupport.Bytes(t[j])).ToArray()).ToArray();
        using var layer = new TorchExpertLayer([("w13", w13), ("w2", w2), ("w13_scale", scale)]);
        Assert.That(layer.SlotsPerRank, Is.EqualTo(slots));
        Assert.That(layer.ExpertTensors.Select(t => (t.Name, t.BytesPerExpert)),
            Is.EqualTo(new[] { ("w13", 2L * intermediate * hidden * 2), ("w2", 2L * hidden * intermediate), ("w13_scale", 4L * 2 * 2) }));
        Assert.That(layer["w2"], Is.SameAs(w2));

        // Expert 2 into slot 0 on every tensor: the tensors the model computes with change.
        foreach (var tensor in layer.ExpertTensors) tensor.CopySlotFrom(tensor, 2, 0);
        var all = new[] { w13, w2, scale };
        for (var t = 0; t < 3; t++)
        {
            Assert.That(TestSupport.Bytes(all[t][0]), Is.EqualTo(before[t][2]), $"tensor {t}: slot 0 now holds expert 2");
            Assert.That(TestSupport.Bytes(all[t][1]), Is.EqualTo(before[t][1]), $"tensor {t}: slot 1 untouched");
        }
        // And what torch writes is what the view reads.
        w2[1].fill_(1f);
        Assert.That(layer.ExpertTensors[1].ReadSlot(1), Is.EqualTo(TestSupport.Bytes(w2[1])));

        Assert.Throws<ArgumentException>(() => new TorchExpertLayer([("a", zeros(3, 2)), ("b", zeros(4, 2))]), "slots disagree");
        Assert.Throws<ArgumentException>(() => new TorchExpertLayer([("a", zeros(3, 2)), ("a", zeros(3, 2))]), "name twice");
        Assert.Throws<ArgumentException>(() => new TorchExpertLayer([]));
    }

    [Test]
    public void TheMixtureOfExpertsHelperReadsModulesAndChecksTheirShapes()
    {
        var random = TestSupport.NewRandom();
        using var moduleA = new ExpertsModule(random, slots: 2);
        using var moduleB = new ExpertsModule(random, slots: 2);
        using var moe = TorchMixtureOfExperts.FromModules(1, logicalExperts: 3, slots: 4, [moduleA, moduleB], name => name != "gate");
        Assert.That((moe.Rank, moe.Layers, moe.SlotsPerRank, moe.Backend), Is.EqualTo((1, 2, 2, Backend.Cpu)));
        Assert.That(moe.Layer(0).Names, Is.EqualTo(new[] { "w13", "w2" }));
        Assert.That(moe.GetExpertWeights(1)[0].BytesPerExpert, Is.EqualTo(6 * 4 * 4));
        Assert.That(moe.ExpertMap(0).ToArray(), Is.EqualTo(new[] { 0, 1, 2, 0 }), "slot s holds expert s mod N at first");
        Assert.That(moe.LocalSlots(0, 0), Is.EqualTo(new[] { 1 }), "rank 1 holds slots 2, 3: experts 2, 0");

        Assert.Throws<ArgumentOutOfRangeException>(() => TorchMixtureOfExperts.FromModules(2, 3, 4, [moduleA], name => name != "gate"), "rank 2 of 2");
        Assert.Throws<ArgumentException>(() => TorchMixtureOfExperts.FromModules(0, 3, 5, [moduleA], name => name != "gate"), "2 does not divide 5");
        Assert.Throws<ArgumentException>(() => TorchMixtureOfExperts.FromModules(0, 3, 4, [moduleA], name => name == "none"));
    }

    private sealed class ExpertsModule : nn.Module
    {
        public ExpertsModule(Random random, int slots) : base("experts")
        {
            register_parameter("gate", nn.Parameter(TestSupport.Uniform(random, 1f, 4, 3)));
            register_parameter("w13", nn.Parameter(TestSupport.Uniform(random, 1f, slots, 6, 4)));
            register_parameter("w2", nn.Parameter(TestSupport.Uniform(random, 1f, slots, 4, 3)));
        }
    }
}
