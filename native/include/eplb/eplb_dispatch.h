/*
 * eplb_dispatch.h - expert dispatch (docs/design.md §6): align/sort, permute, combine and EP bucketing.
 * Included by eplb.h; see the conventions there.
 *
 * The data movement between routing and the experts. The input of every op is the routed
 * (token, k) pairs: physical_ids [num_tokens][top_k] of physical slots, -1 where a pair is not
 * routed (see eplb_map_logical_to_physical). A pair is named by its flat index
 * pair = token * top_k + k, so token = pair / top_k.
 *
 * One rank (no EP, or the expert side of EP):
 *   eplb_dispatch_align    -> the expert-contiguous layout of the pairs local to this rank
 *   eplb_dispatch_permute  -> X rows gathered into that layout ([rows][hidden], row i = X[token of pair i])
 *   (the experts run on row blocks of block_size rows, all rows of a block for one expert)
 *   eplb_dispatch_combine  -> out[t] = sum_k w[t][k] * Y[pair_positions[t][k]], in token order
 *
 * Expert parallelism (G ranks; rank g owns slots [g*R/G, (g+1)*R/G)), one pair per sent row:
 *   sender:   eplb_dispatch_bucket_by_rank (counts/offsets for the all-to-all, send order)
 *             eplb_dispatch_permute with the send order -> the send buffer, rank-contiguous;
 *             the slot of send row i is physical_ids[send_pair_ids[i]]
 *   receiver: the received slots as physical_ids [rows][1] -> align / permute / experts /
 *             combine (top_k = 1) -> one output row per received row, returned in received order
 *   sender:   eplb_dispatch_combine on the returned rows with the bucketing's pair_positions and
 *             the routing weights -> out in token order (weights applied once, on either side)
 *
 * Every output is deterministic: pairs keep ascending pair order inside an expert (or rank), and
 * combine sums over k in ascending order in fp32, on CPU and CUDA alike (bit for bit).
 */
#ifndef EPLB_EPLB_DISPATCH_H
#define EPLB_EPLB_DISPATCH_H

#include "eplb/eplb_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The value that marks a padding entry in sorted_pair_ids and a block with no expert in
 * block_experts, and the position of a pair that is not local in pair_positions. (vLLM's
 * moe_align_block_size marks padding with num_tokens * top_k instead.) */
#define EPLB_DISPATCH_PADDING (-1)

/* Largest number of experts local to one rank (or of ranks) the align and bucketing ops accept. */
#define EPLB_DISPATCH_MAX_BUCKETS 8192

/* Element type of activation tensors. bf16 travels as its raw 16 bits (uint16_t): the upper half of
 * the fp32 bit pattern; conversions from fp32 round to nearest even. */
typedef enum eplb_dtype {
    EPLB_DTYPE_F32 = 0,
    EPLB_DTYPE_BF16 = 1
} eplb_dtype_t;

/* Writes into *out_capacity the number of sorted rows eplb_dispatch_align needs in the worst case:
 * num_pairs + min(slots_per_rank, num_pairs) * (block_size - 1) (each expert that has pairs adds
 * at most block_size - 1 padding rows). Size sorted_pair_ids and the permute output with it, and
 * block_experts with capacity / block_size. num_pairs = num_tokens * top_k. */
EPLB_API eplb_status_t eplb_dispatch_align_capacity(int64_t num_pairs, int32_t slots_per_rank, int32_t block_size,
                                                    int64_t *out_capacity);

/* Align/sort (vLLM moe_align_block_size, stable): groups the pairs whose slot lies in this rank's
 * range [first_slot, first_slot + slots_per_rank) by local expert e = slot - first_slot, and pads
 * each expert's group to a multiple of block_size. Pairs outside the range (other ranks' slots, -1)
 * are not local and take no row.
 * physical_ids     [num_tokens][top_k] slots, any value (only the local range counts).
 * capacity         rows of sorted_pair_ids; at least eplb_dispatch_align_capacity(...).
 * Outputs (caller-owned, every element written):
 * expert_counts    [slots_per_rank] local pairs per expert.
 * expert_offsets   [slots_per_rank + 1] exclusive scan of the counts rounded up to block_size:
 *                  expert e owns rows [expert_offsets[e], expert_offsets[e + 1]); its pairs come
 *                  first, then padding. expert_offsets[slots_per_rank] is the total padded
 *                  row count (a device scalar the permute op takes as num_rows).
 * sorted_pair_ids  [capacity] the pair of each row, ascending pair index inside an expert;
 *                  EPLB_DISPATCH_PADDING on padding rows and on every row at or after the total.
 * block_experts    [capacity / block_size] the local expert of each block of block_size rows;
 *                  EPLB_DISPATCH_PADDING for blocks at or after the total. May be NULL when
 *                  capacity / block_size is 0.
 * pair_positions   [num_tokens][top_k] the row of each pair, EPLB_DISPATCH_PADDING when not local
 *                  (the inverse of sorted_pair_ids; what combine takes).
 * Fails with EPLB_STATUS_INVALID_ARGUMENT (nothing written) on a bad size or pointer, a capacity
 * below the worst case, or num_tokens * top_k above INT32_MAX. */
EPLB_API eplb_status_t eplb_dispatch_align(eplb_stream_t *stream, const int32_t *physical_ids, int64_t num_tokens,
                                           int32_t top_k, int32_t first_slot, int32_t slots_per_rank,
                                           int32_t block_size, int64_t capacity, int32_t *expert_counts,
                                           int32_t *expert_offsets, int32_t *sorted_pair_ids, int32_t *block_experts,
                                           int32_t *pair_positions);

/* EP bucketing: groups the routed pairs by destination rank (slot s lives on rank
 * s / (num_slots / num_ranks)), ascending pair index inside a rank: the metadata of an
 * all-to-all that sends one row per pair, and the bookkeeping to bring the results back.
 * physical_ids     [num_tokens][top_k] slots in [0, num_slots) or -1 (not routed, not sent).
 * num_slots        R, a multiple of num_ranks.
 * Outputs (caller-owned, every element written):
 * rank_counts      [num_ranks] pairs sent to each rank.
 * rank_offsets     [num_ranks + 1] exclusive scan: rank g's rows are [rank_offsets[g], rank_offsets[g+1]);
 *                  rank_offsets[num_ranks] is the number of routed pairs.
 * send_pair_ids    [num_tokens * top_k] the pair of each send row; EPLB_DISPATCH_PADDING from the
 *                  number of routed pairs on.
 * pair_positions   [num_tokens][top_k] the send row of each pair, EPLB_DISPATCH_PADDING when not routed.
 * On the CPU backend a slot outside [-1, num_slots) fails with EPLB_STATUS_INVALID_ARGUMENT
 * (nothing written); on CUDA such a pair is not sent and sets EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX. */
EPLB_API eplb_status_t eplb_dispatch_bucket_by_rank(eplb_stream_t *stream, const int32_t *physical_ids,
                                                    int64_t num_tokens, int32_t top_k, int32_t num_slots,
                                                    int32_t num_ranks, int32_t *rank_counts, int32_t *rank_offsets,
                                                    int32_t *send_pair_ids, int32_t *pair_positions);

/* Permute: gathers token rows of x into the row order of row_pair_ids:
 *   out[i] = x[row_pair_ids[i] / top_k]     for i < *num_rows and row_pair_ids[i] >= 0
 * Padding rows (row_pair_ids[i] == EPLB_DISPATCH_PADDING) and rows at or after *num_rows are not
 * written: an expert computes each row on its own, and combine never reads a padding row, so
 * zeroing them would only spend bandwidth (vLLM's fused_moe masks them the same way).
 * x                [num_tokens][hidden] of dtype (caller-owned, read only).
 * row_pair_ids     [capacity] pairs in [0, num_tokens * top_k) or EPLB_DISPATCH_PADDING: the
 *                  sorted_pair_ids of align, or the send_pair_ids of bucketing.
 * num_rows         scalar in [0, capacity] (a device scalar on CUDA, graph-safe): expert_offsets +
 *                  slots_per_rank, or rank_offsets + num_ranks.
 * out              [capacity][hidden] of dtype; must not overlap x.
 * On the CPU backend *num_rows and the ids are checked first (EPLB_STATUS_INVALID_ARGUMENT, nothing
 * written); on CUDA a bad *num_rows is clamped into [0, capacity], a row with a bad id is not
 * written, and both set EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX. Rows are copied with 16-byte vectors when x, out
 * and the row size (hidden * element size) are multiples of 16 bytes. */
EPLB_API eplb_status_t eplb_dispatch_permute(eplb_stream_t *stream, eplb_dtype_t dtype, const void *x,
                                             int64_t num_tokens, int64_t hidden, int32_t top_k,
                                             const int32_t *row_pair_ids, const int32_t *num_rows, int64_t capacity,
                                             void *out);

/* Combine: the weighted sum of each token's expert outputs, in token order:
 *   out[t] = sum over k = 0 .. top_k-1 with pair_positions[t][k] >= 0 of w[t][k] * y[pair_positions[t][k]]
 * accumulated in fp32 in ascending k (acc = 0; acc = acc + w * y, no fused multiply-add), then
 * converted once to out_dtype (bf16: round to nearest even). Pairs at EPLB_DISPATCH_PADDING (not
 * local, not routed) contribute nothing; a token with none gets a zero row. Bitwise deterministic.
 * y                [y_rows][hidden] of y_dtype: the expert outputs in the permuted row order.
 * pair_positions   [num_tokens][top_k] rows of y in [0, y_rows), or EPLB_DISPATCH_PADDING.
 * weights          [num_tokens][top_k] fp32 routing weights, or NULL for weight 1 (a plain sum).
 * out              [num_tokens][hidden] of out_dtype, every element written; must not overlap y.
 * On the CPU backend the positions are checked first (EPLB_STATUS_INVALID_ARGUMENT, nothing
 * written); on CUDA a position outside [-1, y_rows) contributes nothing and sets
 * EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX. */
EPLB_API eplb_status_t eplb_dispatch_combine(eplb_stream_t *stream, eplb_dtype_t y_dtype, const void *y, int64_t y_rows,
                                             int64_t hidden, const int32_t *pair_positions, const float *weights,
                                             int64_t num_tokens, int32_t top_k, eplb_dtype_t out_dtype, void *out);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_EPLB_DISPATCH_H */
