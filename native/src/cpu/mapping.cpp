#include "cpu/mapping.hpp"

#include <algorithm>

#include "common/replica.hpp"
#include "cpu/record.hpp"

namespace eplb::cpu {

void map_logical_to_physical(const int32_t* topk_ids, int64_t num_tokens, int32_t top_k, const eplb_expert_map_t& map,
                             const int32_t* num_unpadded, int32_t* physical_ids, uint32_t* error_flags) {
    const int64_t unpadded = num_unpadded ? std::clamp<int64_t>(*num_unpadded, 0, num_tokens) : num_tokens;
    const bool record = map.record_flag != nullptr && *map.record_flag != 0 && map.counters != nullptr;
    LoadRecorder recorder(record ? map.counters : nullptr, map.num_physical, error_flags);
    bool bad_table = false;  // cannot happen after validation; kept for the shared helper's contract
    for (int64_t row = 0; row < num_tokens; ++row) {
        const bool padded = row >= unpadded;
        for (int32_t k = 0; k < top_k; ++k) {
            const int64_t index = row * top_k + k;
            // Route -> map -> mask padding -> record.
            const int32_t physical = padded ? -1 : map_one(map, topk_ids[index], row, k, top_k, &bad_table);
            physical_ids[index] = physical;
            if (record && physical >= 0) recorder.add(physical);
        }
    }
}

}  // namespace eplb::cpu
