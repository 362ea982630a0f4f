#include "cpu/moe.hpp"

#include "cpu/dispatch.hpp"

#include <algorithm>
#include <vector>

namespace eplb::cpu {

namespace {

// fp32 dot product of n (a multiple of 16) elements with 16 interleaved partial sums added in a
// fixed tree: the reference's accumulation order (vectorisable, deterministic). The GPU's tensor
// cores sum in another order; tests compare the two within bf16 tolerance.
float dot(const float* a, const float* b, int64_t n) {
    float lanes[16] = {};
    for (int64_t i = 0; i < n; i += 16)
        for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
    for (int width = 8; width > 0; width /= 2)
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
    return lanes[0];
}

void widen(const uint16_t* bits, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(bits[i]);
}

}  // namespace

void moe_route(const MoeProblem& p) {
    const int32_t experts = p.num_local_experts;
    const int64_t pairs = p.num_tokens * p.top_k;
    std::vector<int32_t> cursor(size_t(experts) + 1, 0);
    for (int64_t i = 0; i < pairs; ++i) {
        const int64_t local = int64_t(p.topk_ids[i]) - p.first_local_expert;
        if (local >= 0 && local < experts) ++cursor[size_t(local) + 1];
    }
    for (int32_t e = 0; e < experts; ++e) cursor[size_t(e) + 1] += cursor[size_t(e)];
    std::copy(cursor.begin(), cursor.end(), p.expert_offsets);
    // Ascending flat index inside each expert: the layout vLLM's moe_align_block_size produces.
    for (int64_t i = 0; i < pairs; ++i) {
        const int64_t local = int64_t(p.topk_ids[i]) - p.first_local_expert;
        if (local >= 0 && local < experts) {
            const int32_t row = cursor[size_t(local)]++;
            p.positions[i] = row;
            p.sorted[row] = int32_t(i);
        } else {
            p.positions[i] = -1;
        }
    }
}

void moe_gemm1_swiglu(const MoeProblem& p, bool gathered) {
    const int64_t hidden = p.hidden;
    const int64_t inter = p.intermediate;
    std::vector<float> gate(static_cast<size_t>(hidden)), up(static_cast<size_t>(hidden)), a;
    for (int32_t e = 0; e < p.num_local_experts; ++e) {
        const int32_t first = p.expert_offsets[e];
        const int32_t rows = p.expert_offsets[e + 1] - first;
        if (rows == 0) continue;  // an expert without tokens costs nothing
        a.resize(size_t(rows) * size_t(hidden));
        for (int32_t r = 0; r < rows; ++r) {
            const uint16_t* source = gathered ? p.x + int64_t(p.sorted[first + r] / p.top_k) * hidden
                                              : p.expert_out + int64_t(first + r) * hidden;
            widen(source, hidden, a.data() + size_t(r) * size_t(hidden));
        }
        const uint16_t* w1 = p.w1 + int64_t(e) * 2 * inter * hidden;
        for (int64_t j = 0; j < inter; ++j) {
            widen(w1 + j * hidden, hidden, gate.data());
            widen(w1 + (inter + j) * hidden, hidden, up.data());
            for (int32_t r = 0; r < rows; ++r) {
                const float* row = a.data() + size_t(r) * size_t(hidden);
                const float value = swiglu(dot(row, gate.data(), hidden), dot(row, up.data(), hidden), p.swiglu_limit);
                p.intermediate_rows[int64_t(first + r) * inter + j] = float_to_bf16(value);
            }
        }
    }
}

void moe_gemm2(const MoeProblem& p) {
    const int64_t hidden = p.hidden;
    const int64_t inter = p.intermediate;
    std::vector<float> weights(static_cast<size_t>(inter)), a;
    for (int32_t e = 0; e < p.num_local_experts; ++e) {
        const int32_t first = p.expert_offsets[e];
        const int32_t rows = p.expert_offsets[e + 1] - first;
        if (rows == 0) continue;
        a.resize(size_t(rows) * size_t(inter));
        widen(p.intermediate_rows + int64_t(first) * inter, int64_t(rows) * inter, a.data());
        const uint16_t* w2 = p.w2 + int64_t(e) * hidden * inter;
        for (int64_t n = 0; n < hidden; ++n) {
            widen(w2 + n * inter, inter, weights.data());
            for (int32_t r = 0; r < rows; ++r)
                p.expert_out[int64_t(first + r) * hidden + n] =
                    float_to_bf16(dot(a.data() + size_t(r) * size_t(inter), weights.data(), inter));
        }
    }
}

void moe_combine(const MoeProblem& p) {
    const int64_t hidden = p.hidden;
    std::vector<float> sum(static_cast<size_t>(hidden));
    for (int64_t t = 0; t < p.num_tokens; ++t) {
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int32_t k = 0; k < p.top_k; ++k) {
            const int32_t row = p.positions[t * p.top_k + k];
            if (row < 0) continue;
            const float w = p.topk_weights[t * p.top_k + k];
            const uint16_t* y = p.expert_out + int64_t(row) * hidden;
            for (int64_t n = 0; n < hidden; ++n) sum[size_t(n)] = weighted_add(sum[size_t(n)], w, bf16_to_float(y[n]));
        }
        for (int64_t n = 0; n < hidden; ++n) p.output[t * hidden + n] = float_to_bf16(sum[size_t(n)]);
    }
}

void mega_moe(const MoeProblem& p) {
    moe_route(p);
    moe_gemm1_swiglu(p, /*gathered=*/true);
    moe_gemm2(p);
    moe_combine(p);
}

void moe_unfused(const MoeProblem& p) {
    // The dispatch ops around the grouped GEMMs. Block size 1: no padding rows, so the layout is
    // exactly moe_route's (stable, ascending pair inside an expert).
    const int64_t pairs = p.num_tokens * p.top_k;
    align(p.topk_ids, p.num_tokens, p.top_k, p.first_local_expert, p.num_local_experts, 1, pairs, p.expert_counts,
          p.expert_offsets, p.sorted, nullptr, p.positions);
    permute(p.x, p.hidden, sizeof(uint16_t), p.top_k, p.sorted, p.expert_offsets[p.num_local_experts], p.expert_out);
    moe_gemm1_swiglu(p, /*gathered=*/false);
    moe_gemm2(p);
    combine(EPLB_DTYPE_BF16, p.expert_out, p.hidden, p.positions, p.topk_weights, p.num_tokens, p.top_k,
            EPLB_DTYPE_BF16, p.output);
}

}  // namespace eplb::cpu
