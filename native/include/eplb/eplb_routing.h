/*
 * eplb_routing.h - MoE routing kernels fused with the EPLB epilogue (docs/design.md §4): scored top-k
 * (DeepSeek-V3 sigmoid / V4 sqrtsoftplus with bias and group-limited selection, plain softmax) and
 * DeepSeek-V4 hash routing. Included by eplb.h; see the conventions there.
 *
 * Every routing kernel ends in the same epilogue, in one pass: logical id -> physical slot through
 * the layer's eplb_expert_map_t (the replica choice of map->replica_selection: TOKEN_HASH,
 * ROUND_ROBIN, or NODE_LOCAL with map->num_nodes and map->source_node) -> rows >= *num_unpadded
 * set to -1 -> counters[slot] += 1 when the map's record flag is set (atomic, saturating at
 * INT32_MAX as eplb_map_logical_to_physical). No host synchronisation, no allocation:
 * safe under CUDA graph capture (after one call outside it: the first launch of a process does
 * one-time setup), and replays see tables, *num_unpadded and the record flag updated in place.
 *
 * Numbers (identical on CPU and CUDA, bit for bit, so ids are exact and weights equal):
 *   - sigmoid(x) = 1 / (1 + exp(-x)); sqrtsoftplus(x) = sqrt(max(x,0) + log1p(exp(-|x|))), both
 *     computed with libeplb's own exp/log1p (round-to-nearest float operations only); exp flushes to 0
 *     below the normal float range, so sqrtsoftplus(x) = 0 and sigmoid(x) = 0 for x < -87.3365.
 *   - Logits of +-inf count as +-FLT_MAX. A NaN logit is never preferred over a non-NaN one (its
 *     selection key is -inf) and its weight is 0. A NaN key (NaN bias, inf + -inf) counts as -inf.
 *   - Ties in selection: the lower expert id wins. Groups: the lower group id wins.
 *   - Renormalisation divides by (sum of the top-k values in selection order) + 1e-20, so a row whose
 *     scores all underflow gets weights 0, never NaN.
 */
#ifndef EPLB_EPLB_ROUTING_H
#define EPLB_EPLB_ROUTING_H

#include "eplb/eplb_core.h"
#include "eplb/eplb_mapping.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest number of logical experts a router may have. */
#define EPLB_ROUTING_MAX_EXPERTS 1024
/* Largest top-k. */
#define EPLB_ROUTING_MAX_TOP_K 32
/* Largest number of expert groups (group-limited routing). */
#define EPLB_ROUTING_MAX_GROUPS 32

/* How router logits become scores. */
typedef enum eplb_routing_score {
    /* s = sigmoid(logit): DeepSeek-V3 (noaux_tc). */
    EPLB_ROUTING_SCORE_SIGMOID = 0,
    /* s = sqrt(softplus(logit)): DeepSeek-V4. */
    EPLB_ROUTING_SCORE_SQRT_SOFTPLUS = 1,
    /* Mixtral/Qwen: select the top-k logits; weights are softmax(logits) at them (renormalise: the
     * softmax over the top-k logits only). No bias, no groups. Not for hash routing. */
    EPLB_ROUTING_SCORE_SOFTMAX = 2
} eplb_routing_score_t;

/* What a MoE layer's router computes. Caller-owned host memory, read during the call only. */
typedef struct eplb_router_config {
    /* N: logical experts, in [1, EPLB_ROUTING_MAX_EXPERTS]. Equals map->num_logical when a map is given. */
    int32_t num_experts;
    /* K: experts per token, in [1, min(N, EPLB_ROUTING_MAX_TOP_K)]. */
    int32_t top_k;
    /* An eplb_routing_score_t. */
    int32_t score;
    /* Group-limited selection (DeepSeek-V3): N/num_groups consecutive experts form a group; a group's
     * score is the sum of its two largest s + bias (its only one when a group has one expert); the
     * topk_groups best groups are kept and the top-k is taken among their experts. 1 = no groups.
     * In [1, EPLB_ROUTING_MAX_GROUPS], divides N; scored sigmoid/sqrtsoftplus top-k only. */
    int32_t num_groups;
    /* Groups kept, in [1, num_groups], with top_k <= topk_groups * N / num_groups. */
    int32_t topk_groups;
    /* Non-zero: divide the top-k weights by their sum (+1e-20). DeepSeek: 1. */
    int32_t renormalize;
    /* Non-zero: multiply the weights by routed_scaling_factor (DeepSeek's reference and vLLM; SGLang
     * scales the expert output instead and passes 0). */
    int32_t scale_in_weights;
    /* Finite and > 0 when scale_in_weights is set (DeepSeek-V3: 2.5). */
    float routed_scaling_factor;
} eplb_router_config_t;

/* Scored top-k routing with the EPLB epilogue (docs/design.md §4.1, 4.3), queued on stream:
 *   s = score(logits[t][e]); selection key = s + bias[e] (sigmoid, sqrtsoftplus) or the logit
 *   (softmax); optional group-limited selection; top-k by key (ties: lower id), in descending key
 *   order; weights = the unbiased s (softmax: probabilities) at the selected ids, renormalised and
 *   scaled per config; ids mapped to physical slots and counted per map.
 * config        caller-owned, read during the call.
 * logits        [num_tokens][N] fp32 router logits.
 * bias          [N] fp32 selection bias (e_score_correction_bias), or NULL for none. Must be NULL
 *               for softmax.
 * map           the layer's EPLB tables (eplb_expert_map_t of eplb_mapping.h; spelled by its struct
 *               tag here so either header may be included first), or NULL when EPLB is off: the
 *               outputs are then the logical ids and nothing is recorded. map->num_logical must equal N.
 * num_unpadded  scalar (device scalar on CUDA, graph-safe); rows >= *num_unpadded get ids -1 and
 *               weights 0, are not counted and their logits are not read. NULL: every row is real.
 * topk_ids      [num_tokens][K] int32 output: physical slots (logical ids when map is NULL).
 * topk_weights  [num_tokens][K] fp32 output.
 * Every output element is written; outputs must not overlap the inputs. On CUDA the pointers are
 * device memory and the call only queues work; a bad table entry yields -1, is not counted and sets
 * EPLB_DEVICE_ERROR_BAD_TABLE on the stream. On CPU bad tables fail before anything is written. */
EPLB_API eplb_status_t eplb_route_topk(eplb_stream_t *stream, const eplb_router_config_t *config, const float *logits,
                                       const float *bias, int64_t num_tokens, const eplb_expert_map_t *map,
                                       const int32_t *num_unpadded, int32_t *topk_ids, float *topk_weights);

/* DeepSeek-V4 hash routing with the EPLB epilogue (docs/design.md §4.2, 4.3), queued on stream:
 *   ids[t][k] = tid2eid[token_ids[t]][k]; weights[t][k] = s(logits[t][ids[t][k]]), renormalised and
 *   scaled per config (config->score: sigmoid or sqrtsoftplus; num_groups must be 1). Repeated
 *   experts in a table row are routed (and counted) once per occurrence.
 * logits        [num_tokens][N] fp32 router logits (only the K chosen entries of a row are read).
 * token_ids     [num_tokens] int64 token ids, each in [0, vocab_size).
 * tid2eid       [vocab_size][K] int32 hash table, entries in [0, N).
 * Other arguments as eplb_route_topk. Bad input is never read out of bounds: on CPU a token id
 * outside [0, vocab_size) or a used table entry outside [0, N) fails with
 * EPLB_STATUS_INVALID_ARGUMENT (naming the row and value) before anything is written; on CUDA the
 * row (bad token id) or the slot (bad entry) gets id -1 and weight 0, is not counted, and
 * EPLB_DEVICE_ERROR_BAD_TOKEN_ID / EPLB_DEVICE_ERROR_BAD_EXPERT_ID is set on the stream. Padding
 * rows are not checked. */
EPLB_API eplb_status_t eplb_route_hash(eplb_stream_t *stream, const eplb_router_config_t *config, const float *logits,
                                       const int64_t *token_ids, const int32_t *tid2eid, int64_t vocab_size,
                                       int64_t num_tokens, const eplb_expert_map_t *map, const int32_t *num_unpadded,
                                       int32_t *topk_ids, float *topk_weights);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_EPLB_ROUTING_H */
