// CUDA dispatch ops (docs/design.md §6). Mirrors cpu/dispatch.hpp: device pointers, a stream, cudaError_t.
// Bad input found on the device sets EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX in *error_flags (a device
// word; may be NULL when the caller has none). Callable from C++ inside libeplb (the Mega MoE fallback).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "eplb/eplb_dispatch.h"

namespace eplb::cuda {

// eplb_dispatch_align: one launch of one block below bucket::kSplitPairs pairs (shared-memory counts
// and scan, as vLLM's moe_align_block_size, made stable), three launches over several blocks from it
// on (common/bucket_partition.hpp); the same layout either way. The environment variable
// EPLB_ALIGN_SPLIT_PAIRS, when set, replaces the switch point (a measurement knob for the
// benchmark). Inputs validated by the caller.
cudaError_t align(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t first_slot,
                  int32_t num_local_experts, int32_t block_size, int64_t capacity, int32_t* expert_counts,
                  int32_t* expert_offsets, int32_t* sorted_pair_ids, int32_t* block_experts, int32_t* pair_positions,
                  uint32_t* error_flags, cudaStream_t stream);

// eplb_dispatch_bucket_by_rank, the same kernel with ranks as buckets and block size 1.
cudaError_t bucket_by_rank(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t num_physical,
                           int32_t num_ranks, int32_t* rank_counts, int32_t* rank_offsets, int32_t* send_pair_ids,
                           int32_t* pair_positions, uint32_t* error_flags, cudaStream_t stream);

// eplb_dispatch_permute: one block per row (grid-stride), 16-byte vectors when aligned.
cudaError_t permute(eplb_dtype_t dtype, const void* x, int64_t num_tokens, int64_t hidden, int32_t top_k,
                    const int32_t* row_pair_ids, const int32_t* num_rows, int64_t capacity, void* out,
                    uint32_t* error_flags, int sm_count, cudaStream_t stream);

// eplb_dispatch_combine: one block per token (grid-stride), 8 elements per thread step.
cudaError_t combine(eplb_dtype_t y_dtype, const void* y, int64_t y_rows, int64_t hidden, const int32_t* pair_positions,
                    const float* weights, int64_t num_tokens, int32_t top_k, eplb_dtype_t out_dtype, void* out,
                    uint32_t* error_flags, int sm_count, cudaStream_t stream);

}  // namespace eplb::cuda
