/*
 * eplb_mapping.h - logical -> physical expert mapping with load recording (docs/design.md §4.3).
 * Included by eplb.h; see the conventions there.
 */
#ifndef EPLB_EPLB_MAPPING_H
#define EPLB_EPLB_MAPPING_H

#include "eplb/eplb_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* How a token picks one of an expert's replicas. */
typedef enum eplb_replica_selection {
    /* replica = ((row * 2654435769) mod 2^32) mod logcnt[id]: a function of the token row only, so
     * every rank picks the same replica for the same token (SGLang #32962). The default. */
    EPLB_REPLICA_SELECTION_TOKEN_HASH = 0,
    /* replica = (row * top_k + k) mod logcnt[id]: spreads the k-slots of a row (vLLM's choice). */
    EPLB_REPLICA_SELECTION_ROUND_ROBIN = 1,
    /* Prefer a replica on the token's own node (SGLang's static dispatch does the same), so the
     * token's hidden state stays on the node's fast links. The num_physical slots split into
     * num_nodes equal, consecutive ranges (slot s is on node s / (num_physical / num_nodes), as ranks
     * own consecutive slots and nodes consecutive ranks). Of the id's replicas (its first logcnt
     * log2phy entries) those on source_node are its local replicas, in table order; with h =
     * (row * 2654435769) mod 2^32 as TOKEN_HASH:
     *   m local replicas, m >= 1: the (h mod m)-th local replica;
     *   none:                     replica h mod logcnt[id] (TOKEN_HASH).
     * A function of the row, source_node and the tables only: every rank that maps a token from the
     * same node picks the same slot, and CPU and CUDA give the same bits. */
    EPLB_REPLICA_SELECTION_NODE_LOCAL = 2
} eplb_replica_selection_t;

/* The EPLB tables of one MoE layer, as raw pointers of the stream's backend. The struct itself is
 * caller-owned host memory, read during the call only; the tables it points to are read (and the
 * counters written) by the queued work, so they must stay alive until it finishes. Tables are
 * updated in place on rebalance, so a captured CUDA graph keeps seeing the current placement. */
typedef struct eplb_expert_map {
    /* [num_logical][max_replicas]: the slots of each logical expert, ascending, padded with -1. */
    const int32_t *log2phy;
    /* [num_logical]: replicas of each logical expert, each in [1, max_replicas]. */
    const int32_t *logcnt;
    /* [num_physical]: per-slot load counters, incremented once per routed (token, k) when recording,
     * atomically (several streams or threads may record into one layer at once), saturating at
     * INT32_MAX (EPLB_DEVICE_ERROR_COUNTER_OVERFLOW). NULL when record_flag is NULL. */
    int32_t *counters;
    /* Scalar: record when the value is non-zero (a device scalar on CUDA, so graph replays can turn
     * recording on and off). NULL never records. */
    const int32_t *record_flag;
    /* N: logical experts of the layer. */
    int32_t num_logical;
    /* Kmax: capacity of a log2phy row, fixed when the tables are created. */
    int32_t max_replicas;
    /* R: physical slots of the layer; every table entry lies in [0, R). */
    int32_t num_physical;
    /* An eplb_replica_selection_t. */
    int32_t replica_selection;
    /* NODE_LOCAL only (ignored otherwise, set 0): nodes over which the slots split, in
     * [1, num_physical] and dividing num_physical; and the node the mapped tokens come from (the
     * calling rank's node: rank / (ranks / num_nodes)), in [0, num_nodes). */
    int32_t num_nodes;
    int32_t source_node;
} eplb_expert_map_t;

/* Maps logical expert ids to physical slots and records the load, in one pass:
 *   route (topk_ids, logical) -> map (replica choice of map->replica_selection) -> mask padding
 *   -> record (counters[phys] += 1 when recording; a counter at INT32_MAX stays there and sets
 *   EPLB_DEVICE_ERROR_COUNTER_OVERFLOW on the stream, so a load never wraps negative).
 * topk_ids      [num_tokens][top_k] logical ids; ids < 0 or >= num_logical map to -1, uncounted.
 * num_unpadded  scalar (device scalar on CUDA, graph-safe); rows >= *num_unpadded become -1 and
 *               are not counted. NULL means every row is real.
 * physical_ids  [num_tokens][top_k] output, every element written; may equal topk_ids (in place).
 * On the CPU backend the tables are checked first (logcnt in [1, Kmax], entries in [0, R)) and bad
 * tables fail with EPLB_STATUS_INVALID_ARGUMENT before anything is written. On CUDA a bad table
 * entry yields -1, is not counted and sets EPLB_DEVICE_ERROR_BAD_TABLE on the stream. */
EPLB_API eplb_status_t eplb_map_logical_to_physical(eplb_stream_t *stream, const int32_t *topk_ids, int64_t num_tokens,
                                                    int32_t top_k, const eplb_expert_map_t *map,
                                                    const int32_t *num_unpadded, int32_t *physical_ids);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_EPLB_MAPPING_H */
