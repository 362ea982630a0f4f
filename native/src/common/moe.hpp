// Mega MoE pieces shared by the CPU reference and the CUDA kernels (docs/design.md §7): the problem on raw
// pointers, the workspace layout, and the element math (the clamped SwiGLU, the combine step; bf16
// rounding is common/bf16.hpp) as EPLB_HD functions so both backends round alike.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/bf16.hpp"
#include "common/dispatch.hpp"
#include "common/hostdevice.hpp"

namespace eplb {

// The combine step is dispatch.hpp's weighted_add (acc + w * y, product and sum each rounded): the
// rule of eplb_dispatch_combine, so the fused kernel, the unfused path and the CPU give the same bits.

// The clamped SwiGLU of one intermediate element, in fp32: silu(min(g, L)) * clamp(u, -L, L) when
// limit > 0 (DeepSeek-V4 and GPT-OSS clamp the gate from above only), silu(g) * u otherwise.
// silu(g) = g / (1 + exp(-g)): exact at both tails (g -> -inf gives -0, not NaN).
EPLB_HD float swiglu(float gate, float up, float limit) {
    if (limit > 0.0f) {
        gate = fminf(gate, limit);
        up = fminf(fmaxf(up, -limit), limit);
    }
    return gate / (1.0f + expf(-gate)) * up;
}

// Tile heights the kernels are built for. Rows are (token, expert) pairs of one expert.
constexpr int kMoeSmallBlockM = 32;
constexpr int kMoeLargeBlockM = 128;

// The tile height for a call: forced by the shape, else 32 while an expert expects few rows
// (decode: weights dominate, a 128-row tile would be mostly padding), else 128 (prefill: the
// larger tile re-reads weights 4x less often and keeps the tensor cores busier).
inline int moe_pick_block_m(int32_t forced, int64_t num_tokens, int32_t top_k, int32_t num_experts) {
    if (forced != 0) return forced;
    const double rows_per_expert = double(num_tokens) * top_k / double(num_experts > 0 ? num_experts : 1);
    return rows_per_expert <= 48.0 ? kMoeSmallBlockM : kMoeLargeBlockM;
}

// Where the workspace keeps each piece, in bytes from its start (every piece 256-byte aligned).
struct MoeWorkspaceLayout {
    static constexpr uint64_t kAlignment = 256;
    // Control words of the fused kernel: [0] grid barrier arrivals, [1] abort flag.
    uint64_t control = 0;
    // [E_local + 1] int32: first permuted row of each local expert; [E_local] = local pairs.
    uint64_t expert_offsets = 0;
    // [E_local] int32: pairs of each local expert (the unfused path's align writes it).
    uint64_t expert_counts = 0;
    // [max m-tiles] int32: GEMM1 n-tiles finished per m-tile (the GEMM1 -> GEMM2 handoff).
    uint64_t ready = 0;
    // [T][K] int32: permuted row of each (token, k), -1 when not local.
    uint64_t positions = 0;
    // [T * K] int32: flat (token * K + k) of each permuted row (the first expert_offsets[E] are used).
    uint64_t sorted = 0;
    // [T * K][I] bf16: SwiGLU output (GEMM2's A), in permuted row order.
    uint64_t intermediate = 0;
    // [T * K][H] bf16: each expert's output row, permuted order. The unfused path first keeps the
    // permuted x rows here (GEMM1's A, eplb_dispatch_permute's output), which GEMM2 then overwrites.
    uint64_t expert_out = 0;
    uint64_t total = 0;
    // The ready array holds this many entries.
    int64_t max_m_tiles = 0;

    static MoeWorkspaceLayout make(int64_t num_tokens, int32_t top_k, int32_t hidden, int32_t intermediate_size,
                                   int32_t num_local_experts) {
        MoeWorkspaceLayout layout;
        const int64_t pairs = num_tokens * top_k;
        uint64_t at = 0;
        auto take = [&at](uint64_t bytes) {
            const uint64_t start = at;
            at += (bytes + kAlignment - 1) / kAlignment * kAlignment;
            return start;
        };
        // Every expert can end in a partial tile, hence the + E_local; the smallest tile bounds the count.
        layout.max_m_tiles = (pairs + kMoeSmallBlockM - 1) / kMoeSmallBlockM + num_local_experts;
        layout.control = take(kAlignment);
        layout.expert_offsets = take(uint64_t(num_local_experts + 1) * 4);
        layout.expert_counts = take(uint64_t(num_local_experts) * 4);
        layout.ready = take(uint64_t(layout.max_m_tiles) * 4);
        layout.positions = take(uint64_t(pairs) * 4);
        layout.sorted = take(uint64_t(pairs) * 4);
        layout.intermediate = take(uint64_t(pairs) * uint64_t(intermediate_size) * 2);
        layout.expert_out = take(uint64_t(pairs) * uint64_t(hidden) * 2);
        layout.total = at;
        return layout;
    }
};

// One call on raw pointers of one backend, after validation (capi/moe.cpp builds it).
struct MoeProblem {
    const uint16_t* x = nullptr;        // [T][H]
    const int32_t* topk_ids = nullptr;  // [T][K]
    const float* topk_weights = nullptr;
    const uint16_t* w1 = nullptr;  // [E_local][2I][H]
    const uint16_t* w2 = nullptr;  // [E_local][H][I]
    uint16_t* output = nullptr;    // [T][H]
    int64_t num_tokens = 0;
    int32_t hidden = 0;
    int32_t intermediate = 0;
    int32_t top_k = 0;
    int32_t num_local_experts = 0;
    int32_t first_local_expert = 0;
    float swiglu_limit = 0.0f;
    // Workspace pieces (see MoeWorkspaceLayout).
    uint32_t* control = nullptr;
    int32_t* expert_offsets = nullptr;
    int32_t* expert_counts = nullptr;
    int32_t* ready = nullptr;
    int32_t* positions = nullptr;
    int32_t* sorted = nullptr;
    uint16_t* intermediate_rows = nullptr;
    uint16_t* expert_out = nullptr;
};

}  // namespace eplb
