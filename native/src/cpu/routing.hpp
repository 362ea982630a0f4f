// CPU reference of the routing kernels (docs/design.md §4.1-4.3). Same shape as cuda/routing.cuh; raw host
// pointers, no handles, no validation (capi validates first).
#pragma once

#include <cstdint>

#include "eplb/eplb_routing.h"

namespace eplb::cpu {

// Scored top-k (sigmoid / sqrtsoftplus with optional bias and groups, or softmax) plus the EPLB
// epilogue. Writes every element of topk_ids and topk_weights [num_tokens][K]. map may be NULL.
// Load counters are added atomically and saturate (EPLB_DEVICE_ERROR_COUNTER_OVERFLOW in
// *error_flags, the stream's host error word), as cpu/mapping.hpp.
void route_topk(const float* logits, const float* bias, int64_t num_tokens, const eplb_router_config_t& config,
                const eplb_expert_map_t* map, const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights,
                uint32_t* error_flags);

// DeepSeek-V4 hash routing plus the EPLB epilogue. Bad token ids and table entries give -1 and
// weight 0 (the ABI layer rejects them before calling, so this is the CUDA kernel's contract only).
void route_hash(const float* logits, const int64_t* token_ids, const int32_t* tid2eid, int64_t vocab_size,
                int64_t num_tokens, const eplb_router_config_t& config, const eplb_expert_map_t* map,
                const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights, uint32_t* error_flags);

}  // namespace eplb::cpu
