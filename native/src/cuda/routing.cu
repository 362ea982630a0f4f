// CUDA routing kernels: one warp per token row for scored top-k, K lanes per row for hash routing,
// both ending in the fused EPLB epilogue (map -> mask padding -> record) of docs/design.md §4.3.
//
// Scored top-k layout: lane l holds experts [l * E, (l + 1) * E), E = ceil(N / 32) (8 for N = 256,
// 12 for N = 384), loaded as float4 when E and N are multiples of 4. Because the ids of a lane
// are contiguous and ascend with the lane, "largest key, lower id on ties" is one warp-wide max
// of the lanes' local bests (redux.sync on sm_80+) plus the lowest lane of a ballot: K rounds of
// that select the top-k with no sort and no shared memory. All float math that reaches an output goes
// through common/routing_math.hpp, so ids and weights equal the CPU reference bit for bit.
//
// Exact scores cost ~50 instructions an expert (own exp/log1p/sqrt), which would make the kernel
// compute-bound at several times the memory time. So sigmoid/sqrtsoftplus rows first score every
// expert with fast intrinsics, bound the error, and compute exact keys only for the ~10-14
// candidates that can still be in the top-k (select_by_candidates); rows it cannot decide take the
// exact path (select_exact).
#include "cuda/routing.cuh"

#include <algorithm>

#include "common/replica.hpp"
#include "common/routing_math.hpp"
#include "cuda/launch.cuh"
#include "cuda/record.cuh"

namespace eplb::cuda {

namespace {

using namespace eplb::routing;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
// Counters of up to this many slots are accumulated in shared memory per block (32 KiB), so a block
// issues one global atomic per touched slot instead of one per (token, k), as the mapping kernel.
constexpr int kMaxSharedCounters = 8192;
// Resident blocks per SM the top-k kernels are compiled for (__launch_bounds__): 1 lets ptxas use
// what it wants (72-179 registers, no spills); 3 caps them at 80 and 4 at 64, with spills
// (scripts/kernel-registers.sh; docs/benchmarks.md). Build with -DEPLB_TOPK_MIN_BLOCKS=3 in
// CMAKE_CUDA_FLAGS to measure the trade on a GPU.
#ifndef EPLB_TOPK_MIN_BLOCKS
#define EPLB_TOPK_MIN_BLOCKS 1
#endif
constexpr int kTopkMinBlocks = EPLB_TOPK_MIN_BLOCKS;

// The fused epilogue's arguments, shared by both kernels.
struct Epilogue {
    eplb_expert_map_t map;  // meaningful when has_map
    const int32_t* num_unpadded;
    int32_t* topk_ids;
    float* topk_weights;
    uint32_t* error_flags;
    bool has_map;
    bool shared_counters;  // the counters fit in shared memory and a record flag exists
};

// Router shape and weight rules, as the kernels need them.
struct Shape {
    int32_t num_experts;
    int32_t per_lane;  // E
    int32_t top_k;
    int32_t num_groups;
    int32_t group_size;
    int32_t topk_groups;
    int32_t lanes_per_group;  // > 0: every lane lies in one group of this many lanes (a power of two)
    bool candidate_filter;    // sigmoid/sqrtsoftplus, E >= 4, no groups or lane-aligned ones: try select_by_candidates first
    bool vector_loads;
    bool renormalize;
    bool scale;
    float routed_scaling_factor;
};

__device__ __forceinline__ uint32_t warp_max(uint32_t value) {
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(kFullMask, value);
#else
    for (int offset = 16; offset > 0; offset /= 2) value = max(value, __shfl_xor_sync(kFullMask, value, offset));
    return value;
#endif
}

__device__ __forceinline__ int64_t unpadded_rows(const int32_t* num_unpadded, int64_t num_tokens) {
    if (num_unpadded == nullptr) return num_tokens;
    return max(int64_t(0), min(num_tokens, int64_t(*num_unpadded)));
}

// Record: per-block shared histogram (zeroed here) or direct global atomics. Returns whether to
// record; read once per block so every thread agrees, whatever another stream does to the flag.
__device__ __forceinline__ bool begin_record(const Epilogue& ep, int32_t* shared_counters) {
    __shared__ int record;
    if (threadIdx.x == 0) {
        const eplb_expert_map_t& map = ep.map;
        record = ep.has_map && map.record_flag != nullptr && map.counters != nullptr && *map.record_flag != 0;
    }
    if (ep.shared_counters)
        for (int i = threadIdx.x; i < ep.map.num_physical; i += blockDim.x) shared_counters[i] = 0;
    __syncthreads();
    return record != 0;
}

__device__ __forceinline__ void count(const Epilogue& ep, int32_t* shared_counters, int32_t physical) {
    if (ep.shared_counters)
        atomicAdd(&shared_counters[physical], 1);
    else
        record_load(&ep.map.counters[physical], 1, ep.error_flags);
}

__device__ __forceinline__ void end_record(const Epilogue& ep, int32_t* shared_counters, bool record) {
    if (!ep.shared_counters) return;
    __syncthreads();
    if (!record) return;
    for (int i = threadIdx.x; i < ep.map.num_physical; i += blockDim.x) {
        const int32_t value = shared_counters[i];
        if (value != 0) record_load(&ep.map.counters[i], value, ep.error_flags);
    }
}

// This lane's logits of one row: experts [first, first + E); 0 past N (never used).
template <int kMaxPerLane>
__device__ __forceinline__ void load_row(float (&x)[kMaxPerLane], const float* __restrict__ row_logits, int first,
                                         const Shape& shape) {
    if (shape.vector_loads) {
        // E % 4 == 0 and N % 4 == 0: a float4 chunk lies wholly inside or wholly past the row.
#pragma unroll
        for (int c = 0; c < kMaxPerLane; c += 4) {
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (c < shape.per_lane && first + c < shape.num_experts)
                v = __ldg(reinterpret_cast<const float4*>(row_logits + first + c));
            x[c] = v.x;
            x[c + 1] = v.y;
            x[c + 2] = v.z;
            x[c + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i)
            x[i] = (i < shape.per_lane && first + i < shape.num_experts) ? __ldg(row_logits + first + i) : 0.0f;
    }
}

// Group-limited selection (docs/design.md §4.1): clears the keys of experts outside the topk_groups best groups.
template <int kMaxPerLane>
__device__ __forceinline__ void keep_best_groups(uint32_t (&key)[kMaxPerLane], int lane, int first, const Shape& shape) {
    uint32_t group_value = kNoKey;  // the group key held by the lane that stands for the group
    int lanes_per_group = shape.lanes_per_group;
    int lane_group = 0;
    int group_of[kMaxPerLane];
    if (lanes_per_group > 0) {
        // Fast path (DeepSeek-V3: N 256, 8 groups -> 4 lanes of 8 experts per group): the lane's
        // own top two, merged across its aligned segment of lanes by xor shuffles.
        uint32_t first_key = kNoKey, second_key = kNoKey;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            if (key[i] > first_key) {
                second_key = first_key;
                first_key = key[i];
            } else if (key[i] > second_key) {
                second_key = key[i];
            }
        }
        for (int offset = lanes_per_group / 2; offset > 0; offset /= 2) {
            const uint32_t other_first = __shfl_xor_sync(kFullMask, first_key, offset);
            const uint32_t other_second = __shfl_xor_sync(kFullMask, second_key, offset);
            second_key = max(min(first_key, other_first), max(second_key, other_second));
            first_key = max(first_key, other_first);
        }
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) group_of[i] = 0;
        lane_group = lane / lanes_per_group;
        if (lane % lanes_per_group == 0 && lane_group < shape.num_groups) group_value = group_key(first_key, second_key);
    } else {
        // Any other shape: one warp-wide pass per group over the lane's members of it.
        int group = first / shape.group_size;
        int boundary = (group + 1) * shape.group_size;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            if (first + i >= boundary) {
                ++group;
                boundary += shape.group_size;
            }
            group_of[i] = group;
        }
        for (int g = 0; g < shape.num_groups; ++g) {
            uint32_t first_key = kNoKey, second_key = kNoKey;
#pragma unroll
            for (int i = 0; i < kMaxPerLane; ++i) {
                if (group_of[i] != g) continue;
                if (key[i] > first_key) {
                    second_key = first_key;
                    first_key = key[i];
                } else if (key[i] > second_key) {
                    second_key = key[i];
                }
            }
            const uint32_t top = warp_max(first_key);
            // The second largest is top again when two lanes hold it, else the best of the rest.
            const uint32_t holders = __ballot_sync(kFullMask, first_key == top);
            const uint32_t next = __popc(holders) > 1 ? top : warp_max(first_key == top ? second_key : first_key);
            if (lane == g) group_value = group_key(top, next);
        }
        lanes_per_group = 1;
    }
    // Keep topk_groups groups: largest group key, lower group (= lower lane) on ties.
    uint32_t kept = 0;
    for (int r = 0; r < shape.topk_groups; ++r) {
        const uint32_t top = warp_max(group_value);
        const int winner = __ffs(__ballot_sync(kFullMask, group_value == top && group_value != kNoKey)) - 1;
        kept |= 1u << (winner / lanes_per_group);
        if (lane == winner) group_value = kNoKey;
    }
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const int group = shape.lanes_per_group > 0 ? lane_group : group_of[i];
        if (group >= shape.num_groups || !((kept >> group) & 1u)) key[i] = kNoKey;
    }
}

// The value a softmax weight comes from: the clamped logit, -inf for NaN.
__device__ __forceinline__ float softmax_value(float logit) { return is_nan(logit) ? -INFINITY : clamp_logit(logit); }

// The top-k of one row, as every lane sees it: lane r < K holds the r-th selected expert and its
// value (s, or the softmax numerator); sum is the K values added in selection order.
struct Selection {
    int32_t expert = -1;
    float value = 0.0f;
    float sum = 0.0f;
};

// Exact selection: every expert's exact key, optional group limit, then K rounds of
// (warp-wide largest key, lowest lane); the winner lane rescans its experts.
template <int kScore, int kMaxPerLane>
__device__ __forceinline__ Selection select_exact(const float (&x)[kMaxPerLane], const float (&lane_bias)[kMaxPerLane],
                                                  int lane, int first, const Shape& shape) {
    constexpr bool kSoftmax = kScore == EPLB_ROUTING_SCORE_SOFTMAX;
    // Score: the selection key of every expert and the value its weight comes from. Softmax
    // recomputes the value (the clamped logit, two instructions) from the logit instead of keeping
    // it: one register array less per lane, the same bits. Sigmoid/sqrtsoftplus keep s, which costs
    // ~50 instructions to recompute (and measured no fewer registers: docs/benchmarks.md).
    uint32_t key[kMaxPerLane];
    float value[kSoftmax ? 1 : kMaxPerLane];
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const bool valid = i < shape.per_lane && first + i < shape.num_experts;
        if constexpr (kSoftmax) {
            key[i] = valid ? logit_key(x[i]) : kNoKey;
        } else {
            const float s = score<kScore>(x[i]);
            key[i] = valid ? biased_key(x[i], s, lane_bias[i]) : kNoKey;
            value[i] = s;
        }
    }
    if (!kSoftmax && shape.num_groups > 1) keep_best_groups(key, lane, first, shape);

    uint32_t best = kNoKey;
    int best_index = 0;
    float best_value = 0.0f;  // softmax: the logit
    auto rescan = [&] {
        best = kNoKey;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            if (key[i] > best) {  // strict: the lower id keeps a tie
                best = key[i];
                best_index = i;
                if constexpr (kSoftmax) best_value = x[i];
                else best_value = value[i];
            }
        }
    };
    rescan();
    Selection selection;
    float top = 0.0f;  // softmax: the row's largest clamped logit
    for (int r = 0; r < shape.top_k; ++r) {
        const uint32_t round_key = warp_max(best);
        const int winner = __ffs(__ballot_sync(kFullMask, best == round_key)) - 1;
        const int index = __shfl_sync(kFullMask, best_index, winner);
        float v = __shfl_sync(kFullMask, best_value, winner);
        if constexpr (kSoftmax) {
            if (r == 0) top = key_value(round_key);
            v = softmax_numerator(softmax_value(v), top);
        }
        selection.sum = fadd(selection.sum, v);
        if (lane == r) {
            selection.expert = winner * shape.per_lane + index;
            selection.value = v;
        }
        if (lane == winner) {
#pragma unroll
            for (int i = 0; i < kMaxPerLane; ++i)
                if (i == index) key[i] = kNoKey;
            rescan();
        }
    }
    if (kSoftmax && !shape.renormalize) {
        // The full softmax denominator in the documented order: lane sums, then an xor butterfly.
        float partial = 0.0f;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i)
            if (i < shape.per_lane && first + i < shape.num_experts) partial = fadd(partial, softmax_numerator(softmax_value(x[i]), top));
        for (int offset = 16; offset > 0; offset /= 2) partial = fadd(partial, __shfl_xor_sync(kFullMask, partial, offset));
        selection.sum = partial;
    }
    return selection;
}

// The candidate filter's error budget: the fast intrinsics below are within ~1.2e-5 relative of the
// exact score (CUDA Math API: __expf 2 + 1.16|x| ulp, __logf 2^-21.41 absolute on [0.5, 2],
// __fdividef and rsqrtf 2 ulp), so 2^-13 relative leaves a factor of ten; the absolute part covers
// scores the exact path flushes to 0 (< 1.1e-19) and the square root of tiny softplus values.
constexpr float kApproxRelativeError = 1.220703125e-4f;  // 2^-13
constexpr float kApproxAbsoluteError = 9.5367431640625e-7f;  // 2^-20

// A fast approximation of score<kScore>(x) for finite x: ~10 instructions and 2-3 MUFU operations
// instead of ~50 exact ones. Only ever compared against thresholds with the margin above; never
// written out.
template <int kScore>
__device__ __forceinline__ float approx_score(float x) {
    const float e = __expf(-fabsf(x));
    if (kScore == EPLB_ROUTING_SCORE_SIGMOID) return __fdividef(x >= 0.0f ? 1.0f : e, 1.0f + e);
    // log1p(e) by its series while e is small, where log(1 + e) would lose e's relative accuracy.
    const float log1p_e = e < 0.03125f ? e * (1.0f - e * (0.5f - e * 0.333333343f)) : __logf(1.0f + e);
    const float softplus = fmaxf(x, 0.0f) + log1p_e;
    return softplus > 1e-30f ? softplus * rsqrtf(softplus) : 0.0f;
}

// One candidate of the filter: the expert and what its exact key needs.
struct Candidate {
    int32_t expert;
    float logit;
    float bias;
};

// The group limit on approximate keys, for the lane-aligned group layout (lanes_per_group > 0).
// A group score (its two largest keys added) is then within 2 delta of the exact one, so when the
// last kept and the first dropped approximate group scores are more than 4 delta apart (5: the
// extra absorbs the rounding of the bound) the exact scores keep the same groups, ties included.
// Clears the approximate keys of the dropped groups' lanes and returns true; returns false,
// uniformly, when the gap is too small to decide.
template <int kMaxPerLane>
__device__ __forceinline__ bool keep_best_groups_approx(float (&approx)[kMaxPerLane], bool& has_expert, int lane,
                                                        float delta, const Shape& shape) {
    const int lanes_per_group = shape.lanes_per_group;
    float first_key = -INFINITY, second_key = -INFINITY;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        if (approx[i] > first_key) {
            second_key = first_key;
            first_key = approx[i];
        } else if (approx[i] > second_key) {
            second_key = approx[i];
        }
    }
    for (int offset = lanes_per_group / 2; offset > 0; offset /= 2) {
        const float other_first = __shfl_xor_sync(kFullMask, first_key, offset);
        const float other_second = __shfl_xor_sync(kFullMask, second_key, offset);
        second_key = fmaxf(fminf(first_key, other_first), fmaxf(second_key, other_second));
        first_key = fmaxf(first_key, other_first);
    }
    const int group = lane / lanes_per_group;
    uint32_t group_value = (lane % lanes_per_group == 0 && group < shape.num_groups)
                               ? order_key(nan_to_neg_inf(first_key + second_key))
                               : kNoKey;
    uint32_t kept = 0, last_kept = kNoKey, first_dropped = kNoKey;
    const int rounds = min(shape.topk_groups + 1, shape.num_groups);
    for (int r = 0; r < rounds; ++r) {
        const uint32_t top = warp_max(group_value);
        const int winner = __ffs(__ballot_sync(kFullMask, group_value == top && group_value != kNoKey)) - 1;
        if (r < shape.topk_groups) {
            kept |= 1u << (winner / lanes_per_group);
            last_kept = top;
        } else {
            first_dropped = top;
        }
        if (lane == winner) group_value = kNoKey;
    }
    if (shape.topk_groups < shape.num_groups && !(key_value(last_kept) - key_value(first_dropped) > 5.0f * delta))
        return false;
    if (group >= shape.num_groups || !((kept >> group) & 1u)) {
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) approx[i] = -INFINITY;
        has_expert = false;
    }
    return true;
}

// Candidate selection for sigmoid/sqrtsoftplus rows (group-limited ones through
// keep_best_groups_approx first), exact by construction. With every
// approximate key within delta of the exact one: the K lanes with the largest approximate lane
// bests each hold an expert whose exact key is >= tau - delta (tau: the K-th largest lane best), so
// the K-th largest exact key is too, and every expert of the exact top-k has an approximate key >=
// tau - 2 delta. Experts above tau - 3 delta (the extra delta absorbs the rounding of the bound) are
// compacted in id order into the warp's scratch, one per lane, and only they get exact keys. The
// top-k of that superset by exact key and lower id is the exact top-k. Returns false, uniformly
// across the warp, when the filter cannot decide (ties, huge or non-finite values, more than 32
// candidates); the caller then takes the exact path.
template <int kScore, int kMaxPerLane>
__device__ __forceinline__ bool select_by_candidates(const float (&x)[kMaxPerLane], const float (&lane_bias)[kMaxPerLane],
                                                     float bias_magnitude, int lane, int first, const Shape& shape,
                                                     Candidate* scratch, Selection& selection) {
    // Approximate keys; NaN logits are -inf in both worlds, so their error is 0.
    float approx[kMaxPerLane];
    float largest_score = 0.0f;
    float lane_best = -INFINITY;
    bool has_expert = false;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        approx[i] = -INFINITY;
        if (i < shape.per_lane && first + i < shape.num_experts) {
            has_expert = true;
            if (!is_nan(x[i])) {
                const float s = approx_score<kScore>(clamp_logit(x[i]));
                largest_score = fmaxf(largest_score, s);
                approx[i] = nan_to_neg_inf(s + lane_bias[i]);
                lane_best = fmaxf(lane_best, approx[i]);
            }
        }
    }
    // delta bounds |approximate key - exact key| over the row (non-negative floats order as their bits).
    const float score_bound = __uint_as_float(warp_max(__float_as_uint(largest_score)));
    const float delta = (score_bound + bias_magnitude) * kApproxRelativeError + kApproxAbsoluteError;
    if (shape.num_groups > 1 && !keep_best_groups_approx(approx, has_expert, lane, delta, shape)) return false;
    uint32_t lane_key = has_expert ? order_key(lane_best) : kNoKey;
    uint32_t tau = kNoKey;
    for (int r = 0; r < shape.top_k; ++r) {
        tau = warp_max(lane_key);
        const int winner = __ffs(__ballot_sync(kFullMask, lane_key == tau)) - 1;
        if (lane == winner) lane_key = kNoKey;
    }
    if (tau == kNoKey) return false;  // fewer than K lanes hold experts
    const float threshold = key_value(tau) - 3.0f * delta;
    if (!(threshold > -INFINITY)) return false;  // -inf or NaN: everything would be a candidate

    // Compact the candidates in id order: lane-major, then by expert within the lane.
    uint32_t mask = 0;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i)
        if (approx[i] >= threshold) mask |= 1u << i;
    const int count = __popc(mask);
    int inclusive = count;
    for (int offset = 1; offset < 32; offset *= 2) {
        const int below = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += below;
    }
    const int total = __shfl_sync(kFullMask, inclusive, 31);
    if (total > 32 || total < shape.top_k) return false;
    int slot = inclusive - count;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i)
        if ((mask >> i) & 1u) scratch[slot++] = Candidate{first + i, x[i], lane_bias[i]};
    __syncwarp();

    // Exact keys of the candidates, one per lane, then K rounds of (largest key, lowest lane).
    uint32_t key = kNoKey;
    float value = 0.0f;
    int32_t expert = 0;
    if (lane < total) {
        const Candidate candidate = scratch[lane];
        expert = candidate.expert;
        value = score<kScore>(candidate.logit);
        key = biased_key(candidate.logit, value, candidate.bias);
    }
    __syncwarp();  // the scratch is free for the next row
    for (int r = 0; r < shape.top_k; ++r) {
        const uint32_t round_key = warp_max(key);
        const int winner = __ffs(__ballot_sync(kFullMask, key == round_key)) - 1;
        const int32_t chosen = __shfl_sync(kFullMask, expert, winner);
        const float v = __shfl_sync(kFullMask, value, winner);
        selection.sum = fadd(selection.sum, v);
        if (lane == r) {
            selection.expert = chosen;
            selection.value = v;
        }
        if (lane == winner) key = kNoKey;
    }
    return true;
}

// Routes one real row: select (candidate filter, else exact) -> weights -> map -> record.
// Lanes < K write slot k = lane.
template <int kScore, int kMaxPerLane>
__device__ __forceinline__ void route_row(const float (&x)[kMaxPerLane], const float (&lane_bias)[kMaxPerLane],
                                          float bias_magnitude, int64_t row, int lane, int first, const Shape& shape,
                                          const Epilogue& ep, Candidate* scratch, int32_t* shared_counters, bool record,
                                          bool& bad_table) {
    constexpr bool kSoftmax = kScore == EPLB_ROUTING_SCORE_SOFTMAX;
    Selection selection;
    bool selected = false;
    if constexpr (!kSoftmax) {
        if (shape.candidate_filter)
            selected = select_by_candidates<kScore>(x, lane_bias, bias_magnitude, lane, first, shape, scratch, selection);
    }
    if (!selected) selection = select_exact<kScore>(x, lane_bias, lane, first, shape);

    // Epilogue: weight, map, record.
    if (lane < shape.top_k) {
        const float weight = finish_weight(selection.value, selection.sum, kSoftmax || shape.renormalize, shape.scale,
                                           shape.routed_scaling_factor);
        const int32_t physical =
            ep.has_map ? map_one(ep.map, selection.expert, row, lane, shape.top_k, &bad_table) : selection.expert;
        const int64_t out = row * shape.top_k + lane;
        ep.topk_ids[out] = physical;
        ep.topk_weights[out] = weight;
        if (record && physical >= 0) count(ep, shared_counters, physical);
    }
}

template <int kScore, int kMaxPerLane>
__global__ void __launch_bounds__(kThreads, kTopkMinBlocks)
    topk_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t num_tokens, Shape shape,
                Epilogue ep) {
    extern __shared__ int32_t shared_counters[];
    // Wide rows (N > 384) skip the prefetch and keep the bias in L1, not in registers.
    constexpr bool kPrefetch = kMaxPerLane <= 12;
    const bool record = begin_record(ep, shared_counters);
    const int lane = threadIdx.x & 31;
    const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
    const int64_t num_warps = int64_t(gridDim.x) * kWarps;
    const int64_t unpadded = unpadded_rows(ep.num_unpadded, num_tokens);
    const int first = lane * shape.per_lane;
    const int n = shape.num_experts;

    float lane_bias[kMaxPerLane];
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i)
        lane_bias[i] = (kPrefetch && bias != nullptr && i < shape.per_lane && first + i < n) ? __ldg(bias + first + i) : 0.0f;

    // The candidate filter's scratch, and its bound on |bias| (row-independent). Only finite biases
    // count: a NaN or infinite one gives the same key (-inf or +-inf) in both worlds.
    __shared__ Candidate scratch[kWarps][32];
    float bias_magnitude = 0.0f;
    if (shape.candidate_filter && bias != nullptr) {
        for (int e = lane; e < n; e += 32) {
            const float magnitude = fabsf(__ldg(bias + e));
            if (magnitude < INFINITY) bias_magnitude = fmaxf(bias_magnitude, magnitude);
        }
        bias_magnitude = __uint_as_float(warp_max(__float_as_uint(bias_magnitude)));
    }

    bool bad_table = false;
    float x[kMaxPerLane];
    int64_t row = warp;
    if (kPrefetch && row < unpadded) load_row(x, logits + row * n, first, shape);
    for (; row < num_tokens; row += num_warps) {
        // Load the next row's logits before working on this one, so the warp keeps bytes in flight.
        float next[kMaxPerLane] = {};
        if (kPrefetch) {
            if (row + num_warps < unpadded) load_row(next, logits + (row + num_warps) * n, first, shape);
        } else {
            if (row < unpadded) load_row(x, logits + row * n, first, shape);
#pragma unroll
            for (int i = 0; i < kMaxPerLane; ++i)
                lane_bias[i] = (bias != nullptr && i < shape.per_lane && first + i < n) ? __ldg(bias + first + i) : 0.0f;
        }
        if (row < unpadded) {
            route_row<kScore>(x, lane_bias, bias_magnitude, row, lane, first, shape, ep, scratch[threadIdx.x / 32],
                              shared_counters, record, bad_table);
        } else if (lane < shape.top_k) {
            // Padding rows: -1, weight 0, not counted, logits not read.
            ep.topk_ids[row * shape.top_k + lane] = -1;
            ep.topk_weights[row * shape.top_k + lane] = 0.0f;
        }
        if (kPrefetch) {
#pragma unroll
            for (int i = 0; i < kMaxPerLane; ++i) x[i] = next[i];
        }
    }
    if (bad_table) atomicOr(ep.error_flags, uint32_t(EPLB_DEVICE_ERROR_BAD_TABLE));
    end_record(ep, shared_counters, record);
}

// Hash routing: K consecutive lanes per row (32 / K rows per warp); lane k of a row reads table
// entry k and that logit, and the row's K scores are added in k order through shuffles.
template <int kScore>
__global__ void __launch_bounds__(kThreads)
    hash_kernel(const float* __restrict__ logits, const int64_t* __restrict__ token_ids,
                const int32_t* __restrict__ tid2eid, int64_t vocab_size, int64_t num_tokens, Shape shape, Epilogue ep) {
    extern __shared__ int32_t shared_counters[];
    const bool record = begin_record(ep, shared_counters);
    const int lane = threadIdx.x & 31;
    const int top_k = shape.top_k;
    const int rows_per_warp = 32 / top_k;
    const int slot = lane / top_k;
    const int k = lane - slot * top_k;
    const bool active = slot < rows_per_warp;
    const int segment = active ? slot * top_k : 0;  // the row's lane 0
    const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
    const int64_t num_warps = int64_t(gridDim.x) * kWarps;
    const int64_t unpadded = unpadded_rows(ep.num_unpadded, num_tokens);
    const int n = shape.num_experts;

    uint32_t flags = 0;
    bool bad_table = false;
    for (int64_t base = warp * rows_per_warp; base < num_tokens; base += num_warps * rows_per_warp) {
        const int64_t row = base + slot;
        const bool in_range = active && row < num_tokens;
        const bool real = in_range && row < unpadded;
        // Route: token -> table entry -> logit, each checked before it is used as an index.
        int32_t expert = -1;
        float s = 0.0f;
        if (real) {
            const int64_t token = __ldg(token_ids + row);
            if (token < 0 || token >= vocab_size) {
                flags |= EPLB_DEVICE_ERROR_BAD_TOKEN_ID;
            } else {
                const int32_t entry = __ldg(tid2eid + token * top_k + k);
                if (entry < 0 || entry >= n) {
                    flags |= EPLB_DEVICE_ERROR_BAD_EXPERT_ID;
                } else {
                    expert = entry;
                    s = score<kScore>(__ldg(logits + row * n + entry));
                }
            }
        }
        float sum = 0.0f;
        for (int j = 0; j < top_k; ++j) sum = fadd(sum, __shfl_sync(kFullMask, s, segment + j));
        // Epilogue.
        if (in_range) {
            float weight = 0.0f;
            int32_t physical = -1;
            if (real) {
                weight = finish_weight(s, sum, shape.renormalize, shape.scale, shape.routed_scaling_factor);
                physical = ep.has_map ? map_one(ep.map, expert, row, k, top_k, &bad_table) : expert;
            }
            ep.topk_ids[row * top_k + k] = physical;
            ep.topk_weights[row * top_k + k] = weight;
            if (record && physical >= 0) count(ep, shared_counters, physical);
        }
    }
    if (bad_table) flags |= EPLB_DEVICE_ERROR_BAD_TABLE;
    if (flags != 0) atomicOr(ep.error_flags, flags);
    end_record(ep, shared_counters, record);
}

Epilogue make_epilogue(const eplb_expert_map_t* map, const int32_t* num_unpadded, int32_t* topk_ids,
                       float* topk_weights, uint32_t* error_flags) {
    Epilogue ep{};
    if (map != nullptr) ep.map = *map;
    ep.has_map = map != nullptr;
    ep.num_unpadded = num_unpadded;
    ep.topk_ids = topk_ids;
    ep.topk_weights = topk_weights;
    ep.error_flags = error_flags;
    ep.shared_counters = map != nullptr && map->counters != nullptr && map->record_flag != nullptr &&
                         map->num_physical <= kMaxSharedCounters;
    return ep;
}

Shape make_shape(const eplb_router_config_t& config, const float* logits) {
    Shape shape{};
    shape.num_experts = config.num_experts;
    shape.per_lane = experts_per_lane(config.num_experts);
    shape.top_k = config.top_k;
    shape.num_groups = config.num_groups;
    shape.group_size = config.num_experts / config.num_groups;
    shape.topk_groups = config.topk_groups;
    const int lanes = shape.group_size / shape.per_lane;
    shape.lanes_per_group = (config.num_groups > 1 && shape.group_size % shape.per_lane == 0 && (lanes & (lanes - 1)) == 0)
                                ? lanes
                                : 0;
    shape.candidate_filter = config.score != EPLB_ROUTING_SCORE_SOFTMAX && shape.per_lane >= 4 &&
                             (config.num_groups == 1 || shape.lanes_per_group > 0);
    shape.vector_loads = shape.per_lane % 4 == 0 && config.num_experts % 4 == 0 &&
                         reinterpret_cast<uintptr_t>(logits) % 16 == 0;
    shape.renormalize = config.renormalize != 0;
    shape.scale = config.scale_in_weights != 0;
    shape.routed_scaling_factor = config.routed_scaling_factor;
    return shape;
}

// Resident blocks per SM of a kernel (with the largest shared histogram), asked once per kernel:
// the launch path then costs no extra runtime call. Every device of one process is taken to be of
// one architecture.
template <typename Kernel>
int blocks_per_sm(Kernel kernel) {
    int value = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&value, kernel, kThreads,
                                                      size_t(kMaxSharedCounters) * sizeof(int32_t)) != cudaSuccess) {
        cudaGetLastError();
        value = 1;
    }
    return std::max(value, 1);
}

// Enough blocks to fill the device once and no more: warps loop over rows, so each block's
// histogram flush is amortised over many rows.
int grid_size(int64_t num_tokens, int64_t rows_per_block, int sm_count, int resident_per_sm) {
    const int64_t wanted = (num_tokens + rows_per_block - 1) / rows_per_block;
    return int(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(std::max(sm_count, 1)) * resident_per_sm)));
}

template <int kScore, int kMaxPerLane>
cudaError_t launch_topk(const float* logits, const float* bias, int64_t num_tokens, const Shape& shape,
                        const Epilogue& ep, int sm_count, cudaStream_t stream) {
    const auto kernel = topk_kernel<kScore, kMaxPerLane>;
    static const int resident = blocks_per_sm(kernel);
    const int blocks = grid_size(num_tokens, kWarps, sm_count, resident);
    const size_t shared_bytes = ep.shared_counters ? size_t(ep.map.num_physical) * sizeof(int32_t) : 0;
    kernel<<<blocks, kThreads, shared_bytes, stream>>>(logits, bias, num_tokens, shape, ep);
    return cudaGetLastError();
}

template <int kScore>
cudaError_t dispatch_width(const float* logits, const float* bias, int64_t num_tokens, const Shape& shape,
                           const Epilogue& ep, int sm_count, cudaStream_t stream) {
    if (shape.per_lane <= 4) return launch_topk<kScore, 4>(logits, bias, num_tokens, shape, ep, sm_count, stream);
    if (shape.per_lane <= 8) return launch_topk<kScore, 8>(logits, bias, num_tokens, shape, ep, sm_count, stream);
    if (shape.per_lane <= 12) return launch_topk<kScore, 12>(logits, bias, num_tokens, shape, ep, sm_count, stream);
    if (shape.per_lane <= 16) return launch_topk<kScore, 16>(logits, bias, num_tokens, shape, ep, sm_count, stream);
    return launch_topk<kScore, 32>(logits, bias, num_tokens, shape, ep, sm_count, stream);
}

}  // namespace

cudaError_t route_topk(const float* logits, const float* bias, int64_t num_tokens, const eplb_router_config_t& config,
                       const eplb_expert_map_t* map, const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights,
                       uint32_t* error_flags, int sm_count, cudaStream_t stream) {
    if (num_tokens == 0) return cudaSuccess;
    const Shape shape = make_shape(config, logits);
    const Epilogue ep = make_epilogue(map, num_unpadded, topk_ids, topk_weights, error_flags);
    switch (config.score) {
        case EPLB_ROUTING_SCORE_SIGMOID:
            return dispatch_width<EPLB_ROUTING_SCORE_SIGMOID>(logits, bias, num_tokens, shape, ep, sm_count, stream);
        case EPLB_ROUTING_SCORE_SQRT_SOFTPLUS:
            return dispatch_width<EPLB_ROUTING_SCORE_SQRT_SOFTPLUS>(logits, bias, num_tokens, shape, ep, sm_count, stream);
        default:
            return dispatch_width<EPLB_ROUTING_SCORE_SOFTMAX>(logits, nullptr, num_tokens, shape, ep, sm_count, stream);
    }
}

cudaError_t route_hash(const float* logits, const int64_t* token_ids, const int32_t* tid2eid, int64_t vocab_size,
                       int64_t num_tokens, const eplb_router_config_t& config, const eplb_expert_map_t* map,
                       const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights, uint32_t* error_flags,
                       int sm_count, cudaStream_t stream) {
    if (num_tokens == 0) return cudaSuccess;
    const Shape shape = make_shape(config, logits);
    const Epilogue ep = make_epilogue(map, num_unpadded, topk_ids, topk_weights, error_flags);
    const size_t shared_bytes = ep.shared_counters ? size_t(ep.map.num_physical) * sizeof(int32_t) : 0;
    const int64_t rows_per_block = int64_t(kWarps) * (32 / config.top_k);
    if (config.score == EPLB_ROUTING_SCORE_SIGMOID) {
        const auto kernel = hash_kernel<EPLB_ROUTING_SCORE_SIGMOID>;
        static const int resident = blocks_per_sm(kernel);
        kernel<<<grid_size(num_tokens, rows_per_block, sm_count, resident), kThreads, shared_bytes, stream>>>(
            logits, token_ids, tid2eid, vocab_size, num_tokens, shape, ep);
    } else {
        const auto kernel = hash_kernel<EPLB_ROUTING_SCORE_SQRT_SOFTPLUS>;
        static const int resident = blocks_per_sm(kernel);
        kernel<<<grid_size(num_tokens, rows_per_block, sm_count, resident), kThreads, shared_bytes, stream>>>(
            logits, token_ids, tid2eid, vocab_size, num_tokens, shape, ep);
    }
    return cudaGetLastError();
}

}  // namespace eplb::cuda
