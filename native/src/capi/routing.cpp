// ABI entries of the routing kernels: validation of everything, then CPU or CUDA dispatch.
#include <algorithm>
#include <cmath>

#include "capi/validate.hpp"
#include "cpu/routing.hpp"

#if EPLB_WITH_CUDA
#include "cuda/routing.cuh"
#endif

using namespace eplb;
using namespace eplb::capi;

namespace {

const char* score_name(int32_t score) {
    switch (score) {
        case EPLB_ROUTING_SCORE_SIGMOID: return "sigmoid";
        case EPLB_ROUTING_SCORE_SQRT_SOFTPLUS: return "sqrtsoftplus";
        case EPLB_ROUTING_SCORE_SOFTMAX: return "softmax";
    }
    return "unknown";
}

void check_config(const eplb_router_config_t* config, bool hash) {
    if (config == nullptr) invalid("config must not be NULL");
    const eplb_router_config_t& c = *config;
    check_in_range(c.num_experts, 1, EPLB_ROUTING_MAX_EXPERTS, "config->num_experts");
    check_in_range(c.top_k, 1, std::min(c.num_experts, EPLB_ROUTING_MAX_TOP_K), "config->top_k (at most num_experts and 32)");
    if (c.score != EPLB_ROUTING_SCORE_SIGMOID && c.score != EPLB_ROUTING_SCORE_SQRT_SOFTPLUS &&
        c.score != EPLB_ROUTING_SCORE_SOFTMAX)
        invalid("config->score must be SIGMOID (0), SQRT_SOFTPLUS (1) or SOFTMAX (2) (got ", c.score, ")");
    if (hash && c.score == EPLB_ROUTING_SCORE_SOFTMAX)
        invalid("config->score: hash routing weighs its experts with sigmoid or sqrtsoftplus, not softmax");
    check_in_range(c.num_groups, 1, EPLB_ROUTING_MAX_GROUPS, "config->num_groups");
    if (c.num_experts % c.num_groups != 0)
        invalid("config->num_groups = ", c.num_groups, " does not divide config->num_experts = ", c.num_experts);
    if (c.num_groups > 1 && (hash || c.score == EPLB_ROUTING_SCORE_SOFTMAX))
        invalid("config->num_groups = ", c.num_groups, ": group-limited selection applies to ",
                hash ? "scored top-k, not hash routing" : "sigmoid and sqrtsoftplus scores, not softmax");
    check_in_range(c.topk_groups, 1, c.num_groups, "config->topk_groups");
    const int32_t candidates = c.topk_groups * (c.num_experts / c.num_groups);
    if (c.top_k > candidates)
        invalid("config->top_k = ", c.top_k, " exceeds the ", candidates, " experts of the ", c.topk_groups,
                " kept groups (topk_groups * num_experts / num_groups)");
    if (c.scale_in_weights != 0 && !(std::isfinite(c.routed_scaling_factor) && c.routed_scaling_factor > 0.0f))
        invalid("config->routed_scaling_factor must be finite and > 0 when scale_in_weights is set (got ",
                c.routed_scaling_factor, ")");
}

// Checks shared by both entries.
void check_common(eplb_stream_t& stream, const eplb_router_config_t* config, bool hash, const float* logits,
                            int64_t num_tokens, const eplb_expert_map_t* map, const int32_t* num_unpadded,
                            int32_t* topk_ids, float* topk_weights) {
    eplb_stream_t& s = stream;
    check_config(config, hash);
    check_in_range(num_tokens, 0, INT32_MAX, "num_tokens");
    if (map != nullptr) {
        check_expert_map(s, map);
        if (map->num_logical != config->num_experts)
            invalid("map->num_logical = ", map->num_logical, " differs from config->num_experts = ", config->num_experts);
    }
    if (num_tokens > 0) {
        check_elements(s, logits, num_tokens * config->num_experts, "logits");
        check_elements(s, topk_ids, num_tokens * config->top_k, "topk_ids");
        check_elements(s, topk_weights, num_tokens * config->top_k, "topk_weights");
    }
    if (num_unpadded != nullptr) check_elements(s, num_unpadded, 1, "num_unpadded");
}

}  // namespace

extern "C" EPLB_API eplb_status_t eplb_route_topk(eplb_stream_t* stream, const eplb_router_config_t* config,
                                                  const float* logits, const float* bias, int64_t num_tokens,
                                                  const eplb_expert_map_t* map, const int32_t* num_unpadded,
                                                  int32_t* topk_ids, float* topk_weights) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_common(s, config, false, logits, num_tokens, map, num_unpadded, topk_ids, topk_weights);
    if (bias != nullptr) {
        if (config->score == EPLB_ROUTING_SCORE_SOFTMAX)
            invalid("bias must be NULL for softmax routing (the ", score_name(config->score), " score selects by logit)");
        check_elements(s, bias, config->num_experts, "bias");
    }
    if (num_tokens == 0) return EPLB_STATUS_OK;

    if (s.backend == EPLB_BACKEND_CPU) {
        cpu::route_topk(logits, bias, num_tokens, *config, map, num_unpadded, topk_ids, topk_weights,
                        s.device_error_flags);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::route_topk(logits, bias, num_tokens, *config, map, num_unpadded, topk_ids, topk_weights,
                                         s.device_error_flags, s.sm_count, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

extern "C" EPLB_API eplb_status_t eplb_route_hash(eplb_stream_t* stream, const eplb_router_config_t* config,
                                                  const float* logits, const int64_t* token_ids, const int32_t* tid2eid,
                                                  int64_t vocab_size, int64_t num_tokens, const eplb_expert_map_t* map,
                                                  const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_common(s, config, true, logits, num_tokens, map, num_unpadded, topk_ids, topk_weights);
    check_in_range(vocab_size, 1, INT32_MAX, "vocab_size");
    if (num_tokens > 0) {
        check_elements(s, token_ids, num_tokens, "token_ids");
        check_elements(s, tid2eid, vocab_size * config->top_k, "tid2eid");
    }
    if (num_tokens == 0) return EPLB_STATUS_OK;

    if (s.backend == EPLB_BACKEND_CPU) {
        // Every real row's token id and the table entries it uses, before anything is written.
        const int64_t unpadded = num_unpadded ? std::clamp<int64_t>(*num_unpadded, 0, num_tokens) : num_tokens;
        const int32_t top_k = config->top_k;
        for (int64_t row = 0; row < unpadded; ++row) {
            const int64_t token = token_ids[row];
            if (token < 0 || token >= vocab_size)
                invalid("token_ids[", row, "] = ", token, " is outside [0, vocab_size = ", vocab_size, ")");
            for (int32_t k = 0; k < top_k; ++k) {
                const int32_t expert = tid2eid[token * top_k + k];
                if (expert < 0 || expert >= config->num_experts)
                    invalid("tid2eid[", token, "][", k, "] = ", expert, " (token_ids[", row, "]) is outside [0, num_experts = ",
                            config->num_experts, ")");
            }
        }
        cpu::route_hash(logits, token_ids, tid2eid, vocab_size, num_tokens, *config, map, num_unpadded, topk_ids,
                        topk_weights, s.device_error_flags);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::route_hash(logits, token_ids, tid2eid, vocab_size, num_tokens, *config, map, num_unpadded,
                                         topk_ids, topk_weights, s.device_error_flags, s.sm_count, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}
