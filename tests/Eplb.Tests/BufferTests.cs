using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>DeviceBuffer / DeviceSlice on every backend that can run here.</summary>
public class BufferTests
{
    // The CUDA cases carry the GPU category so scripts/gpu-check.sh selects them.
    private static IEnumerable<TestCaseData> Backends() =>
        [new TestCaseData(Backend.Cpu), new TestCaseData(Backend.Cuda).SetCategory("GPU")];

    private static void Require(Backend backend)
    {
        if (backend == Backend.Cuda) TestSupport.RequireCuda();
    }

    [TestCaseSource(nameof(Backends))]
    public void RoundTripFillCopyAndSlices(Backend backend)
    {
        Require(backend);
        var random = TestSupport.NewRandom();
        var values = Enumerable.Range(0, random.Next(1, 5000)).Select(_ => random.Next()).ToArray();
        using var a = new DeviceBuffer<int>(backend, values);
        Assert.That(a.ToArray(), Is.EqualTo(values));
        Assert.That(a.SizeInBytes, Is.EqualTo(values.Length * 4L));

        using var b = new DeviceBuffer<int>(backend, values.Length + 8);
        b.Fill(-77);
        b.CopyFrom(a, 0, 4, values.Length);
        var got = b.ToArray();
        Assert.That(got[..4], Is.All.EqualTo(-77));
        Assert.That(got[4..^4], Is.EqualTo(values));
        Assert.That(got[^4..], Is.All.EqualTo(-77));

        var slice = b.Slice(4, values.Length).Slice(1, 2);
        Assert.That(slice.ToArray(), Is.EqualTo(values[1..3]));
        slice.Fill(9);
        Assert.That(b.ToArray()[5..7], Is.EqualTo(new[] { 9, 9 }));
        slice.CopyFrom([10, 11]);
        Assert.That(b.ToArray()[5..7], Is.EqualTo(new[] { 10, 11 }));
    }

    [TestCaseSource(nameof(Backends))]
    public void FillsEveryElementSize(Backend backend)
    {
        Require(backend);
        using var bytes = new DeviceBuffer<byte>(backend, 7);
        bytes.Fill(0xA5);
        Assert.That(bytes.ToArray(), Is.All.EqualTo(0xA5));
        using var halves = new DeviceBuffer<short>(backend, 5);
        halves.Fill(-2);
        Assert.That(halves.ToArray(), Is.All.EqualTo(-2));
        using var longs = new DeviceBuffer<long>(backend, 3);
        longs.Fill(long.MinValue + 5);
        Assert.That(longs.ToArray(), Is.All.EqualTo(long.MinValue + 5));
        using var floats = new DeviceBuffer<float>(backend, 9);
        floats.Fill(float.NaN, 2, 3);
        Assert.That(floats.ToArray()[2..5].All(float.IsNaN), Is.True);
    }

    [Test, Category("GPU")]
    public void CrossBackendCopies()
    {
        TestSupport.RequireCuda();
        using var host = new DeviceBuffer<int>(Backend.Cpu, [1, 2, 3, 4]);
        using var device = new DeviceBuffer<int>(Backend.Cuda, 4);
        device.CopyFrom(host, 0, 0, 4);
        using var back = new DeviceBuffer<int>(Backend.Cpu, 4);
        back.CopyFrom(device, 0, 0, 4);
        Assert.That(back.ToArray(), Is.EqualTo(new[] { 1, 2, 3, 4 }));
    }

    [Test]
    public void OutOfRangeAccessThrowsAndNothingIsWritten()
    {
        using var buffer = new DeviceBuffer<int>(Backend.Cpu, [1, 2, 3]);
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.CopyFrom([9, 9], 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.CopyTo(new int[4]));
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Fill(0, 1, 3));
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Slice(2, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => new DeviceBuffer<int>(Backend.Cpu, -1));
        Assert.Throws<ArgumentException>(() => buffer.AsSlice().CopyFrom([1, 2]));
        Assert.That(buffer.ToArray(), Is.EqualTo(new[] { 1, 2, 3 }));
        Assert.Throws<ArgumentException>(() => buffer.CopyFrom(buffer, 0, 1, 2), "overlapping copy");
    }

    [Test]
    public void DisposedBuffersRefuseUse()
    {
        var buffer = new DeviceBuffer<int>(Backend.Cpu, 4);
        buffer.Dispose();
        Assert.Throws<ObjectDisposedException>(() => buffer.ToArray());
        Assert.Throws<ObjectDisposedException>(() => buffer.Fill(1));
        buffer.Dispose();
        var empty = new DeviceBuffer<int>(Backend.Cpu, 0);
        Assert.That(empty.ToArray(), Is.Empty);
        empty.Dispose();
    }
}
