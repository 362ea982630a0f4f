// CPU reference of the logical -> physical mapping with load recording (docs/design.md §4.3).
// Same shape as cuda/mapping.cuh; raw host pointers, no handles, no validation (capi validates).
#pragma once

#include <cstdint>

#include "eplb/eplb_mapping.h"

namespace eplb::cpu {

// Writes every element of physical_ids [num_tokens][top_k]; increments map.counters when recording
// (atomic, saturating: a counter reaching INT32_MAX sets EPLB_DEVICE_ERROR_COUNTER_OVERFLOW in
// *error_flags, the stream's host error word). Tables must already be valid (see capi/validate.hpp).
// physical_ids may alias topk_ids.
void map_logical_to_physical(const int32_t* topk_ids, int64_t num_tokens, int32_t top_k, const eplb_expert_map_t& map,
                             const int32_t* num_unpadded, int32_t* physical_ids, uint32_t* error_flags);

}  // namespace eplb::cpu
