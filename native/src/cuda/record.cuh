// Load recording of the CUDA kernels (common/load_counter.hpp's rule, as cpu/record.hpp): a global
// counter add that overflows int32 leaves INT32_MAX behind and sets
// EPLB_DEVICE_ERROR_COUNTER_OVERFLOW, so a load never wraps negative. Per-block shared histograms
// count at most a block's own (token, k) pairs and add through this once per touched slot.
#pragma once

#include <cstdint>

#include "common/load_counter.hpp"
#include "eplb/eplb_core.h"

namespace eplb::cuda {

__device__ __forceinline__ void record_load(int32_t* counter, int32_t amount, uint32_t* error_flags) {
    const int32_t before = atomicAdd(counter, amount);
    if (counter_add_overflowed(before, amount)) {
        atomicExch(counter, INT32_MAX);
        atomicOr(error_flags, uint32_t(EPLB_DEVICE_ERROR_COUNTER_OVERFLOW));
    }
}

}  // namespace eplb::cuda
