using System.Runtime.InteropServices;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>Library loading, runtime info, backend choice and the status -> exception choke point.</summary>
public class RuntimeTests
{
    [Test]
    public void InfoDescribesTheLoadedLibrary()
    {
        var info = EplbRuntime.Info;
        Assert.That(info.AbiVersion, Is.EqualTo((uint)NativeConstants.EPLB_ABI_VERSION));
        Assert.That(info.LibraryVersion, Is.EqualTo(File.ReadAllText(Path.Combine(TestSupport.RepoRoot, "VERSION")).Trim()));
        Assert.That(File.Exists(info.LibraryPath), Is.True, info.LibraryPath);
        if (!info.CudaCompiled)
        {
            Assert.That(info.DeviceCount, Is.Zero);
            Assert.That(EplbRuntime.UnavailableReason(Backend.Cuda), Is.EqualTo("built without CUDA"));
        }
        else if (info.DeviceCount == 0)
        {
            Assert.That(info.Device, Is.EqualTo(-1));
            Assert.That(info.LastCudaErrorText, Is.Not.Empty, "should say why no device is usable");
            Assert.That(EplbRuntime.UnavailableReason(Backend.Cuda), Does.StartWith("no CUDA device"));
        }
        else
        {
            Assert.That(info.SmCount, Is.GreaterThan(0));
            Assert.That(EplbRuntime.IsAvailable(Backend.Cuda), Is.True);
        }
        Assert.That(EplbRuntime.IsAvailable(Backend.Cpu), Is.True);
    }

    [Test]
    public void BackendNamesResolve()
    {
        Assert.That(EplbRuntime.ResolveBackend("cpu"), Is.EqualTo(Backend.Cpu));
        Assert.That(EplbRuntime.ResolveBackend(" CPU "), Is.EqualTo(Backend.Cpu));
        var auto = EplbRuntime.ResolveBackend(null);
        Assert.That(auto, Is.EqualTo(EplbRuntime.IsAvailable(Backend.Cuda) ? Backend.Cuda : Backend.Cpu));
        Assert.That(EplbRuntime.ResolveBackend("auto"), Is.EqualTo(auto));
        var unknown = Assert.Throws<ArgumentException>(() => EplbRuntime.ResolveBackend("gpu"))!;
        Assert.That(unknown.Message, Does.Contain("'gpu'").And.Contain("auto, cpu or cuda"));
        if (!EplbRuntime.IsAvailable(Backend.Cuda))
        {
            var cuda = Assert.Throws<EplbException>(() => EplbRuntime.ResolveBackend("cuda"))!;
            Assert.That(cuda.Status, Is.AnyOf(EplbStatus.NotCompiled, EplbStatus.NoDevice));
            Assert.That(cuda.Message, Does.Contain("cannot run here"));
        }
        else
        {
            Assert.That(EplbRuntime.ResolveBackend("cuda"), Is.EqualTo(Backend.Cuda));
        }
    }

    [Test]
    public void PublicStatusMirrorsTheNativeEnum()
    {
        var native = Enum.GetValues<eplb_status_t>();
        Assert.That(Enum.GetValues<EplbStatus>(), Has.Length.EqualTo(native.Length));
        foreach (var value in native)
        {
            var pascal = string.Concat(value.ToString()["EPLB_STATUS_".Length..].Split('_')
                .Select(w => w[0] + w[1..].ToLowerInvariant()));
            Assert.That(Enum.Parse<EplbStatus>(pascal, ignoreCase: true), Is.EqualTo((EplbStatus)(int)value), value.ToString());
        }
    }

    [Test]
    public unsafe void ChokePointMapsStatusesToExceptionTypes()
    {
        // A real native failure: invalid argument -> ArgumentException with the native message.
        var invalid = Assert.Throws<ArgumentException>(() => EplbException.ThrowIfFailed(NativeMethods.eplb_get_runtime_info(null)))!;
        Assert.That(invalid.Message, Does.StartWith("eplb_get_runtime_info: info must not be NULL"));
        // Backend not available -> EplbException with the status.
        if (!EplbRuntime.IsAvailable(Backend.Cuda))
        {
            var e = Assert.Throws<EplbException>(() => new DeviceBuffer<int>(Backend.Cuda, 4))!;
            Assert.That(e.Status, Is.AnyOf(EplbStatus.NotCompiled, EplbStatus.NoDevice));
            Assert.That(e.Message, Does.StartWith("eplb_buffer_create: "));
        }
        Assert.DoesNotThrow(() => EplbException.ThrowIfFailed(eplb_status_t.EPLB_STATUS_OK));
        foreach (var status in Enum.GetValues<eplb_status_t>())
            Assert.That(Marshal.PtrToStringUTF8((nint)NativeMethods.eplb_status_string(status)), Is.Not.Empty);
    }

    [Test]
    public void StreamsSynchronizeAndReportNoDeviceErrorsOnCpu()
    {
        using var stream = new ComputeStream(Backend.Cpu);
        Assert.That(stream.Backend, Is.EqualTo(Backend.Cpu));
        Assert.DoesNotThrow(stream.Synchronize);
        Assert.DoesNotThrow(stream.CheckDeviceErrors);
        stream.Dispose();
        Assert.Throws<ObjectDisposedException>(stream.Synchronize);
        stream.Dispose();  // twice is fine
    }

    [Test, Category("GPU")]
    public void CudaStreamsRun()
    {
        TestSupport.RequireCuda();
        using var stream = new ComputeStream(Backend.Cuda);
        using var buffer = new DeviceBuffer<int>(Backend.Cuda, 1000);
        buffer.Fill(-3, stream: stream);
        stream.Synchronize();
        Assert.That(buffer.ToArray(), Is.All.EqualTo(-3));
        Assert.DoesNotThrow(stream.CheckDeviceErrors);
    }
}
