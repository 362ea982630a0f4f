using System.Text;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Reading SGLang expert-distribution dumps (docs/design.md §8).</summary>
public class LoadTests
{
    [Test]
    public void RealDumpsHave58MoeLayersAfterDroppingDenseOnes([ValueSource(typeof(TestSupport), nameof(TestSupport.LoadFileNames))] string name)
    {
        var raw = ExpertLoad.Read(Path.Combine(TestSupport.LoadDataDir, name + ".json"));
        Assert.That(raw.Layers, Is.EqualTo(61));
        Assert.That(raw.LogicalExperts, Is.EqualTo(256));
        var moe = raw.WithoutEmptyLayers(out var dropped);
        Assert.That(dropped, Is.EqualTo(new[] { 0, 1, 2 }));
        Assert.That(moe.Layers, Is.EqualTo(58));
        Assert.That(moe.LayerIds[0], Is.EqualTo(3));
        // Every MoE layer of a file carries about the same tokens x top-k (README of the data).
        var total = moe.LayerTotal(0);
        // (a few files differ by a few thousand tokens between layers: within 0.1%)
        for (var l = 1; l < moe.Layers; l++) Assert.That(moe.LayerTotal(l), Is.EqualTo(total).Within(0.1).Percent);
        Assert.That(total % 8, Is.Zero);
    }

    [Test]
    public void AcceptsTheThreeShapes()
    {
        var plain = ExpertLoad.Parse("[[1, 2, 3], [4, 5, 6]]"u8);
        var dump = ExpertLoad.Parse("{\"logical_count\": [[1, 2, 3], [4, 5, 6]]}"u8);
        var steps = ExpertLoad.Parse("{\"logical_count\": [[[1, 0, 3], [4, 5, 0]], [[0, 2, 0], [0, 0, 6]]]}"u8);
        foreach (var load in new[] { plain, dump, steps })
        {
            Assert.That(load.Layers, Is.EqualTo(2));
            Assert.That(load.Values.ToArray(), Is.EqualTo(new double[] { 1, 2, 3, 4, 5, 6 }));
        }
        var roundTrip = ExpertLoad.Parse(Encoding.UTF8.GetBytes(dump.ToSglangJson()));
        Assert.That(roundTrip.Values.ToArray(), Is.EqualTo(dump.Values.ToArray()));
    }

    [TestCase("{\"logical_count\": [[1, 2], [3]]}", "ragged rows")]
    [TestCase("[[1, -2]]", "[0][1] = -2")]
    [TestCase("[[1, \"x\"]]", "is not a number")]
    [TestCase("{\"counts\": [[1]]}", "logical_count")]
    [TestCase("[[1, 2]", "malformed JSON")]
    [TestCase("[]", "non-empty")]
    [TestCase("[1, 2]", "[L][N] or [T][L][N]")]
    [TestCase("42", "object or array")]
    public void BadDumpsNameTheProblem(string json, string expected)
    {
        var e = Assert.Throws<InvalidDataException>(() => ExpertLoad.Parse(Encoding.UTF8.GetBytes(json), "dump.json"))!;
        Assert.That(e.Message, Does.StartWith("dump.json: ").And.Contain(expected));
    }

    [Test]
    public void NaNAndNegativeValuesAreRejectedByTheConstructor()
    {
        Assert.Throws<ArgumentException>(() => new ExpertLoad(1, 2, [1, double.NaN]));
        Assert.Throws<ArgumentException>(() => new ExpertLoad(1, 2, [1, -1]));
        Assert.Throws<ArgumentException>(() => new ExpertLoad(1, 2, [1, double.PositiveInfinity]));
        Assert.Throws<FileNotFoundException>(() => ExpertLoad.Read("/no/such/dump.json"));
    }
}
