// The rule of the per-pass load counters, shared by CPU and CUDA: an add never leaves a wrapped
// (negative) load behind. Each backend adds atomically (fetch_add / atomicAdd) and, when this says
// the add overflowed, stores INT32_MAX and sets EPLB_DEVICE_ERROR_COUNTER_OVERFLOW. Every add that
// wraps, or lands on a wrapped value, stores INT32_MAX after it, so once any add wraps the counter
// ends at INT32_MAX whatever the interleaving.
#pragma once

#include <cstdint>

#include "common/hostdevice.hpp"

namespace eplb {

// Whether adding amount (>= 1) to a counter that held before overflowed int32 (or found it already
// wrapped).
EPLB_HD bool counter_add_overflowed(int32_t before, int32_t amount) {
    return before < 0 || before > INT32_MAX - amount;
}

// The value a window push records for a pass counter: a negative one wrapped past INT32_MAX
// outside the saturating adds, so INT32_MAX is the closest true lower bound.
EPLB_HD int32_t saturated_pass_count(int32_t value) { return value < 0 ? INT32_MAX : value; }

}  // namespace eplb
