/*
 * eplb_moe.h - the expert computation of one MoE layer (docs/design.md §7): "Mega MoE", a cooperative fused
 * kernel doing token counting and permutation, GEMM1 + SwiGLU, GEMM2 and the top-k combine in one
 * launch, plus the unfused path (the dispatch ops of eplb_dispatch.h around the same GEMM tiles: the
 * baseline, and the fallback when a cooperative launch is not possible). Included by eplb.h; see the
 * conventions there.
 *
 * For every token t:
 *   Y[t] = sum over k of w[t,k] * W2[e] . (silu(clampG(W1g[e] . x_t)) * clampU(W1u[e] . x_t)),
 *   e = topk_ids[t,k], over the experts local to this rank (others contribute 0: EP partial sums).
 * bf16 inputs and weights (raw uint16_t bits), fp32 accumulation, bf16 output. The intermediate
 * (after SwiGLU) and every expert's output row are rounded to bf16 before the next step; the combine
 * adds the K rows in ascending k in fp32 (acc = acc + w * y, as eplb_dispatch_combine) and rounds
 * once. Output is bitwise equal run to run (no float atomics).
 */
#ifndef EPLB_EPLB_MOE_H
#define EPLB_EPLB_MOE_H

#include "eplb/eplb_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest num_local_experts and top_k the kernels accept. */
#define EPLB_MOE_MAX_LOCAL_EXPERTS 1024
#define EPLB_MOE_MAX_TOP_K 64

/* The shape of one MoE layer on this rank. Caller-owned host memory, read during the call. */
typedef struct eplb_moe_shape {
    /* H: hidden size, a positive multiple of 64. */
    int32_t hidden;
    /* I: intermediate size of one expert, a positive multiple of 64. */
    int32_t intermediate;
    /* K: experts per token, in [1, EPLB_MOE_MAX_TOP_K]. */
    int32_t top_k;
    /* R: physical expert slots over all ranks (used to pick the tile height). */
    int32_t num_experts;
    /* Slots [first_local_expert, first_local_expert + num_local_experts) live on this rank, in
     * [1, EPLB_MOE_MAX_LOCAL_EXPERTS] and inside [0, R). Ids outside the range contribute nothing. */
    int32_t num_local_experts;
    int32_t first_local_expert;
    /* > 0 clamps before the SwiGLU: gate = min(gate, L), up = clamp(up, -L, L) (DeepSeek-V4-Flash
     * uses 10). 0 disables the clamp. Finite, >= 0. */
    float swiglu_limit;
    /* Tile height in rows of (token, expert) pairs: 0 picks one from the expected rows per expert
     * (32 for decode-sized batches, 128 for prefill), or 32 / 128 to force one (tuning, tests). */
    int32_t block_m;
} eplb_moe_shape_t;

/* The tensors of one call, as raw pointers of the stream's backend (device pointers on CUDA).
 * The struct is caller-owned host memory read during the call; the memory it points to is used by
 * the queued work and must stay alive until it finishes. On CUDA the bf16 tensors are 16-byte
 * aligned and the workspace 256-byte aligned; on the CPU natural alignment suffices. */
typedef struct eplb_moe_tensors {
    /* [T][H] bf16 activations. */
    const uint16_t *x;
    /* [T][K] physical expert ids (slots); -1 and non-local ids contribute nothing. */
    const int32_t *topk_ids;
    /* [T][K] fp32 routing weights. */
    const float *topk_weights;
    /* [E_local][2I][H] bf16: rows [0, I) are the gate projection, rows [I, 2I) the up projection
     * (vLLM's w13 layout), expert j = slot first_local_expert + j. */
    const uint16_t *w1;
    /* [E_local][H][I] bf16 down projection. */
    const uint16_t *w2;
    /* [T][H] bf16 output, every element written (0 for tokens with no local expert). */
    uint16_t *output;
    /* Scratch of at least eplb_moe_workspace_size bytes, owned by the caller; its contents need no
     * initialisation and are undefined afterwards. One call at a time per workspace. */
    void *workspace;
    uint64_t workspace_bytes;
} eplb_moe_tensors_t;

/* Writes to *out_bytes the workspace a call with up to max_tokens tokens needs (any backend, any
 * path). Depends on T, K, H, I and num_local_experts only. */
EPLB_API eplb_status_t eplb_moe_workspace_size(const eplb_moe_shape_t *shape, int64_t max_tokens, uint64_t *out_bytes);

/* Writes to *out_blocks the largest grid of the fused kernel that can co-reside on the stream's
 * device for this shape and num_tokens (blocks per SM from the occupancy API with the kernel's real
 * dynamic shared memory, times the SM count), and to *out_block_m (may be NULL) the tile height
 * used. Returns EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE, naming the reason, when the device has
 * no cooperative launch or not even one block fits on an SM. On a CPU stream *out_blocks is 1. */
EPLB_API eplb_status_t eplb_mega_moe_max_grid(eplb_stream_t *stream, const eplb_moe_shape_t *shape, int64_t num_tokens,
                                              int32_t *out_blocks, int32_t *out_block_m);

/* Runs the layer as one cooperative kernel (cudaLaunchCooperativeKernel), queued on stream.
 * grid_blocks = 0 launches the largest co-resident grid (eplb_mega_moe_max_grid); a positive value
 * forces that grid (tuning, tests) and must not exceed it. Never hangs: when the launch is not
 * possible (no cooperative launch, the block does not fit, a grid larger than can co-reside) it
 * returns EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE before anything is written, and the caller may
 * run eplb_moe_unfused instead. Should the blocks still fail to meet (another kernel holding SMs
 * despite the launch check), the kernel gives up after a few seconds, leaves the output undefined
 * and sets EPLB_DEVICE_ERROR_GRID_BARRIER_TIMEOUT in the stream's device error word.
 * On a CPU stream this runs the reference implementation (same workspace, same result bits as
 * eplb_moe_unfused on the CPU). */
EPLB_API eplb_status_t eplb_mega_moe(eplb_stream_t *stream, const eplb_moe_shape_t *shape, int64_t num_tokens,
                                     const eplb_moe_tensors_t *tensors, int32_t grid_blocks);

/* Runs the same computation as separate kernels, queued on stream: eplb_dispatch_align (block size
 * 1) and eplb_dispatch_permute, grouped GEMM1 + SwiGLU, grouped GEMM2 (the fused kernel's tiles),
 * eplb_dispatch_combine. The in-project baseline and the fallback for
 * EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE. Same arguments as eplb_mega_moe and the same result,
 * bit for bit. */
EPLB_API eplb_status_t eplb_moe_unfused(eplb_stream_t *stream, const eplb_moe_shape_t *shape, int64_t num_tokens,
                                        const eplb_moe_tensors_t *tensors);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_EPLB_MOE_H */
