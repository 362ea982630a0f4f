// Shared pieces of the native kernel benchmarks: CUDA-event timing (warm-up, median of many runs),
// the device's measured copy bandwidth (the physical limit the tables compare against), and a
// Markdown table printer. Benchmarks call libeplb through its public C ABI only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "eplb/eplb.h"

namespace eplb::bench {

#define BENCH_CUDA(expr)                                                                         \
    do {                                                                                         \
        const cudaError_t e_ = (expr);                                                           \
        if (e_ != cudaSuccess) {                                                                 \
            std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)

#define BENCH_EPLB(expr)                                                                          \
    do {                                                                                          \
        const eplb_status_t s_ = (expr);                                                          \
        if (s_ != EPLB_STATUS_OK) {                                                               \
            std::fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr, eplb_status_string(s_), \
                         eplb_last_error_message());                                              \
            std::exit(1);                                                                         \
        }                                                                                         \
    } while (0)

// Exits with 77 ("skipped") when no CUDA device can run the benchmark.
inline void require_device() {
    if (eplb_backend_available(EPLB_BACKEND_CUDA) != EPLB_STATUS_OK) {
        std::printf("skipped: %s\n", eplb_last_error_message());
        std::exit(77);
    }
}

// Median time in microseconds of `runs` launches of fn on stream, after `warmup` launches.
inline double median_us(const std::function<void()>& fn, cudaStream_t stream, int warmup = 20, int runs = 200) {
    for (int i = 0; i < warmup; ++i) fn();
    BENCH_CUDA(cudaStreamSynchronize(stream));
    cudaEvent_t start, stop;
    BENCH_CUDA(cudaEventCreate(&start));
    BENCH_CUDA(cudaEventCreate(&stop));
    std::vector<float> times;
    times.reserve(runs);
    for (int i = 0; i < runs; ++i) {
        BENCH_CUDA(cudaEventRecord(start, stream));
        fn();
        BENCH_CUDA(cudaEventRecord(stop, stream));
        BENCH_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms * 1000.0f);
    }
    BENCH_CUDA(cudaEventDestroy(start));
    BENCH_CUDA(cudaEventDestroy(stop));
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// Device-to-device copy bandwidth in bytes/s (read + write counted), measured on 1 GiB.
inline double copy_bandwidth(cudaStream_t stream) {
    const size_t bytes = size_t(1) << 30;
    void* a = nullptr;
    void* b = nullptr;
    BENCH_CUDA(cudaMalloc(&a, bytes));
    BENCH_CUDA(cudaMalloc(&b, bytes));
    const double us = median_us([&] { BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream)); }, stream, 3, 20);
    BENCH_CUDA(cudaFree(a));
    BENCH_CUDA(cudaFree(b));
    return 2.0 * double(bytes) / (us * 1e-6);
}

inline std::string device_name() {
    eplb_runtime_info_t info{};
    BENCH_EPLB(eplb_get_runtime_info(&info));
    return std::string(info.device_name) + " (sm_" + std::to_string(info.compute_capability_major) +
           std::to_string(info.compute_capability_minor) + ", " + std::to_string(info.sm_count) + " SMs)";
}

// What every benchmark starts with: a device (else exit 77), a non-blocking CUDA stream wrapped as
// an eplb stream, the measured copy bandwidth, and the heading line.
struct Session {
    cudaStream_t cuda = nullptr;
    eplb_stream_t* stream = nullptr;
    double copy = 0;  // bytes/s

    explicit Session(const char* what) {
        require_device();
        BENCH_CUDA(cudaStreamCreateWithFlags(&cuda, cudaStreamNonBlocking));
        BENCH_EPLB(eplb_stream_wrap_cuda(cuda, &stream));
        copy = copy_bandwidth(cuda);
        std::printf("# %s benchmark on %s; copy bandwidth %.0f GB/s\n", what, device_name().c_str(), copy / 1e9);
    }
    ~Session() {
        eplb_stream_destroy(stream);
        cudaStreamDestroy(cuda);
    }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;
};

}  // namespace eplb::bench
