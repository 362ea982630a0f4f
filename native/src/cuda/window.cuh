// CUDA expert-load window push (docs/design.md §3.2). Mirrors cpu/window.hpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace eplb::cuda {

// A negative pass counter is recorded as INT32_MAX and sets EPLB_DEVICE_ERROR_COUNTER_OVERFLOW in
// *error_flags (a device word).
cudaError_t load_window_push(int32_t* pass_counters, int32_t* window, int64_t* window_sums, int64_t count, int32_t slot,
                             uint32_t* error_flags, cudaStream_t stream);

cudaError_t load_window_discard(int32_t* pass_counters, int64_t count, cudaStream_t stream);

}  // namespace eplb::cuda
