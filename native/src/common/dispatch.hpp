// Per-element rules of the dispatch ops (docs/design.md §6), shared by the CPU reference and the CUDA kernels
// so that both bucket the same pairs and round the same sums.
#pragma once

#include <cstdint>

#include "common/hostdevice.hpp"

namespace eplb {

// Bucket of a pair that takes no row (not local, not routed, or a bad slot).
constexpr int32_t kNoBucket = -1;

// Local expert of a slot for align: slot - first_slot when the slot lies in
// [first_slot, first_slot + num_local), else kNoBucket. first_slot >= 0, so -1 is never local.
struct LocalExpertOf {
    int32_t first_slot;
    int32_t num_local;

    EPLB_HD int32_t operator()(int32_t slot, bool* /*bad*/) const {
        const int64_t expert = int64_t(slot) - first_slot;
        return slot >= 0 && expert >= 0 && expert < num_local ? int32_t(expert) : kNoBucket;
    }
};

// Destination rank of a slot for EP bucketing: slot / (R / G) (docs/design.md §1: rank g owns slots
// [g*R/G, (g+1)*R/G)). -1 (not routed) has none; any other slot outside [0, R) has none and sets *bad.
struct RankOf {
    int32_t num_physical;
    int32_t slots_per_rank;

    EPLB_HD int32_t operator()(int32_t slot, bool* bad) const {
        if (slot >= 0 && slot < num_physical) return slot / slots_per_rank;
        if (slot != -1) *bad = true;
        return kNoBucket;
    }
};

// Worst-case rows of an aligned layout: every expert that has a pair pads at most block_size - 1 rows.
EPLB_HD int64_t align_capacity(int64_t num_pairs, int32_t num_buckets, int32_t block_size) {
    const int64_t padded_experts = num_pairs < num_buckets ? num_pairs : int64_t(num_buckets);
    return num_pairs + padded_experts * (int64_t(block_size) - 1);
}

EPLB_HD int32_t round_up(int32_t value, int32_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// One step of the combine sum, acc + w * y with two roundings. Spelled out with __fmul_rn and
// __fadd_rn on the device because nvcc would otherwise contract it into an FMA (one rounding),
// and the CPU reference is compiled with -ffp-contract=off (native/CMakeLists.txt).
EPLB_HD float weighted_add(float acc, float weight, float value) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(acc, __fmul_rn(weight, value));
#else
    return acc + weight * value;
#endif
}

}  // namespace eplb
