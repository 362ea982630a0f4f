// Tests of eplb_route_topk and eplb_route_hash through the public ABI: hand goldens from the
// formulas of docs/design.md §4 (CPU backend), properties against an independent double-precision oracle,
// bad input, rows built from the real load files, and CUDA == CPU (skipped without a device).
#include <cfloat>
#include <cmath>
#include <limits>

#include "test_util.hpp"

#if EPLB_TESTS_WITH_CUDART
#include <cuda_runtime_api.h>
#endif

using namespace eplb::test;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

eplb_router_config_t make_config(int32_t n, int32_t k, int32_t score, int32_t groups = 1, int32_t topk_groups = 1,
                                 bool renormalize = true, bool scale = false, float factor = 1.0f) {
    eplb_router_config_t c{};
    c.num_experts = n;
    c.top_k = k;
    c.score = score;
    c.num_groups = groups;
    c.topk_groups = topk_groups;
    c.renormalize = renormalize ? 1 : 0;
    c.scale_in_weights = scale ? 1 : 0;
    c.routed_scaling_factor = factor;
    return c;
}

// One routing call. An empty bias passes NULL; tables == nullptr passes no map (EPLB off).
struct Call {
    eplb_router_config_t config{};
    std::vector<float> logits;
    std::vector<float> bias;
    int64_t num_tokens = 0;
    const Tables* tables = nullptr;
    int32_t num_unpadded = -1;  // < 0: NULL
    int32_t record = 1;         // < 0: NULL flag
    int32_t selection = EPLB_REPLICA_SELECTION_TOKEN_HASH;
    bool hash = false;
    std::vector<int64_t> token_ids;
    std::vector<int32_t> tid2eid;
    int64_t vocab = 0;
};

struct Outcome {
    std::vector<int32_t> ids;
    std::vector<float> weights;
    std::vector<int32_t> counters;
    uint32_t device_flags = 0;
};

template <typename T>
std::vector<T> or_one(const std::vector<T>& values) {
    return values.empty() ? std::vector<T>(1, T{}) : values;
}

// Runs the call on a backend with poisoned outputs (ids 0xDEADBEEF, weights NaN) and zeroed counters.
Outcome run(eplb_backend_t backend, const Call& c) {
    Stream stream(backend);
    const size_t outputs = size_t(c.num_tokens) * size_t(c.config.top_k);
    Buffer<float> logits(backend, or_one(c.logits));
    Buffer<float> bias(backend, or_one(c.bias));
    Buffer<int64_t> tokens(backend, or_one(c.token_ids));
    Buffer<int32_t> table(backend, or_one(c.tid2eid));
    Buffer<int32_t> unpadded(backend, std::vector<int32_t>{c.num_unpadded});
    Buffer<int32_t> flag(backend, std::vector<int32_t>{c.record < 0 ? 0 : c.record});
    const Tables empty;
    const Tables& t = c.tables ? *c.tables : empty;
    Buffer<int32_t> log2phy(backend, or_one(t.log2phy));
    Buffer<int32_t> logcnt(backend, or_one(t.logcnt));
    Buffer<int32_t> counters(backend, std::vector<int32_t>(size_t(std::max(t.num_physical, 1)), 0));
    Buffer<int32_t> ids(backend, std::max<size_t>(outputs, 1));
    Buffer<float> weights(backend, std::max<size_t>(outputs, 1));
    ids.poison();
    weights.poison(0x7FC00001u);
    eplb_expert_map_t map{log2phy.data(), logcnt.data(), counters.data(), c.record < 0 ? nullptr : flag.data(),
                          t.num_logical, t.max_replicas, t.num_physical, c.selection, 0, 0};
    const eplb_expert_map_t* map_arg = c.tables ? &map : nullptr;
    const int32_t* unpadded_arg = c.num_unpadded < 0 ? nullptr : unpadded.data();
    if (c.hash) {
        EPLB_EXPECT_OK(eplb_route_hash(stream.get(), &c.config, logits.data(), tokens.data(), table.data(), c.vocab,
                                       c.num_tokens, map_arg, unpadded_arg, ids.data(), weights.data()));
    } else {
        EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &c.config, logits.data(), c.bias.empty() ? nullptr : bias.data(),
                                       c.num_tokens, map_arg, unpadded_arg, ids.data(), weights.data()));
    }
    Outcome outcome;
    eplb_stream_check_device_errors(stream.get(), &outcome.device_flags);
    outcome.ids = ids.read();
    outcome.weights = weights.read();
    outcome.ids.resize(outputs);
    outcome.weights.resize(outputs);
    outcome.counters = counters.read();
    if (!c.tables) outcome.counters.clear();
    return outcome;
}

std::vector<float> random_logits(size_t count, float spread) {
    std::normal_distribution<float> normal(0.0f, spread);
    std::vector<float> values(count);
    for (auto& v : values) v = normal(rng());
    return values;
}

// ---- The oracle: docs/design.md §4 in double precision, written independently of the library. ----

double clamp_d(float x) { return std::min<double>(std::max<double>(x, -FLT_MAX), FLT_MAX); }
double sigmoid_d(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double sqrt_softplus_d(double x) { return std::sqrt(std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x)))); }

// a and b are far enough apart that float rounding (a few ulp) cannot swap them.
bool separated(double a, double b, double tolerance) {
    if (std::isinf(a) || std::isinf(b)) return a != b;
    return std::fabs(a - b) > tolerance * std::max({1.0, std::fabs(a), std::fabs(b)});
}

struct Expected {
    std::vector<int32_t> ids;
    std::vector<double> weights;
    bool clear = true;  // no near-tie decides the selection: the ids must match exactly
};

Expected oracle_topk(const float* x, const float* bias, const eplb_router_config_t& c, double tolerance = 1e-5) {
    const int32_t n = c.num_experts, k = c.top_k;
    const bool softmax = c.score == EPLB_ROUTING_SCORE_SOFTMAX;
    std::vector<double> key(n), value(n);
    for (int32_t e = 0; e < n; ++e) {
        const bool nan = std::isnan(x[e]);
        const double xc = nan ? 0.0 : clamp_d(x[e]);
        if (softmax) {
            key[e] = nan ? -INFINITY : xc;
            value[e] = key[e];
        } else {
            value[e] = nan ? 0.0 : (c.score == EPLB_ROUTING_SCORE_SIGMOID ? sigmoid_d(xc) : sqrt_softplus_d(xc));
            key[e] = nan ? -INFINITY : value[e] + (bias ? double(bias[e]) : 0.0);
            if (std::isnan(key[e])) key[e] = -INFINITY;
        }
    }
    Expected want;
    std::vector<bool> allowed(n, true);
    if (c.num_groups > 1) {
        const int32_t size = n / c.num_groups;
        std::vector<double> group(c.num_groups);
        for (int32_t g = 0; g < c.num_groups; ++g) {
            std::vector<double> members(key.begin() + g * size, key.begin() + (g + 1) * size);
            std::sort(members.rbegin(), members.rend());
            group[g] = size == 1 ? members[0] : members[0] + members[1];
            if (std::isnan(group[g])) group[g] = -INFINITY;
        }
        std::vector<int32_t> order(c.num_groups);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return group[a] > group[b]; });
        if (c.topk_groups < c.num_groups && !separated(group[order[c.topk_groups - 1]], group[order[c.topk_groups]], tolerance))
            want.clear = false;
        std::fill(allowed.begin(), allowed.end(), false);
        for (int32_t r = 0; r < c.topk_groups; ++r)
            for (int32_t e = order[r] * size; e < (order[r] + 1) * size; ++e) allowed[e] = true;
    }
    std::vector<int32_t> order;
    for (int32_t e = 0; e < n; ++e)
        if (allowed[e]) order.push_back(e);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return key[a] > key[b]; });
    for (int32_t r = 0; r < k && r + 1 < int32_t(order.size()); ++r)
        if (!separated(key[order[r]], key[order[r + 1]], tolerance)) want.clear = false;
    want.ids.assign(order.begin(), order.begin() + k);
    // Weights.
    std::vector<double> picked(k);
    double sum = 0.0;
    if (softmax) {
        double max = -INFINITY;
        for (int32_t e = 0; e < n; ++e) max = std::max(max, value[e]);
        auto numerator = [&](int32_t e) { return value[e] == -INFINITY ? 0.0 : std::exp(value[e] - max); };
        for (int32_t r = 0; r < k; ++r) sum += picked[r] = numerator(want.ids[r]);
        if (!c.renormalize) {
            sum = 0.0;
            for (int32_t e = 0; e < n; ++e) sum += numerator(e);
        }
    } else {
        for (int32_t r = 0; r < k; ++r) sum += picked[r] = value[want.ids[r]];
    }
    for (int32_t r = 0; r < k; ++r) {
        double w = (softmax || c.renormalize) ? picked[r] / (sum + 1e-20) : picked[r];
        if (c.scale_in_weights) w *= c.routed_scaling_factor;
        want.weights.push_back(w);
    }
    return want;
}

// TokenHash (docs/design.md §4.3), written out with 64-bit arithmetic and an explicit mod 2^32.
int32_t token_hash_slot(const Tables& t, int32_t logical, int64_t row) {
    if (logical < 0 || logical >= t.num_logical) return -1;
    const uint64_t hashed = (uint64_t(row) * 2654435769ull) % 4294967296ull;
    return t.log2phy[size_t(logical) * t.max_replicas + int32_t(hashed % uint64_t(t.logcnt[logical]))];
}

bool weight_close(float got, double want, double relative) {
    return std::fabs(double(got) - want) <= relative * std::max(std::fabs(want), 1e-30) + 1e-30;
}

// Checks every real row of a logical-id outcome against the oracle. Returns the rows with a near-tie
// (ids not compared there).
int64_t expect_matches_oracle(const Call& c, const Outcome& got, double weight_tolerance = 1e-5) {
    const int32_t n = c.config.num_experts, k = c.config.top_k;
    const int64_t unpadded = c.num_unpadded < 0 ? c.num_tokens : std::min<int64_t>(c.num_unpadded, c.num_tokens);
    int64_t unclear = 0;
    for (int64_t row = 0; row < c.num_tokens; ++row) {
        if (row >= unpadded) {
            for (int32_t r = 0; r < k; ++r) {
                EPLB_EXPECT_EQ(got.ids[row * k + r], -1);
                EPLB_EXPECT_EQ(got.weights[row * k + r], 0.0f);
            }
            continue;
        }
        const Expected want =
            oracle_topk(c.logits.data() + row * n, c.bias.empty() ? nullptr : c.bias.data(), c.config);
        for (int32_t r = 0; r < k; ++r) {
            const int32_t id = got.ids[row * k + r];
            EPLB_EXPECT(id >= 0 && id < n);
            EPLB_EXPECT(std::isfinite(got.weights[row * k + r]) && got.weights[row * k + r] >= 0.0f);
        }
        if (!want.clear) {
            ++unclear;
            continue;
        }
        for (int32_t r = 0; r < k; ++r) {
            if (got.ids[row * k + r] != want.ids[r])
                EPLB_FAIL("row " << row << " slot " << r << ": id " << got.ids[row * k + r] << ", oracle " << want.ids[r]);
            if (!weight_close(got.weights[row * k + r], want.weights[r], weight_tolerance))
                EPLB_FAIL("row " << row << " slot " << r << ": weight " << got.weights[row * k + r] << ", oracle "
                                 << want.weights[r]);
        }
    }
    return unclear;
}

Call random_topk_call(int32_t n, int32_t k, int32_t score, int64_t tokens, int32_t groups = 1, int32_t topk_groups = 1) {
    Call c;
    const bool renormalize = score != EPLB_ROUTING_SCORE_SOFTMAX || rng()() % 2 == 0;
    c.config = make_config(n, k, score, groups, topk_groups, renormalize, rng()() % 2 == 0, 2.5f);
    c.num_tokens = tokens;
    c.logits = random_logits(size_t(tokens) * n, 2.0f);
    if (score != EPLB_ROUTING_SCORE_SOFTMAX && rng()() % 4 != 0) c.bias = random_logits(size_t(n), 0.3f);
    return c;
}

}  // namespace

// ---- Goldens (hand-computed from the formulas; see the comments for each number). ----

EPLB_TEST(routing_golden_sigmoid_bias_selects_unbiased_weights) {
    // s = sigmoid([0, 1, -1, 2]) = [0.5, 0.7310586, 0.2689414, 0.8807971]; keys s + [0, 0, 1, 0] =
    // [0.5, 0.731, 1.269, 0.881] -> experts 2, 3. Weights are the unbiased s renormalised and x 2.5:
    // 2.5 * 0.2689414 / 1.1497385 = 0.5847882, 2.5 * 0.8807971 / 1.1497385 = 1.9152118.
    Call c;
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SIGMOID, 1, 1, true, true, 2.5f);
    c.logits = {0.0f, 1.0f, -1.0f, 2.0f};
    c.bias = {0.0f, 0.0f, 1.0f, 0.0f};
    c.num_tokens = 1;
    const Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{2, 3}));
    EPLB_EXPECT(weight_close(got.weights[0], 0.5847882399400745, 1e-6));
    EPLB_EXPECT(weight_close(got.weights[1], 1.9152117600599254, 1e-6));
}

EPLB_TEST(routing_golden_softmax_plain_and_renormalised) {
    // softmax([1, 2, 3, 0]): denominator e^0 + e^1 + e^2 + e^3 = 31.19287; top-2 = experts 2, 1 with
    // p = 20.08554 / 31.19287 = 0.6439143 and 7.389056 / 31.19287 = 0.2368828; renormalised over the
    // top-2: 0.7310586, 0.2689414.
    Call c;
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SOFTMAX, 1, 1, false);
    c.logits = {1.0f, 2.0f, 3.0f, 0.0f};
    c.num_tokens = 1;
    Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{2, 1}));
    EPLB_EXPECT(weight_close(got.weights[0], 0.6439142598879724, 1e-6));
    EPLB_EXPECT(weight_close(got.weights[1], 0.23688281808991013, 1e-6));
    c.config.renormalize = 1;
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{2, 1}));
    EPLB_EXPECT(weight_close(got.weights[0], 0.7310585786300049, 1e-6));
    EPLB_EXPECT(weight_close(got.weights[1], 0.2689414213699951, 1e-6));
}

EPLB_TEST(routing_golden_grouped_selection_limits_groups) {
    // 8 experts, 4 groups of 2, keep 2 groups, K = 2. s = sigmoid([3, -3, 1, 1, 0.5, 0.5, 2, -4]) =
    // [0.953, 0.047, 0.731, 0.731, 0.622, 0.622, 0.881, 0.018]; group scores (sum of the top two)
    // = [1.0, 1.462, 1.245, 0.899] -> groups 1 and 2 kept. The top-2 among experts 2..5 is 2 and 3
    // (a tie at 0.731: the lower id first) - not experts 0 and 6, the ungrouped top-2.
    Call c;
    c.config = make_config(8, 2, EPLB_ROUTING_SCORE_SIGMOID, 4, 2);
    c.logits = {3.0f, -3.0f, 1.0f, 1.0f, 0.5f, 0.5f, 2.0f, -4.0f};
    c.num_tokens = 1;
    Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{2, 3}));
    EPLB_EXPECT_EQ(got.weights[0], 0.5f);
    EPLB_EXPECT_EQ(got.weights[1], 0.5f);
    c.config.num_groups = 1;
    c.config.topk_groups = 1;
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 6}));
    // Equal group scores: the lower group is kept. Groups 0 and 2 both score 2 * sigmoid(1), group 1 less.
    c.config = make_config(6, 2, EPLB_ROUTING_SCORE_SIGMOID, 3, 1);
    c.logits = {1.0f, 1.0f, 0.0f, 0.0f, 1.0f, 1.0f};
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1}));
}

EPLB_TEST(routing_golden_ties_pick_lower_ids) {
    // Equal keys everywhere: ids 0..K-1 in order, equal weights 1/K.
    for (int32_t score : {EPLB_ROUTING_SCORE_SIGMOID, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, EPLB_ROUTING_SCORE_SOFTMAX}) {
        Call c;
        c.config = make_config(37, 5, score);
        c.logits.assign(37 * 2, 0.25f);
        c.num_tokens = 2;
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1, 2, 3, 4, 0, 1, 2, 3, 4}));
        for (float w : got.weights) EPLB_EXPECT(weight_close(w, 0.2, 1e-6));
    }
    // A bias that equalises two keys: s(1) + 0 = s(0) + (s(1) - s(0)) is not exact in float, so tie
    // through equal logits and equal biases instead: experts 9 and 4 share the largest key -> 4, 9.
    Call c;
    c.config = make_config(12, 2, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS);
    c.logits.assign(12, -1.0f);
    c.logits[9] = c.logits[4] = 0.5f;
    c.bias.assign(12, 0.0f);
    c.bias[9] = c.bias[4] = 0.125f;
    c.num_tokens = 1;
    EPLB_EXPECT(run(EPLB_BACKEND_CPU, c).ids == (std::vector<int32_t>{4, 9}));
    // sigmoid saturates: sigmoid(20) == sigmoid(30) == 1 in float, so expert 1 (logit 20) precedes 3 (30).
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SIGMOID);
    c.logits = {0.0f, 20.0f, 0.0f, 30.0f};
    c.bias.clear();
    EPLB_EXPECT(run(EPLB_BACKEND_CPU, c).ids == (std::vector<int32_t>{1, 3}));
}

EPLB_TEST(routing_golden_hash_rows_with_repeated_experts) {
    // tid2eid[7] = [3, 3, 1]; logits x3 = 0.5, x1 = -1. s = sqrt(softplus): s(0.5) = 0.9869534,
    // s(-1) = 0.5596979; sum = 2.5336046 -> weights 0.3895451, 0.3895451, 0.2209097, x 1.5 =
    // 0.5843177, 0.5843177, 0.3313646. Expert 3 is routed (and counted) twice.
    const Tables t = tables_from_phy2log({0, 1, 2, 3, 3}, 4);  // expert 3 in slots {3, 4}
    Call c;
    c.hash = true;
    c.config = make_config(4, 3, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, 1, 1, true, true, 1.5f);
    c.vocab = 10;
    c.tid2eid.assign(30, 0);
    c.tid2eid[21] = 3;
    c.tid2eid[22] = 3;
    c.tid2eid[23] = 1;
    c.token_ids = {7};
    c.logits = {9.0f, -1.0f, 9.0f, 0.5f};
    c.num_tokens = 1;
    Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{3, 3, 1}));
    EPLB_EXPECT(weight_close(got.weights[0], 0.5843177201414265, 1e-6));
    EPLB_EXPECT_EQ(got.weights[0], got.weights[1]);
    EPLB_EXPECT(weight_close(got.weights[2], 0.33136455971714707, 1e-6));
    // With the map: row 0 hashes to replica 0 of every expert -> slots 3, 3, 1, counted per occurrence.
    c.tables = &t;
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{3, 3, 1}));
    EPLB_EXPECT(got.counters == (std::vector<int32_t>{0, 1, 0, 2, 0}));
}

EPLB_TEST(routing_golden_all_underflow_rows_weigh_zero) {
    // exp flushes below -87.3365, so s = 0 for these logits: renormalising gives 0 / (0 + 1e-20) = 0.
    for (int32_t score : {EPLB_ROUTING_SCORE_SIGMOID, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS}) {
        Call c;
        c.config = make_config(16, 4, score, 1, 1, true, true, 2.5f);
        c.logits.assign(16, -100.0f);
        c.logits[11] = -1000.0f;
        c.logits[2] = -kInf;
        c.num_tokens = 1;
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1, 2, 3}));
        for (float w : got.weights) EPLB_EXPECT_EQ(w, 0.0f);
        // The hash form too.
        c.hash = true;
        c.vocab = 1;
        c.tid2eid = {5, 6, 11, 2};
        c.token_ids = {0};
        const Outcome hashed = run(EPLB_BACKEND_CPU, c);
        for (float w : hashed.weights) EPLB_EXPECT_EQ(w, 0.0f);
    }
    // Just above the flush: sqrtsoftplus(-80) = sqrt(log1p(e^-80)) = 4.2483543e-18, not 0.
    Call c;
    c.config = make_config(1, 1, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, 1, 1, false);
    c.logits = {-80.0f};
    c.num_tokens = 1;
    EPLB_EXPECT(weight_close(run(EPLB_BACKEND_CPU, c).weights[0], 4.248354255291589e-18, 1e-5));
}

EPLB_TEST(routing_golden_nan_and_infinite_logits) {
    // NaN never beats a number; its weight is 0. +inf counts as FLT_MAX: sqrtsoftplus(FLT_MAX) =
    // sqrt(FLT_MAX) = 1.8446743e19, finite, so two of them share the weight evenly.
    Call c;
    c.config = make_config(6, 3, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS);
    c.logits = {kNaN, kInf, 0.0f, kInf, kNaN, -kInf};
    c.num_tokens = 1;
    Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{1, 3, 2}));
    EPLB_EXPECT(weight_close(got.weights[0], 0.5, 1e-6));
    EPLB_EXPECT(weight_close(got.weights[1], 0.5, 1e-6));
    EPLB_EXPECT(got.weights[2] >= 0.0f && got.weights[2] < 1e-18f);
    // A row of NaN: ids 0..K-1 (all keys -inf), weights 0, never NaN; likewise softmax and sigmoid.
    for (int32_t score : {EPLB_ROUTING_SCORE_SIGMOID, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, EPLB_ROUTING_SCORE_SOFTMAX}) {
        c.config = make_config(6, 3, score, 1, 1, true, true, 2.0f);
        c.logits.assign(6, kNaN);
        c.logits[5] = 1.0f;
        got = run(EPLB_BACKEND_CPU, c);
        EPLB_EXPECT(got.ids == (std::vector<int32_t>{5, 0, 1}));
        EPLB_EXPECT(weight_close(got.weights[0], 2.0, 1e-6));
        EPLB_EXPECT_EQ(got.weights[1], 0.0f);
        EPLB_EXPECT_EQ(got.weights[2], 0.0f);
        c.logits.assign(6, kNaN);
        got = run(EPLB_BACKEND_CPU, c);
        EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1, 2}));
        for (float w : got.weights) EPLB_EXPECT_EQ(w, 0.0f);
    }
    // A NaN bias makes the key -inf; an infinite bias wins outright.
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SIGMOID);
    c.logits = {5.0f, 4.0f, 3.0f, -5.0f};
    c.bias = {kNaN, 0.0f, 0.0f, kInf};
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{3, 1}));
    // The hash form: a NaN logit at a table entry weighs 0.
    c.hash = true;
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS);
    c.vocab = 1;
    c.tid2eid = {0, 1};
    c.token_ids = {0};
    c.logits = {kNaN, 2.0f, 0.0f, 0.0f};
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1}));
    EPLB_EXPECT_EQ(got.weights[0], 0.0f);
    EPLB_EXPECT_EQ(got.weights[1], 1.0f);
}

EPLB_TEST(routing_golden_padding_rows_and_eplb_map) {
    // Expert 0 has slots {0, 4, 5}, expert 1 {1, 6}. (row * 2654435769) mod 2^32 mod 3 for rows 0..3 =
    // 0, 0, 2, 2 and mod 2 = 0, 1, 0, 1 (see test_mapping). Every row picks experts 0 then 1 (logits
    // 3 and 2); rows 3.. are padding.
    const Tables t = tables_from_phy2log({0, 1, 2, 3, 0, 0, 1}, 4);
    Call c;
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SOFTMAX);
    for (int row = 0; row < 5; ++row) c.logits.insert(c.logits.end(), {3.0f, 2.0f, 0.0f, 0.0f});
    c.num_tokens = 5;
    c.tables = &t;
    c.num_unpadded = 3;
    Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1, 0, 6, 5, 1, -1, -1, -1, -1}));
    EPLB_EXPECT(got.counters == (std::vector<int32_t>{2, 2, 0, 0, 0, 1, 1}));
    for (int i = 6; i < 10; ++i) EPLB_EXPECT_EQ(got.weights[i], 0.0f);
    // Record flag off and NULL: same ids, nothing counted.
    for (int32_t record : {0, -1}) {
        c.record = record;
        const Outcome quiet = run(EPLB_BACKEND_CPU, c);
        EPLB_EXPECT(quiet.ids == got.ids);
        EPLB_EXPECT(std::all_of(quiet.counters.begin(), quiet.counters.end(), [](int32_t v) { return v == 0; }));
    }
    // num_unpadded past the rows, or negative, is clamped to [0, T].
    c.record = 1;
    c.num_unpadded = 1000;
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT_EQ(std::count(got.ids.begin(), got.ids.end(), -1), 0L);
    Stream stream(EPLB_BACKEND_CPU);
    const int32_t negative = -3;
    std::vector<int32_t> ids(10, 5);
    std::vector<float> weights(10, 5.0f);
    EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &c.config, c.logits.data(), nullptr, 5, nullptr, &negative, ids.data(),
                                   weights.data()));
    EPLB_EXPECT(std::all_of(ids.begin(), ids.end(), [](int32_t v) { return v == -1; }));
    EPLB_EXPECT(std::all_of(weights.begin(), weights.end(), [](float v) { return v == 0.0f; }));
    // EPLB off: logical ids, padding still -1.
    c.tables = nullptr;
    c.num_unpadded = 4;
    got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1, 0, 1, 0, 1, 0, 1, -1, -1}));
}

EPLB_TEST(routing_hash_padding_rows_are_not_checked) {
    // Padding rows may carry any token id (garbage): they are neither read nor reported.
    Call c;
    c.hash = true;
    c.config = make_config(8, 2, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS);
    c.vocab = 3;
    c.tid2eid = {0, 1, 2, 3, 4, 5};
    c.token_ids = {2, -77, 1LL << 40};
    c.logits.assign(24, 0.0f);
    c.num_tokens = 3;
    c.num_unpadded = 1;
    const Outcome got = run(EPLB_BACKEND_CPU, c);
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{4, 5, -1, -1, -1, -1}));
    EPLB_EXPECT_EQ(got.weights[0], 0.5f);
}

// ---- Accuracy of the shared float math, against double precision. ----

EPLB_TEST(routing_scores_are_accurate) {
    // Hash routing with N = K = 1, no renormalisation, no scaling: each weight is s(logit) itself.
    std::vector<float> xs;
    for (int i = -2000; i <= 2000; ++i) xs.push_back(float(i) * 0.05f);  // [-100, 100]
    std::uniform_real_distribution<float> wide(-90.0f, 90.0f);
    for (int i = 0; i < 20000; ++i) xs.push_back(wide(rng()));
    for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 0.41f, -0.88f, 87.0f, -87.3f, -87.34f, 1e30f, -1e30f}) xs.push_back(x);
    for (int32_t score : {EPLB_ROUTING_SCORE_SIGMOID, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS}) {
        Call c;
        c.hash = true;
        c.config = make_config(1, 1, score, 1, 1, false);
        c.vocab = 1;
        c.tid2eid = {0};
        c.token_ids.assign(xs.size(), 0);
        c.logits = xs;
        c.num_tokens = int64_t(xs.size());
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        double worst = 0.0;
        for (size_t i = 0; i < xs.size(); ++i) {
            const double x = xs[i];
            if (-std::fabs(x) < -87.3365) {
                // exp(-|x|) flushed to 0: sigmoid -> 0 or 1, sqrtsoftplus -> 0 or sqrt(x).
                const double want = score == EPLB_ROUTING_SCORE_SIGMOID ? (x > 0 ? 1.0 : 0.0) : (x > 0 ? std::sqrt(x) : 0.0);
                EPLB_EXPECT(weight_close(got.weights[i], want, 1e-6));
                continue;
            }
            const double want = score == EPLB_ROUTING_SCORE_SIGMOID ? sigmoid_d(x) : sqrt_softplus_d(x);
            worst = std::max(worst, std::fabs(got.weights[i] - want) / want);
        }
        std::printf("%s: worst relative error %.3g over %zu logits\n",
                    score == EPLB_ROUTING_SCORE_SIGMOID ? "sigmoid" : "sqrtsoftplus", worst, xs.size());
        EPLB_EXPECT(worst < 4e-7);  // a few ulp
    }
    // exp itself, through softmax: logits [0, x] -> weights 1 / (1 + e^x) and e^x / (1 + e^x).
    std::uniform_real_distribution<float> negative(-87.0f, 0.0f);
    Call c;
    c.config = make_config(2, 2, EPLB_ROUTING_SCORE_SOFTMAX, 1, 1, false);
    for (int i = 0; i < 20000; ++i) c.logits.insert(c.logits.end(), {0.0f, negative(rng())});
    c.num_tokens = 20000;
    const Outcome got = run(EPLB_BACKEND_CPU, c);
    double worst = 0.0;
    for (int64_t row = 0; row < c.num_tokens; ++row) {
        const double e = std::exp(double(c.logits[row * 2 + 1]));
        worst = std::max(worst, std::fabs(got.weights[row * 2 + 1] - e / (1.0 + e)) / (e / (1.0 + e)));
    }
    std::printf("exp (softmax of [0, x]): worst relative error %.3g\n", worst);
    EPLB_EXPECT(worst < 4e-7);
}

// ---- Properties on random inputs against the oracle. ----

EPLB_TEST(routing_random_rows_match_the_oracle) {
    int64_t rows = 0, unclear = 0;
    for (int iteration = 0; iteration < 60; ++iteration) {
        const int32_t score = int32_t(rng()() % 3);
        const int32_t n = 1 + int32_t(rng()() % 400);
        const int32_t k = 1 + int32_t(rng()() % std::min(n, 12));
        const int64_t tokens = int64_t(rng()() % 90);
        Call c = random_topk_call(n, k, score, tokens);
        c.num_unpadded = tokens == 0 ? -1 : int32_t(rng()() % (tokens + 3));
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        unclear += expect_matches_oracle(c, got);
        rows += tokens;
    }
    std::printf("%lld rows, %lld with a near-tie (ids not compared)\n", (long long)rows, (long long)unclear);
    EPLB_EXPECT(unclear * 50 <= rows + 50);
}

EPLB_TEST(routing_random_grouped_rows_match_the_oracle) {
    int64_t rows = 0, unclear = 0;
    for (int iteration = 0; iteration < 60; ++iteration) {
        // Real shapes (256 / 8 groups, 384 / 8) next to awkward ones (groups of 1, 3, 5, 25 experts).
        const int32_t shapes[][2] = {{256, 8}, {384, 8}, {256, 4}, {8, 8}, {24, 8}, {40, 8}, {100, 4}, {96, 32}, {6, 2}};
        const auto& shape = shapes[rng()() % (sizeof(shapes) / sizeof(shapes[0]))];
        const int32_t n = shape[0], groups = shape[1];
        const int32_t topk_groups = 1 + int32_t(rng()() % groups);
        const int32_t k = 1 + int32_t(rng()() % std::min({topk_groups * (n / groups), 12, n}));
        const int32_t score = int32_t(rng()() % 2);
        Call c = random_topk_call(n, k, score, 1 + int64_t(rng()() % 60), groups, topk_groups);
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        unclear += expect_matches_oracle(c, got);
        rows += c.num_tokens;
        // The chosen experts come from at most topk_groups groups.
        for (int64_t row = 0; row < c.num_tokens; ++row) {
            std::vector<int32_t> used;
            for (int32_t r = 0; r < k; ++r) used.push_back(got.ids[row * k + r] / (n / groups));
            std::sort(used.begin(), used.end());
            EPLB_EXPECT(std::unique(used.begin(), used.end()) - used.begin() <= topk_groups);
        }
    }
    std::printf("%lld rows, %lld with a near-tie (ids not compared)\n", (long long)rows, (long long)unclear);
    EPLB_EXPECT(unclear * 50 <= rows + 50);
}

EPLB_TEST(routing_random_rows_are_sorted_distinct_and_renormalised) {
    for (int iteration = 0; iteration < 40; ++iteration) {
        const int32_t score = int32_t(rng()() % 3);
        const int32_t n = 2 + int32_t(rng()() % 300);
        const int32_t k = 1 + int32_t(rng()() % std::min(n, 32));
        Call c = random_topk_call(n, k, score, 50);
        c.config.renormalize = 1;
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        for (int64_t row = 0; row < 50; ++row) {
            std::vector<int32_t> ids(got.ids.begin() + row * k, got.ids.begin() + (row + 1) * k);
            std::sort(ids.begin(), ids.end());
            EPLB_EXPECT(std::unique(ids.begin(), ids.end()) == ids.end());
            double sum = 0.0;
            for (int32_t r = 0; r < k; ++r) sum += got.weights[row * k + r];
            const double want = c.config.scale_in_weights ? c.config.routed_scaling_factor : 1.0;
            EPLB_EXPECT(std::fabs(sum - want) < 1e-5 * want);
            // Softmax and bias-free scores come out in descending weight order.
            if (score == EPLB_ROUTING_SCORE_SOFTMAX || c.bias.empty())
                for (int32_t r = 1; r < k; ++r) EPLB_EXPECT(got.weights[row * k + r] <= got.weights[row * k + r - 1]);
        }
    }
}

EPLB_TEST(routing_eplb_map_equals_mapping_of_the_logical_ids) {
    for (int iteration = 0; iteration < 30; ++iteration) {
        const bool hash = iteration % 3 == 0;
        const int32_t score = hash ? int32_t(rng()() % 2) : int32_t(rng()() % 3);
        const int32_t n = 1 + int32_t(rng()() % 300);
        const int32_t k = 1 + int32_t(rng()() % std::min(n, 9));
        const int64_t tokens = int64_t(rng()() % 200);
        Call c = random_topk_call(n, k, score, tokens);
        if (hash) {
            c.hash = true;
            c.bias.clear();
            c.vocab = 50;
            for (int64_t i = 0; i < c.vocab * k; ++i) c.tid2eid.push_back(int32_t(rng()() % n));
            for (int64_t row = 0; row < tokens; ++row) c.token_ids.push_back(int64_t(rng()() % c.vocab));
        }
        c.num_unpadded = int32_t(rng()() % (tokens + 3));
        const Outcome logical = run(EPLB_BACKEND_CPU, c);
        const Tables t = random_tables(n, n + int32_t(rng()() % 64), int32_t(rng()() % 3));
        c.tables = &t;
        const Outcome physical = run(EPLB_BACKEND_CPU, c);
        EPLB_EXPECT(physical.weights == logical.weights);
        std::vector<int32_t> bincount(size_t(t.num_physical), 0);
        for (size_t i = 0; i < physical.ids.size(); ++i) {
            const int64_t row = int64_t(i) / k;
            EPLB_EXPECT_EQ(physical.ids[i], token_hash_slot(t, logical.ids[i], row));
            if (physical.ids[i] >= 0) {
                EPLB_EXPECT_EQ(t.phy2log[physical.ids[i]], logical.ids[i]);
                ++bincount[physical.ids[i]];
            }
        }
        EPLB_EXPECT(physical.counters == bincount);
    }
}

EPLB_TEST(routing_hash_random_rows_match_the_oracle) {
    for (int iteration = 0; iteration < 30; ++iteration) {
        const int32_t score = int32_t(rng()() % 2);
        const int32_t n = 1 + int32_t(rng()() % 400);
        const int32_t k = 1 + int32_t(rng()() % std::min(n, 32));
        const int64_t tokens = int64_t(rng()() % 100);
        Call c;
        c.hash = true;
        c.config = make_config(n, k, score, 1, 1, rng()() % 2 == 0, rng()() % 2 == 0, 1.5f);
        c.vocab = 1 + int64_t(rng()() % 1000);
        for (int64_t i = 0; i < c.vocab * k; ++i) c.tid2eid.push_back(int32_t(rng()() % n));
        for (int64_t row = 0; row < tokens; ++row) c.token_ids.push_back(int64_t(rng()() % c.vocab));
        c.logits = random_logits(size_t(tokens) * n, 3.0f);
        c.num_tokens = tokens;
        const Outcome got = run(EPLB_BACKEND_CPU, c);
        for (int64_t row = 0; row < tokens; ++row) {
            double sum = 0.0;
            std::vector<double> s(k);
            for (int32_t r = 0; r < k; ++r) {
                const int32_t expert = c.tid2eid[size_t(c.token_ids[row] * k + r)];
                EPLB_EXPECT_EQ(got.ids[row * k + r], expert);
                const double x = c.logits[size_t(row * n + expert)];
                sum += s[r] = score == EPLB_ROUTING_SCORE_SIGMOID ? sigmoid_d(x) : sqrt_softplus_d(x);
            }
            for (int32_t r = 0; r < k; ++r) {
                double w = c.config.renormalize ? s[r] / (sum + 1e-20) : s[r];
                if (c.config.scale_in_weights) w *= 1.5;
                EPLB_EXPECT(weight_close(got.weights[row * k + r], w, 1e-5));
            }
        }
    }
}

// ---- Rows from the real load files. ----

namespace {

// logits = log(load + 1) - log(total) + Gumbel noise: the top-k by logit is then a draw without
// replacement with probabilities proportional to the expert's real load (the Gumbel-top-k trick).
std::vector<float> real_load_logits(const std::vector<double>& load, int64_t tokens) {
    double total = 0.0;
    for (double v : load) total += v + 1.0;
    std::uniform_real_distribution<double> uniform(1e-12, 1.0);
    std::vector<float> logits(size_t(tokens) * load.size());
    for (int64_t t = 0; t < tokens; ++t)
        for (size_t e = 0; e < load.size(); ++e)
            logits[size_t(t) * load.size() + e] = float(std::log((load[e] + 1.0) / total) - std::log(-std::log(uniform(rng()))));
    return logits;
}

double spearman(const std::vector<double>& a, const std::vector<double>& b) {
    auto ranks = [](const std::vector<double>& v) {
        std::vector<size_t> order(v.size());
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](size_t i, size_t j) { return v[i] < v[j]; });
        std::vector<double> r(v.size());
        for (size_t i = 0; i < order.size(); ++i) r[order[i]] = double(i);
        return r;
    };
    const auto ra = ranks(a), rb = ranks(b);
    const double n = double(a.size());
    double d2 = 0.0;
    for (size_t i = 0; i < a.size(); ++i) d2 += (ra[i] - rb[i]) * (ra[i] - rb[i]);
    return 1.0 - 6.0 * d2 / (n * (n * n - 1.0));
}

}  // namespace

EPLB_TEST(routing_real_load_rows_follow_expert_popularity) {
    for (const auto& name : {std::string("decode_in1000out1000"), std::string("prefill_in4096")}) {
        const auto rows = read_load_file(name);
        for (int layer : {3, 31, 60}) {
            // DeepSeek-V4 style: sqrtsoftplus, no bias, 256 experts, K = 6; R = 288 with the 32 hottest
            // experts replicated.
            std::vector<int32_t> order(256);
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(), [&](int a, int b) { return rows[layer][a] > rows[layer][b]; });
            std::vector<int32_t> phy2log(288);
            for (int s = 0; s < 256; ++s) phy2log[s] = s;
            for (int s = 256; s < 288; ++s) phy2log[s] = order[s - 256];
            std::shuffle(phy2log.begin(), phy2log.end(), rng());
            const Tables t = tables_from_phy2log(phy2log, 256, 4);
            Call c;
            c.config = make_config(256, 6, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, 1, 1, true, true, 1.5f);
            c.num_tokens = 4096;
            c.logits = real_load_logits(rows[layer], c.num_tokens);
            const Outcome logical = run(EPLB_BACKEND_CPU, c);
            EPLB_EXPECT(expect_matches_oracle(c, logical) * 50 <= c.num_tokens);
            std::vector<double> routed(256, 0.0);
            for (int32_t id : logical.ids) routed[id] += 1.0;
            const double rho = spearman(routed, rows[layer]);
            std::printf("%s layer %d: Spearman(routed, recorded load) = %.3f\n", name.c_str(), layer, rho);
            EPLB_EXPECT(rho > 0.8);
            // The fused epilogue counts exactly the routed tokens, split over the replicas.
            c.tables = &t;
            const Outcome physical = run(EPLB_BACKEND_CPU, c);
            std::vector<double> per_expert(256, 0.0);
            for (int32_t s = 0; s < 288; ++s) per_expert[t.phy2log[s]] += physical.counters[s];
            EPLB_EXPECT(per_expert == routed);
            EPLB_EXPECT_EQ(std::accumulate(physical.counters.begin(), physical.counters.end(), 0), 4096 * 6);
        }
    }
}

// ---- Bad input: a status naming the argument, nothing written. ----

EPLB_TEST(routing_bad_input_leaves_outputs_untouched) {
    Stream stream(EPLB_BACKEND_CPU);
    const Tables t = tables_from_phy2log({0, 1, 2, 3, 0}, 4);
    std::vector<float> logits(8, 0.5f);
    std::vector<float> bias(4, 0.0f);
    std::vector<int32_t> ids(4, 12345);
    std::vector<float> weights(4, 7.0f);
    std::vector<int32_t> counters(5, 9);
    const int32_t on = 1;
    eplb_expert_map_t map{t.log2phy.data(), t.logcnt.data(), counters.data(), &on, 4, t.max_replicas, 5, 0, 0, 0};
    auto untouched = [&] {
        EPLB_EXPECT(std::all_of(ids.begin(), ids.end(), [](int32_t v) { return v == 12345; }));
        EPLB_EXPECT(std::all_of(weights.begin(), weights.end(), [](float v) { return v == 7.0f; }));
        EPLB_EXPECT(std::all_of(counters.begin(), counters.end(), [](int32_t v) { return v == 9; }));
    };
    auto expect_invalid = [&](const eplb_router_config_t& config, const float* b, const eplb_expert_map_t* m,
                              const char* needle) {
        const eplb_status_t status =
            eplb_route_topk(stream.get(), &config, logits.data(), b, 2, m, nullptr, ids.data(), weights.data());
        if (status != EPLB_STATUS_INVALID_ARGUMENT) EPLB_FAIL("want invalid argument for " << needle);
        if (std::string(eplb_last_error_message()).find(needle) == std::string::npos)
            EPLB_FAIL("message '" << eplb_last_error_message() << "' does not name " << needle);
        untouched();
    };
    const eplb_router_config_t good = make_config(4, 2, EPLB_ROUTING_SCORE_SIGMOID);
    EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &good, logits.data(), bias.data(), 0, &map, nullptr, nullptr, nullptr));
    untouched();
    auto with = [&](auto change) {
        eplb_router_config_t c = good;
        change(c);
        return c;
    };
    expect_invalid(with([](auto& c) { c.num_experts = 0; }), nullptr, nullptr, "config->num_experts");
    expect_invalid(with([](auto& c) { c.num_experts = 1025; }), nullptr, nullptr, "config->num_experts");
    expect_invalid(with([](auto& c) { c.top_k = 0; }), nullptr, nullptr, "config->top_k");
    expect_invalid(with([](auto& c) { c.top_k = 5; }), nullptr, nullptr, "config->top_k");
    expect_invalid(with([](auto& c) { c.score = 3; }), nullptr, nullptr, "config->score");
    expect_invalid(with([](auto& c) { c.num_groups = 3; }), nullptr, nullptr, "does not divide");
    expect_invalid(with([](auto& c) { c.num_groups = 0; }), nullptr, nullptr, "config->num_groups");
    expect_invalid(with([](auto& c) { c.num_groups = 2, c.topk_groups = 3; }), nullptr, nullptr, "config->topk_groups");
    expect_invalid(with([](auto& c) { c.num_groups = 4, c.topk_groups = 1; }), nullptr, nullptr, "kept groups");
    expect_invalid(with([](auto& c) { c.score = EPLB_ROUTING_SCORE_SOFTMAX, c.num_groups = 2; }), nullptr, nullptr,
                   "not softmax");
    expect_invalid(with([](auto& c) { c.scale_in_weights = 1, c.routed_scaling_factor = kNaN; }), nullptr, nullptr,
                   "routed_scaling_factor");
    expect_invalid(with([](auto& c) { c.scale_in_weights = 1, c.routed_scaling_factor = 0.0f; }), nullptr, nullptr,
                   "routed_scaling_factor");
    expect_invalid(with([](auto& c) { c.score = EPLB_ROUTING_SCORE_SOFTMAX; }), bias.data(), nullptr, "bias must be NULL");
    EPLB_EXPECT_STATUS(eplb_route_topk(stream.get(), &good, nullptr, nullptr, 2, nullptr, nullptr, ids.data(), weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("logits") != std::string::npos);
    EPLB_EXPECT_STATUS(eplb_route_topk(stream.get(), &good, logits.data(), nullptr, 2, nullptr, nullptr, nullptr, weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_route_topk(stream.get(), &good, logits.data(), nullptr, 2, nullptr, nullptr, ids.data(), nullptr),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_route_topk(stream.get(), nullptr, logits.data(), nullptr, 2, nullptr, nullptr, ids.data(), weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_route_topk(nullptr, &good, logits.data(), nullptr, 2, nullptr, nullptr, ids.data(), weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_route_topk(stream.get(), &good, logits.data(), nullptr, -1, nullptr, nullptr, ids.data(), weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("num_tokens") != std::string::npos);
    untouched();
    // Map problems: another N, a table entry out of range, Kmax below a replica count.
    eplb_expert_map_t other = map;
    other.num_logical = 3;
    expect_invalid(good, nullptr, &other, "map->num_logical");
    Tables broken = t;
    broken.log2phy[0] = 17;
    eplb_expert_map_t broken_map{broken.log2phy.data(), broken.logcnt.data(), counters.data(), &on, 4, broken.max_replicas, 5, 0, 0, 0};
    expect_invalid(good, nullptr, &broken_map, "= 17");
    eplb_expert_map_t narrow = map;
    narrow.max_replicas = 1;
    expect_invalid(good, nullptr, &narrow, "logcnt[0] = 2");
}

EPLB_TEST(routing_hash_bad_input_leaves_outputs_untouched) {
    Stream stream(EPLB_BACKEND_CPU);
    const eplb_router_config_t config = make_config(4, 2, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS);
    std::vector<float> logits(12, 0.5f);
    std::vector<int32_t> table = {0, 1, 2, 3, 1, 1};  // vocab 3
    std::vector<int64_t> tokens = {0, 1, 2};
    std::vector<int32_t> ids(6, 12345);
    std::vector<float> weights(6, 7.0f);
    auto untouched = [&] {
        EPLB_EXPECT(std::all_of(ids.begin(), ids.end(), [](int32_t v) { return v == 12345; }));
        EPLB_EXPECT(std::all_of(weights.begin(), weights.end(), [](float v) { return v == 7.0f; }));
    };
    auto call = [&](const eplb_router_config_t& c, int64_t vocab, const int32_t* unpadded = nullptr) {
        return eplb_route_hash(stream.get(), &c, logits.data(), tokens.data(), table.data(), vocab, 3, nullptr, unpadded,
                               ids.data(), weights.data());
    };
    auto expect_message = [&](const char* needle) {
        if (std::string(eplb_last_error_message()).find(needle) == std::string::npos)
            EPLB_FAIL("message '" << eplb_last_error_message() << "' does not name " << needle);
    };
    tokens[1] = 3;  // == vocab
    EPLB_EXPECT_STATUS(call(config, 3), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("token_ids[1] = 3 is outside [0, vocab_size = 3)");
    tokens[1] = -1;
    EPLB_EXPECT_STATUS(call(config, 3), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("token_ids[1] = -1");
    untouched();
    tokens[1] = 1;
    table[3] = 4;  // == N: tid2eid[1][1]
    EPLB_EXPECT_STATUS(call(config, 3), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("tid2eid[1][1] = 4");
    table[3] = -2;
    EPLB_EXPECT_STATUS(call(config, 3), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("tid2eid[1][1] = -2");
    untouched();
    // Only the rows routed are checked: with row 1 as padding the bad entry is never used.
    const int32_t one = 1;
    EPLB_EXPECT_OK(call(config, 3, &one));
    EPLB_EXPECT_EQ(ids[0], 0);
    EPLB_EXPECT_EQ(ids[2], -1);
    ids.assign(6, 12345);
    weights.assign(6, 7.0f);
    table[3] = 3;
    EPLB_EXPECT_STATUS(call(config, 0), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("vocab_size");
    eplb_router_config_t softmax = config;
    softmax.score = EPLB_ROUTING_SCORE_SOFTMAX;
    EPLB_EXPECT_STATUS(call(softmax, 3), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("not softmax");
    eplb_router_config_t grouped = config;
    grouped.num_groups = 2;
    EPLB_EXPECT_STATUS(call(grouped, 3), EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("not hash routing");
    EPLB_EXPECT_STATUS(eplb_route_hash(stream.get(), &config, logits.data(), nullptr, table.data(), 3, 3, nullptr, nullptr,
                                       ids.data(), weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("token_ids");
    EPLB_EXPECT_STATUS(eplb_route_hash(stream.get(), &config, logits.data(), tokens.data(), nullptr, 3, 3, nullptr, nullptr,
                                       ids.data(), weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    expect_message("tid2eid");
    untouched();
}

// ---- CUDA == CPU (skipped without a device). ----

namespace {

// Random calls over the shapes the kernels treat differently: vector and scalar loads, E = 1..32,
// group fast path and generic path, softmax with and without renormalisation, NaN/inf/ties, padding.
Call random_cuda_call(int iteration, const Tables** tables, std::vector<Tables>& keep) {
    const int32_t widths[] = {1, 7, 31, 32, 33, 64, 100, 128, 160, 255, 256, 384, 500, 1000, 1024};
    const int32_t n = widths[rng()() % (sizeof(widths) / sizeof(widths[0]))];
    const int32_t score = int32_t(rng()() % 3);
    int32_t groups = 1;
    if (score != EPLB_ROUTING_SCORE_SOFTMAX && rng()() % 2 == 0) {
        std::vector<int32_t> divisors;
        for (int32_t g = 2; g <= std::min(n, 32); ++g)
            if (n % g == 0) divisors.push_back(g);
        if (!divisors.empty()) groups = divisors[rng()() % divisors.size()];
    }
    const int32_t topk_groups = 1 + int32_t(rng()() % groups);
    const int32_t k = 1 + int32_t(rng()() % std::min({32, n, topk_groups * (n / groups)}));
    const int64_t tokens = iteration == 0 ? 1 : int64_t(rng()() % 5000);
    Call c = random_topk_call(n, k, score, tokens, groups, topk_groups);
    // Quantised logits make exact ties; a few NaN and inf.
    if (rng()() % 3 == 0)
        for (auto& x : c.logits) x = std::round(x * 4.0f) / 4.0f;
    for (int i = 0; i < int(tokens / 50); ++i) c.logits[rng()() % c.logits.size()] = i % 3 == 0 ? kNaN : (i % 3 == 1 ? kInf : -kInf);
    c.num_unpadded = int32_t(rng()() % (tokens + 3));
    if (rng()() % 2 == 0) {
        keep.push_back(random_tables(n, n + int32_t(rng()() % 64), int32_t(rng()() % 3)));
        *tables = &keep.back();
    }
    return c;
}

void expect_cuda_equals_cpu(const Call& c, int64_t& bitwise, int64_t& total) {
    const Outcome want = run(EPLB_BACKEND_CPU, c);
    const Outcome got = run(EPLB_BACKEND_CUDA, c);
    for (size_t i = 0; i < want.ids.size(); ++i)
        if (got.ids[i] != want.ids[i]) EPLB_FAIL("element " << i << ": CUDA id " << got.ids[i] << ", CPU " << want.ids[i]);
    for (size_t i = 0; i < want.weights.size(); ++i) {
        if (!weight_close(got.weights[i], want.weights[i], 1e-6))
            EPLB_FAIL("element " << i << ": CUDA weight " << got.weights[i] << ", CPU " << want.weights[i]);
        bitwise += std::memcmp(&got.weights[i], &want.weights[i], sizeof(float)) == 0;
    }
    total += int64_t(want.weights.size());
    EPLB_EXPECT(got.counters == want.counters);
    EPLB_EXPECT_EQ(got.device_flags, 0u);
}

}  // namespace

EPLB_TEST(routing_cuda_matches_cpu_random) {
    require_cuda();
    int64_t bitwise = 0, total = 0;
    std::vector<Tables> keep;
    keep.reserve(64);
    for (int iteration = 0; iteration < 60; ++iteration) {
        const Tables* tables = nullptr;
        Call c = random_cuda_call(iteration, &tables, keep);
        c.tables = tables;
        expect_cuda_equals_cpu(c, bitwise, total);
    }
    std::printf("weights bitwise equal: %lld of %lld\n", (long long)bitwise, (long long)total);
}

EPLB_TEST(routing_cuda_matches_cpu_real_shapes) {
    require_cuda();
    int64_t bitwise = 0, total = 0;
    const auto rows = read_load_file("decode_in1000out1000");
    const Tables t256 = random_tables(256, 288, 1);
    const Tables t384 = random_tables(384, 416, 1);
    for (int32_t n : {256, 384}) {
        for (int64_t tokens : {1, 128, 4096, 16384}) {
            std::vector<double> load(rows[30].begin(), rows[30].end());
            load.resize(size_t(n), 10.0);
            // V3: sigmoid, 8 groups keep 4, K 8, bias; V4: sqrtsoftplus, K 6, bias; hash; softmax.
            Call v3;
            v3.config = make_config(n, 8, EPLB_ROUTING_SCORE_SIGMOID, 8, 4, true, true, 2.5f);
            v3.num_tokens = tokens;
            v3.logits = real_load_logits(load, tokens);
            v3.bias = random_logits(size_t(n), 0.1f);
            v3.tables = n == 256 ? &t256 : &t384;
            v3.num_unpadded = int32_t(tokens - tokens / 16);
            expect_cuda_equals_cpu(v3, bitwise, total);
            Call v4 = v3;
            v4.config = make_config(n, 6, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, 1, 1, true, true, 1.5f);
            expect_cuda_equals_cpu(v4, bitwise, total);
            Call softmax = v4;
            softmax.bias.clear();
            softmax.config = make_config(n, 8, EPLB_ROUTING_SCORE_SOFTMAX, 1, 1, tokens % 2 == 0);
            expect_cuda_equals_cpu(softmax, bitwise, total);
            Call hash = v4;
            hash.hash = true;
            hash.bias.clear();
            hash.vocab = 129280;
            for (int64_t i = 0; i < hash.vocab * 6; ++i) hash.tid2eid.push_back(int32_t(rng()() % n));
            for (int64_t row = 0; row < tokens; ++row) hash.token_ids.push_back(int64_t(rng()() % hash.vocab));
            expect_cuda_equals_cpu(hash, bitwise, total);
        }
    }
    std::printf("weights bitwise equal: %lld of %lld\n", (long long)bitwise, (long long)total);
}

EPLB_TEST(routing_cuda_hash_bad_input_sets_device_flags) {
    require_cuda();
    // Row 1: token id past the vocabulary (far past: no out-of-bounds read may follow); row 2: a
    // table entry of -1 at k = 0; row 3: an entry of N at k = 1. The rest is routed normally.
    Call c;
    c.hash = true;
    c.config = make_config(4, 2, EPLB_ROUTING_SCORE_SQRT_SOFTPLUS);
    c.vocab = 4;
    c.tid2eid = {0, 1, -1, 2, 3, 4, 2, 3};
    c.token_ids = {0, int64_t(1) << 50, 1, 2, 3};
    c.logits.assign(20, 1.0f);
    c.num_tokens = 5;
    const Outcome got = run(EPLB_BACKEND_CUDA, c);
    EPLB_EXPECT_EQ(got.device_flags, uint32_t(EPLB_DEVICE_ERROR_BAD_TOKEN_ID | EPLB_DEVICE_ERROR_BAD_EXPERT_ID));
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, 1, -1, -1, -1, 2, 3, -1, 2, 3}));
    const std::vector<float> want = {0.5f, 0.5f, 0.0f, 0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.5f, 0.5f};
    EPLB_EXPECT(got.weights == want);
    // Padding rows are never checked.
    c.num_unpadded = 1;
    EPLB_EXPECT_EQ(run(EPLB_BACKEND_CUDA, c).device_flags, 0u);
}

EPLB_TEST(routing_cuda_bad_table_sets_device_flag) {
    require_cuda();
    Tables t = tables_from_phy2log({0, 1, 2, 3, 0}, 4);
    t.log2phy[1] = 99;  // expert 0, replica 1
    Call c;
    c.config = make_config(4, 1, EPLB_ROUTING_SCORE_SOFTMAX);
    c.logits.assign(16, 0.0f);
    for (int row = 0; row < 4; ++row) c.logits[row * 4] = 5.0f;
    c.num_tokens = 4;
    c.tables = &t;
    const Outcome got = run(EPLB_BACKEND_CUDA, c);
    EPLB_EXPECT_EQ(got.device_flags, uint32_t(EPLB_DEVICE_ERROR_BAD_TABLE));
    // Rows 1 and 3 hash to replica 1 (the broken entry) -> -1, uncounted; rows 0, 2 -> slot 0.
    EPLB_EXPECT(got.ids == (std::vector<int32_t>{0, -1, 0, -1}));
    EPLB_EXPECT_EQ(got.counters[0], 2);
}

EPLB_TEST(routing_cuda_rejects_host_pointers) {
    require_cuda();
    Stream stream(EPLB_BACKEND_CUDA);
    const eplb_router_config_t config = make_config(4, 2, EPLB_ROUTING_SCORE_SIGMOID);
    std::vector<float> host_logits(8, 0.0f);
    Buffer<int32_t> ids(EPLB_BACKEND_CUDA, 4);
    Buffer<float> weights(EPLB_BACKEND_CUDA, 4);
    EPLB_EXPECT_STATUS(eplb_route_topk(stream.get(), &config, host_logits.data(), nullptr, 2, nullptr, nullptr, ids.data(),
                                       weights.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("host memory") != std::string::npos);
}

#if EPLB_TESTS_WITH_CUDART
// Captured once into a CUDA graph, replayed after the tables, the padding scalar and the record flag
// changed in place: every replay routes with the current values (docs/design.md §4.3).
EPLB_TEST(routing_cuda_graph_replay_sees_tables_updated_in_place) {
    require_cuda();
#define GRAPH_CHECK(expr)                                                                  \
    do {                                                                                   \
        const cudaError_t e_ = (expr);                                                     \
        if (e_ != cudaSuccess) EPLB_FAIL(#expr << " failed: " << cudaGetErrorString(e_)); \
    } while (0)
    const int32_t n = 256, k = 8;
    const int64_t tokens = 1000;
    Call c;
    c.config = make_config(n, k, EPLB_ROUTING_SCORE_SIGMOID, 8, 4, true, true, 2.5f);
    c.num_tokens = tokens;
    c.logits = random_logits(size_t(tokens) * n, 2.0f);
    c.bias = random_logits(size_t(n), 0.2f);
    const Tables first = random_tables(n, 288, 2);
    // A rebalanced placement of the same capacity (the buffers never move): the slots reshuffled.
    std::vector<int32_t> moved = first.phy2log;
    std::shuffle(moved.begin(), moved.end(), rng());
    const Tables second = tables_from_phy2log(moved, n, first.max_replicas);

    cudaStream_t cuda = nullptr;
    GRAPH_CHECK(cudaStreamCreateWithFlags(&cuda, cudaStreamNonBlocking));
    eplb_stream_t* stream = nullptr;
    EPLB_EXPECT_OK(eplb_stream_wrap_cuda(cuda, &stream));
    Buffer<float> logits(EPLB_BACKEND_CUDA, c.logits);
    Buffer<float> bias(EPLB_BACKEND_CUDA, c.bias);
    Buffer<int32_t> log2phy(EPLB_BACKEND_CUDA, first.log2phy);
    Buffer<int32_t> logcnt(EPLB_BACKEND_CUDA, first.logcnt);
    Buffer<int32_t> counters(EPLB_BACKEND_CUDA, std::vector<int32_t>(288, 0));
    Buffer<int32_t> flag(EPLB_BACKEND_CUDA, std::vector<int32_t>{1});
    Buffer<int32_t> unpadded(EPLB_BACKEND_CUDA, std::vector<int32_t>{int32_t(tokens)});
    Buffer<int32_t> ids(EPLB_BACKEND_CUDA, size_t(tokens) * k);
    Buffer<float> weights(EPLB_BACKEND_CUDA, size_t(tokens) * k);
    eplb_expert_map_t map{log2phy.data(), logcnt.data(), counters.data(), flag.data(), n, first.max_replicas, 288, 0, 0, 0};

    // Warm up outside the capture (one-time setup of the first launch), as frameworks do.
    EPLB_EXPECT_OK(eplb_route_topk(stream, &c.config, logits.data(), bias.data(), tokens, &map, unpadded.data(), ids.data(),
                                   weights.data()));
    GRAPH_CHECK(cudaStreamSynchronize(cuda));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    GRAPH_CHECK(cudaStreamBeginCapture(cuda, cudaStreamCaptureModeThreadLocal));
    const eplb_status_t captured = eplb_route_topk(stream, &c.config, logits.data(), bias.data(), tokens, &map,
                                                   unpadded.data(), ids.data(), weights.data());
    GRAPH_CHECK(cudaStreamEndCapture(cuda, &graph));
    EPLB_EXPECT_OK(captured);
    // cudaGraphInstantiate changed its signature in CUDA 12; the WithFlags form is the same in 11.4-13.x.
    GRAPH_CHECK(cudaGraphInstantiateWithFlags(&exec, graph, 0));

    auto replay_and_compare = [&](const Tables& t, int32_t rows, int32_t record) {
        // The writes go through the replay stream, so the replay reads them in stream order (a
        // blocking copy on the legacy stream is not ordered with a non-blocking stream).
        log2phy.write(t.log2phy, stream);
        logcnt.write(t.logcnt, stream);
        unpadded.write({rows}, stream);
        flag.write({record}, stream);
        counters.write(std::vector<int32_t>(288, 0), stream);
        GRAPH_CHECK(cudaGraphLaunch(exec, cuda));
        GRAPH_CHECK(cudaStreamSynchronize(cuda));
        Call want = c;
        want.tables = &t;
        want.num_unpadded = rows;
        want.record = record;
        const Outcome cpu = run(EPLB_BACKEND_CPU, want);
        EPLB_EXPECT(ids.read() == cpu.ids);
        EPLB_EXPECT(weights.read() == cpu.weights);
        EPLB_EXPECT(counters.read() == cpu.counters);
    };
    replay_and_compare(first, int32_t(tokens), 1);
    replay_and_compare(second, 700, 1);
    replay_and_compare(second, 333, 0);
    replay_and_compare(first, 0, 1);

    GRAPH_CHECK(cudaGraphExecDestroy(exec));
    GRAPH_CHECK(cudaGraphDestroy(graph));
    EPLB_EXPECT_OK(eplb_stream_destroy(stream));
    GRAPH_CHECK(cudaStreamDestroy(cuda));
#undef GRAPH_CHECK
}
#endif
