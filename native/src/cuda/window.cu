#include "cuda/window.cuh"

#include <algorithm>

#include "common/load_counter.hpp"
#include "eplb/eplb_core.h"

namespace eplb::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    push_kernel(int32_t* __restrict__ pass, int32_t* __restrict__ row, int64_t* __restrict__ sums, int64_t count,
                uint32_t* error_flags) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
        const int32_t raw = pass[i];
        if (raw < 0) atomicOr(error_flags, uint32_t(EPLB_DEVICE_ERROR_COUNTER_OVERFLOW));
        const int32_t value = saturated_pass_count(raw);
        sums[i] += int64_t(value) - int64_t(row[i]);
        row[i] = value;
        pass[i] = 0;
    }
}

}  // namespace

cudaError_t load_window_push(int32_t* pass_counters, int32_t* window, int64_t* window_sums, int64_t count, int32_t slot,
                             uint32_t* error_flags, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    // L*R is small (58 x 288 = 16.7K for DeepSeek-V3): a few blocks suffice.
    const int blocks = int(std::min<int64_t>((count + kThreads - 1) / kThreads, 1024));
    push_kernel<<<blocks, kThreads, 0, stream>>>(pass_counters, window + int64_t(slot) * count, window_sums, count,
                                                 error_flags);
    return cudaGetLastError();
}

cudaError_t load_window_discard(int32_t* pass_counters, int64_t count, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    return cudaMemsetAsync(pass_counters, 0, size_t(count) * sizeof(int32_t), stream);
}

}  // namespace eplb::cuda
