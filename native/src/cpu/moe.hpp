// CPU reference of the MoE expert computation (docs/design.md §7). Same phases and workspace as the CUDA
// kernels (cuda/moe.cuh); raw host pointers, no handles, no validation (capi/moe.cpp validates).
#pragma once

#include "common/moe.hpp"

namespace eplb::cpu {

// Route: counts the (token, k) pairs of every local expert, lays them out expert after expert in
// ascending (token, k) order, and fills expert_offsets, positions and sorted.
void moe_route(const MoeProblem& p);

// GEMM1 + SwiGLU: intermediate[row] = bf16(swiglu(W1g . a, W1u . a)) for every permuted row, with a
// the token's x row (gathered = true) or the row expert_out holds (gathered = false).
void moe_gemm1_swiglu(const MoeProblem& p, bool gathered);

// GEMM2: expert_out[row] = bf16(W2 . intermediate[row]).
void moe_gemm2(const MoeProblem& p);

// Combine: output[t] = bf16(sum over ascending k of w[t,k] * expert_out[positions[t,k]]) in fp32,
// product and sum each rounded (weighted_add); 0 for a token with no local pair.
void moe_combine(const MoeProblem& p);

// The reference: route, GEMM1 on gathered rows, GEMM2, combine.
void mega_moe(const MoeProblem& p);

// The unfused composition: the dispatch ops (align with block size 1, permute into expert_out),
// GEMM1 on the permuted copy, GEMM2, the dispatch combine. Same bits as mega_moe.
void moe_unfused(const MoeProblem& p);

}  // namespace eplb::cpu
