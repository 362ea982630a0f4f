// CUDA routing kernels fused with the EPLB epilogue (docs/design.md §4.1-4.3). Mirrors cpu/routing.hpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "eplb/eplb_routing.h"

namespace eplb::cuda {

// Queues scored top-k routing on stream. Device pointers throughout; config and *map are read on
// the host at launch (map may be NULL). Bad table entries give -1 and set
// EPLB_DEVICE_ERROR_BAD_TABLE in *error_flags (a device word).
cudaError_t route_topk(const float* logits, const float* bias, int64_t num_tokens, const eplb_router_config_t& config,
                       const eplb_expert_map_t* map, const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights,
                       uint32_t* error_flags, int sm_count, cudaStream_t stream);

// Queues DeepSeek-V4 hash routing on stream. A token id outside [0, vocab_size) voids its row and
// sets EPLB_DEVICE_ERROR_BAD_TOKEN_ID; a table entry outside [0, N) voids its slot and sets
// EPLB_DEVICE_ERROR_BAD_EXPERT_ID. Nothing is read out of bounds.
cudaError_t route_hash(const float* logits, const int64_t* token_ids, const int32_t* tid2eid, int64_t vocab_size,
                       int64_t num_tokens, const eplb_router_config_t& config, const eplb_expert_map_t* map,
                       const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights, uint32_t* error_flags,
                       int sm_count, cudaStream_t stream);

}  // namespace eplb::cuda
