// CUDA logical -> physical mapping with load recording (docs/design.md §4.3). Mirrors cpu/mapping.hpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "eplb/eplb_mapping.h"

namespace eplb::cuda {

// Queues the mapping on stream. Device pointers throughout; map is read on the host at launch.
// Bad table entries give -1 and set EPLB_DEVICE_ERROR_BAD_TABLE in *error_flags (a device word).
cudaError_t map_logical_to_physical(const int32_t* topk_ids, int64_t num_tokens, int32_t top_k,
                                    const eplb_expert_map_t& map, const int32_t* num_unpadded, int32_t* physical_ids,
                                    uint32_t* error_flags, int sm_count, cudaStream_t stream);

}  // namespace eplb::cuda
