// CPU reference of the expert-load window push (docs/design.md §3.2). Mirrors cuda/window.cuh.
#pragma once

#include <cstdint>

namespace eplb::cpu {

// sums[i] += pass[i] - window[slot][i]; window[slot][i] = pass[i]; pass[i] = 0, where a negative
// pass[i] counts as INT32_MAX and sets EPLB_DEVICE_ERROR_COUNTER_OVERFLOW in *error_flags.
void load_window_push(int32_t* pass_counters, int32_t* window, int64_t* window_sums, int64_t count, int32_t slot,
                      uint32_t* error_flags);

void load_window_discard(int32_t* pass_counters, int64_t count);

}  // namespace eplb::cpu
