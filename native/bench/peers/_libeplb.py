"""libeplb through ctypes, shared by the PyTorch peers (scripts/gpu-check.sh skips files named _*.py).

LibEplb loads the library, declares the core entry points (errors, streams) and whatever a peer adds
in `signatures`, and turns a non-zero status into a RuntimeError with libeplb's own message.
"""

import ctypes
import statistics


class LibEplb:
    """The core of libeplb's C ABI on raw addresses; peers subclass it with their own entry points."""

    def __init__(self, path, signatures=None):
        c = ctypes
        p = c.c_void_p
        lib = c.CDLL(path)
        lib.eplb_last_error_message.restype = c.c_char_p
        lib.eplb_status_string.argtypes = [c.c_int]
        lib.eplb_status_string.restype = c.c_char_p
        declared = {
            "eplb_stream_create": [c.c_int, c.POINTER(p)],
            "eplb_stream_wrap_cuda": [p, c.POINTER(p)],
            "eplb_stream_destroy": [p],
            "eplb_stream_check_device_errors": [p, c.POINTER(c.c_uint32)],
        }
        declared.update(signatures or {})
        for name, argtypes in declared.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = c.c_int
        self.lib = lib

    def check(self, status, what):
        if status != 0:
            message = self.lib.eplb_last_error_message().decode()
            raise RuntimeError(f"{what}: {self.lib.eplb_status_string(status).decode()}: {message}")

    def cpu_stream(self):
        stream = ctypes.c_void_p()
        self.check(self.lib.eplb_stream_create(0, ctypes.byref(stream)), "eplb_stream_create")
        return stream

    def wrap_cuda(self, cuda_stream):
        """Wraps a cudaStream_t (an int address, e.g. torch.cuda.Stream.cuda_stream) without owning it."""
        handle = cuda_stream if isinstance(cuda_stream, ctypes.c_void_p) else ctypes.c_void_p(cuda_stream)
        stream = ctypes.c_void_p()
        self.check(self.lib.eplb_stream_wrap_cuda(handle, ctypes.byref(stream)), "eplb_stream_wrap_cuda")
        return stream

    def destroy(self, stream):
        self.check(self.lib.eplb_stream_destroy(stream), "eplb_stream_destroy")

    def check_device(self, stream):
        flags = ctypes.c_uint32()
        self.check(self.lib.eplb_stream_check_device_errors(stream, ctypes.byref(flags)), "device errors")


def median_us(torch, fn, warmup=10, runs=100):
    """Median of `runs` CUDA-event timings of fn() in microseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0)
    return statistics.median(times)
