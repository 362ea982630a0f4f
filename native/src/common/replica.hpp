// Replica choice for the logical -> physical mapping (docs/design.md §4.3, eplb_mapping.h), shared by CPU and
// CUDA so both give the same bits.
#pragma once

#include <cstdint>

#include "common/hostdevice.hpp"
#include "eplb/eplb_mapping.h"

namespace eplb {

// Knuth's multiplicative hash constant (2^32 / golden ratio), as SGLang's TokenHash dispatch.
constexpr uint32_t kTokenHashMultiplier = 2654435769u;

// The TokenHash of a row: (row * 2654435769) mod 2^32 (unsigned 32-bit multiplication wraps so).
EPLB_HD uint32_t token_hash(int64_t row) { return static_cast<uint32_t>(row) * kTokenHashMultiplier; }

// Index in [0, count) of the replica that (row, k) uses, for TOKEN_HASH and ROUND_ROBIN. count >= 1.
EPLB_HD int32_t select_replica(int32_t selection, int64_t row, int32_t k, int32_t top_k, int32_t count) {
    if (selection == EPLB_REPLICA_SELECTION_ROUND_ROBIN) {
        const uint64_t position = static_cast<uint64_t>(row) * static_cast<uint64_t>(top_k) + static_cast<uint64_t>(k);
        return static_cast<int32_t>(position % static_cast<uint64_t>(count));
    }
    return static_cast<int32_t>(token_hash(row) % static_cast<uint32_t>(count));
}

// NODE_LOCAL: index in [0, count) of the replica in slots[0, count) that a row from source_node
// uses: the (h mod m)-th of the m replicas whose slot is on that node, else TokenHash over all.
// Nodes own consecutive ranges of slots_per_node slots. Two passes over at most Kmax entries, no
// assumption about their order (a bad table still indexes inside [0, count)).
EPLB_HD int32_t select_node_local_replica(const int32_t* slots, int32_t count, int64_t row, int32_t source_node,
                                          int32_t slots_per_node) {
    const int64_t first = static_cast<int64_t>(source_node) * slots_per_node;
    const int64_t last = first + slots_per_node;  // exclusive
    int32_t local = 0;
    for (int32_t r = 0; r < count; ++r) local += (slots[r] >= first && slots[r] < last) ? 1 : 0;
    const uint32_t hashed = token_hash(row);
    if (local == 0) return static_cast<int32_t>(hashed % static_cast<uint32_t>(count));
    int32_t wanted = static_cast<int32_t>(hashed % static_cast<uint32_t>(local));
    for (int32_t r = 0; r < count; ++r) {
        if (slots[r] >= first && slots[r] < last) {
            if (wanted == 0) return r;
            --wanted;
        }
    }
    return 0;  // unreachable: wanted < local
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
    const int32_t* slots = map.log2phy + static_cast<int64_t>(logical) * map.max_replicas;
    const int32_t replica =
        map.replica_selection == EPLB_REPLICA_SELECTION_NODE_LOCAL
            ? select_node_local_replica(slots, count, row, map.source_node, map.num_physical / map.num_nodes)
            : select_replica(map.replica_selection, row, k, top_k, count);
    const int32_t physical = slots[replica];
    if (physical < 0 || physical >= map.num_physical) {
        *bad_table = true;
        return -1;
    }
    return physical;
}

}  // namespace eplb
