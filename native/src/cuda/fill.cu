#include "cuda/fill.cuh"

#include <algorithm>

namespace eplb::cuda {

namespace {

template <typename T>
__global__ void fill_kernel(T* __restrict__ dst, uint64_t count, T value) {
    const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
    for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) dst[i] = value;
}

template <typename T>
cudaError_t launch(void* dst, uint64_t count, uint64_t pattern, cudaStream_t stream) {
    constexpr int kThreads = 256;
    const uint64_t blocks = std::min<uint64_t>((count + kThreads - 1) / kThreads, 4096);
    fill_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(static_cast<T*>(dst), count, static_cast<T>(pattern));
    return cudaGetLastError();
}

}  // namespace

cudaError_t fill_pattern(void* dst, uint64_t count, uint64_t pattern, uint32_t pattern_size, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    switch (pattern_size) {
        case 1: return cudaMemsetAsync(dst, int(pattern & 0xFF), count, stream);
        case 2: return launch<uint16_t>(dst, count, pattern, stream);
        case 4: return launch<uint32_t>(dst, count, pattern, stream);
        case 8: return launch<uint64_t>(dst, count, pattern, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace eplb::cuda
