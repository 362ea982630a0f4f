// Pattern fill on the device (cudaMemset only repeats single bytes).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace eplb::cuda {

// Writes count copies of the low pattern_size bytes (1, 2, 4 or 8) of pattern at dst.
// dst must be aligned to pattern_size.
cudaError_t fill_pattern(void* dst, uint64_t count, uint64_t pattern, uint32_t pattern_size, cudaStream_t stream);

}  // namespace eplb::cuda
