#include "capi/validate.hpp"

namespace eplb::capi {

void check_in_range(int64_t value, int64_t lo, int64_t hi, const char* name) {
    if (value < lo || value > hi) invalid(name, " must be in [", lo, ", ", hi, "] (got ", value, ")");
}

void check_expert_map(const eplb_stream_t& stream, const eplb_expert_map_t* map) {
    if (map == nullptr) invalid("map must not be NULL (EPLB off means: do not call the mapping)");
    check_in_range(map->num_logical, 1, INT32_MAX, "map->num_logical");
    check_in_range(map->max_replicas, 1, INT32_MAX, "map->max_replicas");
    check_in_range(map->num_physical, 1, INT32_MAX, "map->num_physical");
    if (int64_t(map->num_logical) * map->max_replicas > (int64_t(1) << 31))
        invalid("map->num_logical * map->max_replicas overflows (", map->num_logical, " x ", map->max_replicas, ")");
    if (map->replica_selection != EPLB_REPLICA_SELECTION_TOKEN_HASH &&
        map->replica_selection != EPLB_REPLICA_SELECTION_ROUND_ROBIN &&
        map->replica_selection != EPLB_REPLICA_SELECTION_NODE_LOCAL)
        invalid("map->replica_selection must be TOKEN_HASH (0), ROUND_ROBIN (1) or NODE_LOCAL (2) (got ",
                map->replica_selection, ")");
    if (map->replica_selection == EPLB_REPLICA_SELECTION_NODE_LOCAL) {
        check_in_range(map->num_nodes, 1, map->num_physical, "map->num_nodes (NODE_LOCAL)");
        if (map->num_physical % map->num_nodes != 0)
            invalid("map->num_nodes = ", map->num_nodes, " does not divide map->num_physical = ", map->num_physical,
                    " (NODE_LOCAL: every node holds num_physical / num_nodes slots)");
        check_in_range(map->source_node, 0, int64_t(map->num_nodes) - 1, "map->source_node (NODE_LOCAL)");
    }
    check_elements(stream, map->log2phy, int64_t(map->num_logical) * map->max_replicas, "map->log2phy");
    check_elements(stream, map->logcnt, map->num_logical, "map->logcnt");
    if (map->record_flag != nullptr) {
        check_elements(stream, map->record_flag, 1, "map->record_flag");
        if (map->counters == nullptr) invalid("map->counters must not be NULL when map->record_flag is set");
    }
    if (map->counters != nullptr) check_elements(stream, map->counters, map->num_physical, "map->counters");

    if (stream.backend != EPLB_BACKEND_CPU) return;
    for (int32_t expert = 0; expert < map->num_logical; ++expert) {
        const int32_t count = map->logcnt[expert];
        if (count < 1 || count > map->max_replicas)
            invalid("map->logcnt[", expert, "] = ", count, " is outside [1, max_replicas = ", map->max_replicas,
                    "] (Kmax must be at least the largest replica count)");
        const int32_t* row = map->log2phy + int64_t(expert) * map->max_replicas;
        for (int32_t replica = 0; replica < count; ++replica) {
            if (row[replica] < 0 || row[replica] >= map->num_physical)
                invalid("map->log2phy[", expert, "][", replica, "] = ", row[replica], " is outside [0, num_physical = ",
                        map->num_physical, ")");
        }
    }
}

}  // namespace eplb::capi
