#include "cpu/routing.hpp"

#include <algorithm>
#include <vector>

#include "common/replica.hpp"
#include "common/routing_math.hpp"
#include "cpu/record.hpp"

// The scores use std::fma (correctly rounded, so the bits are the same with or without a hardware
// FMA). Without -mfma it is a libm call per operation; a clone built for FMA hardware inlines it and
// runs the scoring about twice as fast. GCC/clang pick the clone at load time (ifunc).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define EPLB_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define EPLB_FMA_CLONES
#endif

namespace eplb::cpu {

namespace {

using namespace eplb::routing;

// Map -> record, the tail of the fused epilogue (padding rows never reach it). The loads reach the
// counters when it goes out of scope.
class Epilogue {
public:
    Epilogue(const eplb_expert_map_t* map, int32_t top_k, uint32_t* error_flags)
        : map_(map), top_k_(top_k),
          recorder_(map != nullptr && map->record_flag != nullptr && *map->record_flag != 0 ? map->counters : nullptr,
                    map != nullptr ? map->num_physical : 0, error_flags) {}

    int32_t apply(int32_t logical, int64_t row, int32_t k) {
        bool bad_table = false;  // cannot happen after validation; kept for the shared helper's contract
        const int32_t physical = map_ ? map_one(*map_, logical, row, k, top_k_, &bad_table) : logical;
        if (recorder_.recording() && physical >= 0) recorder_.add(physical);
        return physical;
    }

private:
    const eplb_expert_map_t* map_;
    int32_t top_k_;
    LoadRecorder recorder_;
};

int64_t unpadded_rows(const int32_t* num_unpadded, int64_t num_tokens) {
    return num_unpadded ? std::clamp<int64_t>(*num_unpadded, 0, num_tokens) : num_tokens;
}

void write_padding(int64_t row, int32_t top_k, int32_t* topk_ids, float* topk_weights) {
    std::fill_n(topk_ids + row * top_k, top_k, -1);
    std::fill_n(topk_weights + row * top_k, top_k, 0.0f);
}

// Selection keys and values (s, or the clamped logit for softmax) of one row.
EPLB_FMA_CLONES void score_row(const float* x, const float* bias, int32_t n, int32_t score_function, uint32_t* keys,
                               float* values) {
    for (int32_t e = 0; e < n; ++e) {
        if (score_function == EPLB_ROUTING_SCORE_SOFTMAX) {
            keys[e] = logit_key(x[e]);
            values[e] = is_nan(x[e]) ? -INFINITY : clamp_logit(x[e]);
        } else {
            const float s = score_function == EPLB_ROUTING_SCORE_SIGMOID ? score<EPLB_ROUTING_SCORE_SIGMOID>(x[e])
                                                                         : score<EPLB_ROUTING_SCORE_SQRT_SOFTPLUS>(x[e]);
            keys[e] = biased_key(x[e], s, bias ? bias[e] : 0.0f);
            values[e] = s;
        }
    }
}

// The top_k experts with the largest keys (kNoKey excluded), largest first, the lower id first among
// equal keys: one pass, inserting only what beats the current k-th.
void select_top_k(const uint32_t* keys, int32_t n, int32_t top_k, int32_t* selected) {
    int32_t count = 0;
    for (int32_t e = 0; e < n; ++e) {
        const uint32_t key = keys[e];
        if (key == kNoKey || (count == top_k && key <= keys[selected[top_k - 1]])) continue;  // a later equal key loses
        int32_t position = count < top_k ? count++ : top_k - 1;
        while (position > 0 && keys[selected[position - 1]] < key) {
            selected[position] = selected[position - 1];
            --position;
        }
        selected[position] = e;
    }
}

// The softmax denominator in the CUDA kernel's order: lane l adds experts [l * E, (l + 1) * E) in
// ascending order, then the 32 partial sums combine in an xor butterfly (16, 8, 4, 2, 1), where
// a + b == b + a makes every lane's result the same.
float softmax_denominator(const float* numerators, int32_t num_experts) {
    const int32_t per_lane = experts_per_lane(num_experts);
    float partial[32];
    for (int32_t lane = 0; lane < 32; ++lane) {
        float sum = 0.0f;
        for (int32_t i = 0; i < per_lane; ++i) {
            const int32_t expert = lane * per_lane + i;
            if (expert < num_experts) sum = fadd(sum, numerators[expert]);
        }
        partial[lane] = sum;
    }
    for (int32_t offset = 16; offset >= 1; offset /= 2) {
        float next[32];
        for (int32_t lane = 0; lane < 32; ++lane) next[lane] = fadd(partial[lane], partial[lane ^ offset]);
        std::copy(next, next + 32, partial);
    }
    return partial[0];
}

}  // namespace

EPLB_FMA_CLONES void route_topk(const float* logits, const float* bias, int64_t num_tokens, const eplb_router_config_t& config,
                const eplb_expert_map_t* map, const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights,
                uint32_t* error_flags) {
    const int32_t n = config.num_experts;
    const int32_t top_k = config.top_k;
    const int32_t groups = config.num_groups;
    const int32_t group_size = n / groups;
    const bool softmax = config.score == EPLB_ROUTING_SCORE_SOFTMAX;
    const bool renormalize = config.renormalize != 0;
    const bool scale = config.scale_in_weights != 0;
    const int64_t unpadded = unpadded_rows(num_unpadded, num_tokens);
    Epilogue epilogue(map, top_k, error_flags);

    std::vector<uint32_t> keys(size_t(n), kNoKey);
    std::vector<float> values(size_t(n), 0.0f);    // s (sigmoid, sqrtsoftplus) or the clamped logit (softmax)
    std::vector<float> numerators(size_t(n), 0.0f);
    std::vector<uint32_t> group_keys(size_t(groups), kNoKey);
    int32_t selected[EPLB_ROUTING_MAX_TOP_K];

    for (int64_t row = 0; row < num_tokens; ++row) {
        if (row >= unpadded) {
            write_padding(row, top_k, topk_ids, topk_weights);
            continue;
        }
        // Score.
        score_row(logits + row * n, bias, n, config.score, keys.data(), values.data());
        // Groups: score = the two largest keys added; keep the best topk_groups (ties: lower group).
        if (groups > 1) {
            for (int32_t g = 0; g < groups; ++g) {
                uint32_t first = kNoKey, second = kNoKey;
                for (int32_t e = g * group_size; e < (g + 1) * group_size; ++e) {
                    if (keys[e] > first) {
                        second = first;
                        first = keys[e];
                    } else if (keys[e] > second) {
                        second = keys[e];
                    }
                }
                group_keys[g] = group_key(first, second);
            }
            uint32_t kept = 0;
            for (int32_t r = 0; r < config.topk_groups; ++r) {
                int32_t best = -1;
                for (int32_t g = 0; g < groups; ++g)
                    if (!((kept >> g) & 1u) && (best < 0 || group_keys[g] > group_keys[best])) best = g;
                kept |= 1u << best;
            }
            for (int32_t e = 0; e < n; ++e)
                if (!((kept >> (e / group_size)) & 1u)) keys[e] = kNoKey;
        }
        // Select.
        select_top_k(keys.data(), n, top_k, selected);
        const uint32_t first_key = keys[selected[0]];
        // Weights.
        float picked[EPLB_ROUTING_MAX_TOP_K];
        float sum = 0.0f;
        if (softmax) {
            const float max = key_value(first_key);
            for (int32_t k = 0; k < top_k; ++k) {
                picked[k] = softmax_numerator(values[selected[k]], max);
                sum = fadd(sum, picked[k]);
            }
            if (!renormalize) {
                for (int32_t e = 0; e < n; ++e) numerators[e] = softmax_numerator(values[e], max);
                sum = softmax_denominator(numerators.data(), n);
            }
        } else {
            for (int32_t k = 0; k < top_k; ++k) {
                picked[k] = values[selected[k]];
                sum = fadd(sum, picked[k]);
            }
        }
        // Epilogue.
        for (int32_t k = 0; k < top_k; ++k) {
            topk_weights[row * top_k + k] = finish_weight(picked[k], sum, softmax || renormalize, scale,
                                                          config.routed_scaling_factor);
            topk_ids[row * top_k + k] = epilogue.apply(selected[k], row, k);
        }
    }
}

EPLB_FMA_CLONES void route_hash(const float* logits, const int64_t* token_ids, const int32_t* tid2eid, int64_t vocab_size,
                int64_t num_tokens, const eplb_router_config_t& config, const eplb_expert_map_t* map,
                const int32_t* num_unpadded, int32_t* topk_ids, float* topk_weights, uint32_t* error_flags) {
    const int32_t n = config.num_experts;
    const int32_t top_k = config.top_k;
    const bool sigmoid_score = config.score == EPLB_ROUTING_SCORE_SIGMOID;
    const int64_t unpadded = unpadded_rows(num_unpadded, num_tokens);
    Epilogue epilogue(map, top_k, error_flags);
    int32_t ids[EPLB_ROUTING_MAX_TOP_K];
    float scores[EPLB_ROUTING_MAX_TOP_K];

    for (int64_t row = 0; row < num_tokens; ++row) {
        if (row >= unpadded) {
            write_padding(row, top_k, topk_ids, topk_weights);
            continue;
        }
        // Route: the table row of the token, the scores at its experts.
        const int64_t token = token_ids[row];
        const bool token_ok = token >= 0 && token < vocab_size;
        float sum = 0.0f;
        for (int32_t k = 0; k < top_k; ++k) {
            ids[k] = -1;
            scores[k] = 0.0f;
            if (token_ok) {
                const int32_t expert = tid2eid[token * top_k + k];
                if (expert >= 0 && expert < n) {
                    const float x = logits[row * n + expert];
                    ids[k] = expert;
                    scores[k] = sigmoid_score ? score<EPLB_ROUTING_SCORE_SIGMOID>(x) : score<EPLB_ROUTING_SCORE_SQRT_SOFTPLUS>(x);
                }
            }
            sum = fadd(sum, scores[k]);
        }
        // Epilogue.
        for (int32_t k = 0; k < top_k; ++k) {
            topk_weights[row * top_k + k] = finish_weight(scores[k], sum, config.renormalize != 0,
                                                          config.scale_in_weights != 0, config.routed_scaling_factor);
            topk_ids[row * top_k + k] = epilogue.apply(ids[k], row, k);
        }
    }
}

}  // namespace eplb::cpu
