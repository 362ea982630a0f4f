// CPU reference of the dispatch ops (docs/design.md §6): align/sort, EP bucketing, permute, combine.
// Same shapes as cuda/dispatch.cuh; raw host pointers, no handles, no validation (capi validates).
// Callable from C++ inside libeplb (the Mega MoE fallback); the layouts are those of eplb_dispatch.h.
#pragma once

#include <cstdint>

#include "eplb/eplb_dispatch.h"

namespace eplb::cpu {

// eplb_dispatch_align: every element of every output written. capacity >= align_capacity(...).
void align(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t first_slot,
           int32_t num_local_experts, int32_t block_size, int64_t capacity, int32_t* expert_counts,
           int32_t* expert_offsets, int32_t* sorted_pair_ids, int32_t* block_experts, int32_t* pair_positions);

// eplb_dispatch_bucket_by_rank: slots must lie in [-1, num_physical) (capi checks on CPU).
void bucket_by_rank(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t num_physical,
                    int32_t num_ranks, int32_t* rank_counts, int32_t* rank_offsets, int32_t* send_pair_ids,
                    int32_t* pair_positions);

// eplb_dispatch_permute: rows [0, num_rows) whose id is a pair; element_size bytes per element.
void permute(const void* x, int64_t hidden, size_t element_size, int32_t top_k, const int32_t* row_pair_ids,
             int64_t num_rows, void* out);

// eplb_dispatch_combine: positions in [-1, y_rows); weights may be NULL (weight 1).
void combine(eplb_dtype_t y_dtype, const void* y, int64_t hidden, const int32_t* pair_positions, const float* weights,
             int64_t num_tokens, int32_t top_k, eplb_dtype_t out_dtype, void* out);

}  // namespace eplb::cpu
