using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>The per-layer expert-distribution recorder and its SGLang dump.</summary>
public class RecorderTests
{
    [Test]
    public void CountsLandOnTheScopedLayer()
    {
        var recorder = new ExpertDistributionRecorder(3, 4);
        using (recorder.CurrentLayer(1)) recorder.OnSelectExperts([0, 3, 3, -1, 4, 2]);
        using (recorder.CurrentLayer(2)) recorder.OnSelectExperts([1, 1]);
        Assert.That(recorder[1, 3], Is.EqualTo(2));
        Assert.That(recorder[1, 0], Is.EqualTo(1));
        Assert.That(recorder[1, 2], Is.EqualTo(1));
        Assert.That(recorder[2, 1], Is.EqualTo(2));
        Assert.That(recorder[0, 0] + recorder[0, 1] + recorder[0, 2] + recorder[0, 3], Is.Zero);
        Assert.That(recorder.CurrentLayerIndex, Is.Null);
    }

    [Test]
    public void RecordingOutsideAScopeIsRefused()
    {
        var recorder = new ExpertDistributionRecorder(2, 4);
        var error = Assert.Throws<InvalidOperationException>(() => recorder.OnSelectExperts([1]))!;
        Assert.That(error.Message, Does.Contain("CurrentLayer"));
        using (recorder.CurrentLayer(0))
        {
            Assert.Throws<InvalidOperationException>(() => recorder.CurrentLayer(1), "no nested layers");
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => recorder.CurrentLayer(2));
    }

    [Test]
    public void ScopesArePerThread()
    {
        var recorder = new ExpertDistributionRecorder(2, 2);
        using (recorder.CurrentLayer(0))
        {
            var other = Task.Run(() =>
            {
                using (recorder.CurrentLayer(1)) recorder.OnSelectExperts([1, 1, 1]);
            });
            other.Wait();
            recorder.OnSelectExperts([0]);
        }
        Assert.That(recorder[0, 0], Is.EqualTo(1));
        Assert.That(recorder[1, 1], Is.EqualTo(3));
    }

    [Test]
    public void DumpsAndLoadsSglangFormat()
    {
        var random = TestSupport.NewRandom();
        var real = TestSupport.RealLoad("prefill_in512");
        var recorder = new ExpertDistributionRecorder(3, real.LogicalExperts);
        for (var layer = 0; layer < 3; layer++)
        {
            var ids = TestSupport.SampleTopK(random, real.Layer(layer), 500, 8);
            using (recorder.CurrentLayer(layer)) recorder.OnSelectExperts(ids);
        }
        var path = Path.Combine(Path.GetTempPath(), $"eplb-dump-{Guid.NewGuid():N}.json");
        try
        {
            recorder.Dump(path);
            Assert.That(File.ReadAllText(path), Does.StartWith("{\"logical_count\": [["));
            var back = ExpertDistributionRecorder.Load(path);
            for (var layer = 0; layer < 3; layer++)
                for (var e = 0; e < real.LogicalExperts; e++)
                    Assert.That(back[layer, e], Is.EqualTo(recorder[layer, e]));
            Assert.That(ExpertLoad.Read(path).LayerTotal(0), Is.EqualTo(500 * 8));
        }
        finally
        {
            File.Delete(path);
        }
    }
}
