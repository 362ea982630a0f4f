// Replica choice for the logical -> physical mapping (SPEC 4.3), shared by CPU and CUDA.
#pragma once

#include <cstdint>

#include "common/hostdevice.hpp"
#include "eplb/eplb_mapping.h"

namespace eplb {

// Knuth's multiplicative hash constant (2^32 / golden ratio), as SGLang's TokenHash dispatch.
constexpr uint32_t kTokenHashMultiplier = 2654435769u;

// Index in [0, count) of the replica that (row, k) uses. count >= 1.
EPLB_HD int32_t select_replica(int32_t selection, int64_t row, int32_t k, int32_t top_k, int32_t count) {
    if (selection == EPLB_REPLICA_SELECTION_ROUND_ROBIN) {
        const uint64_t position = static_cast<uint64_t>(row) * static_cast<uint64_t>(top_k) + static_cast<uint64_t>(k);
        return static_cast<int32_t>(position % static_cast<uint64_t>(count));
    }
    // (row * 2654435769) mod 2^32: unsigned 32-bit multiplication wraps exactly so.
    const uint32_t hashed = static_cast<uint32_t>(row) * kTokenHashMultiplier;
    return static_cast<int32_t>(hashed % static_cast<uint32_t>(count));
}

// Maps one logical id to its physical slot; -1 for ids outside [0, num_logical) and for table
// entries that are out of range (the latter also set *bad_table, which the CPU never sees because
// the ABI layer checks tables first).
EPLB_HD int32_t map_one(const eplb_expert_map_t& map, int32_t logical, int64_t row, int32_t k, int32_t top_k,
                        bool* bad_table) {
    if (logical < 0 || logical >= map.num_logical) return -1;
    const int32_t count = map.logcnt[logical];
    if (count < 1 || count > map.max_replicas) {
        *bad_table = true;
        return -1;
    }
    const int32_t replica = select_replica(map.replica_selection, row, k, top_k, count);
    const int32_t physical = map.log2phy[static_cast<int64_t>(logical) * map.max_replicas + replica];
    if (physical < 0 || physical >= map.num_physical) {
        *bad_table = true;
        return -1;
    }
    return physical;
}

}  // namespace eplb
