// Helpers of the MoE tests: bf16 written out independently of the library, random layers, a naive
// per-token oracle of docs/design.md §7, a runner over the C ABI (either backend, fused or unfused) and the
// bf16 tolerance check.
#pragma once

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace eplb::test {

inline float bf16_value(uint16_t bits) {
    const uint32_t wide = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &wide, 4);
    return value;
}

// Round to nearest even through double arithmetic: the two bf16 neighbours and the midpoint.
inline uint16_t to_bf16(float value) {
    if (std::isnan(value)) return 0x7fc0;
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const uint16_t low = uint16_t(bits >> 16);  // truncation: the neighbour towards zero
    const uint16_t high = uint16_t(low + 1);
    const double a = bf16_value(low), b = bf16_value(high), v = value;
    if (v == a) return low;
    const double mid = (a + b) / 2;
    if (std::fabs(v) < std::fabs(mid)) return low;
    if (std::fabs(v) > std::fabs(mid)) return high;
    return (low & 1) ? high : low;
}

inline float round_bf16(double value) { return bf16_value(to_bf16(float(value))); }

// One MoE layer with host copies of every input.
struct MoeLayer {
    eplb_moe_shape_t shape{};
    int64_t tokens = 0;
    std::vector<uint16_t> x, w1, w2;
    std::vector<int32_t> ids;
    std::vector<float> weights;

    size_t w1_size() const { return size_t(shape.num_local_experts) * 2 * shape.intermediate * shape.hidden; }
    size_t w2_size() const { return size_t(shape.num_local_experts) * shape.hidden * shape.intermediate; }
};

inline eplb_moe_shape_t moe_shape(int32_t hidden, int32_t inter, int32_t top_k, int32_t experts, int32_t local,
                                  int32_t first, float limit = 0.0f, int32_t block_m = 0) {
    eplb_moe_shape_t s{};
    s.hidden = hidden;
    s.intermediate = inter;
    s.top_k = top_k;
    s.num_experts = experts;
    s.num_local_experts = local;
    s.first_local_expert = first;
    s.swiglu_limit = limit;
    s.block_m = block_m;
    return s;
}

inline std::vector<uint16_t> random_bf16(size_t count, float scale) {
    std::uniform_real_distribution<float> uniform(-scale, scale);
    std::vector<uint16_t> values(count);
    for (auto& v : values) v = to_bf16(uniform(rng()));
    return values;
}

// Random weights scaled so activations stay O(1): W1 ~ U(-1, 1) / sqrt(H), W2 ~ U(-1, 1) / sqrt(I).
inline void randomise_weights(MoeLayer& layer) {
    layer.w1 = random_bf16(layer.w1_size(), 1.7f / std::sqrt(float(layer.shape.hidden)));
    layer.w2 = random_bf16(layer.w2_size(), 1.7f / std::sqrt(float(layer.shape.intermediate)));
}

// Random tokens: ids uniform over [-1, R) (so -1, non-local and local ids all occur), weights in (0, 1].
inline MoeLayer random_layer(const eplb_moe_shape_t& shape, int64_t tokens) {
    MoeLayer layer;
    layer.shape = shape;
    layer.tokens = tokens;
    layer.x = random_bf16(size_t(tokens) * shape.hidden, 1.0f);
    randomise_weights(layer);
    layer.ids.resize(size_t(tokens) * shape.top_k);
    for (auto& id : layer.ids) id = int32_t(rng()() % uint64_t(shape.num_experts + 1)) - 1;
    std::uniform_real_distribution<float> weight(0.01f, 1.0f);
    layer.weights.resize(layer.ids.size());
    for (auto& w : layer.weights) w = weight(rng());
    return layer;
}

// docs/design.md §7 written out per token: double dot products, the bf16 roundings where the spec puts them
// (intermediate, each expert's output row, the sum), the combine in ascending k in fp32.
inline std::vector<uint16_t> naive_moe(const MoeLayer& layer) {
    const auto& s = layer.shape;
    const int64_t H = s.hidden, I = s.intermediate;
    const double limit = s.swiglu_limit;
    std::vector<uint16_t> out(size_t(layer.tokens) * H);
    std::vector<float> h(static_cast<size_t>(I)), sum(static_cast<size_t>(H));
    for (int64_t t = 0; t < layer.tokens; ++t) {
        std::fill(sum.begin(), sum.end(), 0.0f);
        const uint16_t* x = layer.x.data() + t * H;
        for (int32_t k = 0; k < s.top_k; ++k) {
            const int64_t e = int64_t(layer.ids[size_t(t * s.top_k + k)]) - s.first_local_expert;
            if (e < 0 || e >= s.num_local_experts) continue;
            const uint16_t* w1 = layer.w1.data() + e * 2 * I * H;
            const uint16_t* w2 = layer.w2.data() + e * H * I;
            for (int64_t j = 0; j < I; ++j) {
                double gate = 0, up = 0;
                for (int64_t c = 0; c < H; ++c) {
                    gate += double(bf16_value(x[c])) * bf16_value(w1[j * H + c]);
                    up += double(bf16_value(w1[(I + j) * H + c])) * bf16_value(x[c]);
                }
                if (limit > 0) {
                    gate = std::min(gate, limit);
                    up = std::max(-limit, std::min(up, limit));
                }
                h[size_t(j)] = round_bf16(gate / (1.0 + std::exp(-gate)) * up);
            }
            const float w = layer.weights[size_t(t * s.top_k + k)];
            for (int64_t n = 0; n < H; ++n) {
                double y = 0;
                for (int64_t j = 0; j < I; ++j) y += double(h[size_t(j)]) * bf16_value(w2[n * I + j]);
                sum[size_t(n)] += w * round_bf16(y);
            }
        }
        for (int64_t n = 0; n < H; ++n) out[size_t(t * H + n)] = to_bf16(sum[size_t(n)]);
    }
    return out;
}

inline uint64_t moe_workspace_bytes(const eplb_moe_shape_t& shape, int64_t tokens) {
    uint64_t bytes = 0;
    EPLB_EXPECT_OK(eplb_moe_workspace_size(&shape, tokens, &bytes));
    return bytes;
}

enum class MoePath { Fused, Unfused };

// Runs the layer through the ABI with a poisoned output (bf16 NaN); returns the output.
inline std::vector<uint16_t> run_moe(eplb_backend_t backend, const MoeLayer& layer, MoePath path, int32_t grid = 0) {
    Stream stream(backend);
    auto nonempty = [](const auto& v) { return v.empty() ? std::decay_t<decltype(v)>(1) : v; };
    Buffer<uint16_t> x(backend, nonempty(layer.x));
    Buffer<int32_t> ids(backend, nonempty(layer.ids));
    Buffer<float> weights(backend, nonempty(layer.weights));
    Buffer<uint16_t> w1(backend, layer.w1);
    Buffer<uint16_t> w2(backend, layer.w2);
    const size_t out_count = std::max<size_t>(1, size_t(layer.tokens) * layer.shape.hidden);
    Buffer<uint16_t> out(backend, out_count);
    const uint16_t poison = 0xffff;
    EPLB_EXPECT_OK(eplb_buffer_fill(out.handle(), 0, out_count, &poison, 2, nullptr));
    const uint64_t bytes = moe_workspace_bytes(layer.shape, layer.tokens);
    Buffer<uint8_t> workspace(backend, std::max<uint64_t>(bytes, 1));
    eplb_moe_tensors_t tensors{x.data(), ids.data(), weights.data(), w1.data(), w2.data(), out.data(),
                               workspace.data(), bytes};
    if (path == MoePath::Fused) {
        EPLB_EXPECT_OK(eplb_mega_moe(stream.get(), &layer.shape, layer.tokens, &tensors, grid));
    } else {
        EPLB_EXPECT_OK(eplb_moe_unfused(stream.get(), &layer.shape, layer.tokens, &tensors));
    }
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    auto result = out.read();
    result.resize(size_t(layer.tokens) * layer.shape.hidden);
    return result;
}

// The naive loop accumulates in double where the library accumulates in fp32 (in tile order), so
// its bf16 activations and outputs round apart from the library's now and then: it checks the
// math, at twice the tolerance of the same-rounding comparisons (GPU vs CPU reference).
constexpr double kNaiveTolerance = 2e-2;

// bf16 tolerance of docs/design.md §7 tests: no NaN (the poison), and every element within 1e-2 relative of
// the reference, relative to the larger of |want| and the RMS of the token's reference row (a sum
// of K rows can cancel to far below the size of its terms, whose roundings then dominate).
inline void expect_close(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, int64_t hidden,
                         const std::string& what, double tolerance = 1e-2) {
    EPLB_EXPECT_EQ(got.size(), want.size());
    double worst = 0;
    size_t worst_index = 0;
    for (size_t row = 0; row * size_t(hidden) < want.size(); ++row) {
        double squares = 0;
        for (int64_t n = 0; n < hidden; ++n) squares += std::pow(double(bf16_value(want[row * hidden + n])), 2);
        const double rms = std::sqrt(squares / double(hidden));
        for (int64_t n = 0; n < hidden; ++n) {
            const size_t i = row * size_t(hidden) + size_t(n);
            const double g = bf16_value(got[i]), w = bf16_value(want[i]);
            if (std::isnan(g)) EPLB_FAIL(what << ": element " << i << " (token " << row << ") is NaN: not written");
            // Two bf16 steps of w always pass: fp32 sums in another order can round an intermediate
            // (the bf16 activation) apart, which moves the bf16 output by a step or two; near the
            // bottom of a binade two steps are 1.6% of the value.
            const double step = std::ldexp(1.0, std::ilogb(std::max(std::fabs(w), 1e-30)) - 7);
            if (std::fabs(g - w) <= 2 * step) continue;
            const double scale = std::max(std::fabs(w), rms);
            const double error = scale > 0 ? std::fabs(g - w) / scale : std::fabs(g - w);
            if (error > worst) {
                worst = error;
                worst_index = i;
            }
        }
    }
    if (worst > tolerance)
        EPLB_FAIL(what << ": relative error " << worst << " at element " << worst_index << " (got "
                       << bf16_value(got[worst_index]) << ", want " << bf16_value(want[worst_index]) << ")");
}

}  // namespace eplb::test
