// Benchmark of Mega MoE (eplb_mega_moe) against the unfused path (eplb_moe_unfused) on
// DeepSeek-V4-Flash (hidden 4096, intermediate 2048, 256 experts, top-6, SwiGLU limit 10) and
// DeepSeek-V3-shaped (7168, 2048, 256, top-8) layers, all experts on one GPU and the 1/8 one of 8
// ranks holds, for 1 to 4096 tokens. Ids are distinct uniform top-k picks over the 256 slots.
//
// Columns: the tile height and grid the fused kernel used; median time of each path; the weight
// bytes of the experts that received tokens (each read once at best) over the fused time, and its
// fraction of the measured device copy bandwidth; the tensor-core rate over the local (token,
// expert) pairs (2 * pairs * 3 * H * I flops); the fused speed-up over the unfused path; whether
// both paths gave the same bits. PyTorch's rates (bf16 GEMM, the torch pipeline) are in the peer
// script, native/bench/peers/moe_peer.py.
#include <cmath>
#include <cstring>
#include <random>
#include <set>

#include "bench_util.hpp"

using namespace eplb::bench;

namespace {

struct Model {
    const char* name;
    int32_t hidden, intermediate, top_k;
    float limit;
};

void* device_alloc(size_t bytes) {
    void* pointer = nullptr;
    BENCH_CUDA(cudaMalloc(&pointer, bytes));
    return pointer;
}

// Fills count bf16 with U(-scale, scale) by repeating a random 8 MiB host block.
void fill_random_bf16(uint16_t* device, size_t count, float scale, std::mt19937& rng) {
    std::uniform_real_distribution<float> uniform(-scale, scale);
    std::vector<uint16_t> block(size_t(4) << 20);
    for (auto& v : block) {
        const float f = uniform(rng);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        v = uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
    for (size_t at = 0; at < count; at += block.size()) {
        const size_t n = std::min(block.size(), count - at);
        BENCH_CUDA(cudaMemcpy(device + at, block.data(), n * 2, cudaMemcpyHostToDevice));
    }
}

}  // namespace

int main() {
    Session session("Mega MoE");
    cudaStream_t cuda = session.cuda;
    eplb_stream_t* stream = session.stream;
    const double copy = session.copy;
    std::printf("\n");
    std::printf("| layer | experts | T | tile | grid | fused us | unfused us | weights GB/s | of copy | TFLOP/s | "
                "fused speed-up | same bits |\n");
    std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");

    std::mt19937 rng(7);
    const Model models[] = {{"V4-Flash", 4096, 2048, 6, 10.0f}, {"V3", 7168, 2048, 8, 0.0f}};
    const int32_t kExperts = 256;
    const int64_t kMaxTokens = 4096;
    for (const Model& model : models) {
        const size_t h = size_t(model.hidden), inter = size_t(model.intermediate);
        // All 256 experts' weights once; the 1/8 rank uses the first 32 of them.
        auto* w1 = static_cast<uint16_t*>(device_alloc(size_t(kExperts) * 2 * inter * h * 2));
        auto* w2 = static_cast<uint16_t*>(device_alloc(size_t(kExperts) * h * inter * 2));
        fill_random_bf16(w1, size_t(kExperts) * 2 * inter * h, 1.7f / std::sqrt(float(h)), rng);
        fill_random_bf16(w2, size_t(kExperts) * h * inter, 1.7f / std::sqrt(float(inter)), rng);
        auto* x = static_cast<uint16_t*>(device_alloc(size_t(kMaxTokens) * h * 2));
        fill_random_bf16(x, size_t(kMaxTokens) * h, 1.0f, rng);
        auto* out = static_cast<uint16_t*>(device_alloc(size_t(kMaxTokens) * h * 2));
        auto* out_unfused = static_cast<uint16_t*>(device_alloc(size_t(kMaxTokens) * h * 2));
        auto* ids = static_cast<int32_t*>(device_alloc(size_t(kMaxTokens) * model.top_k * 4));
        auto* weights = static_cast<float*>(device_alloc(size_t(kMaxTokens) * model.top_k * 4));

        for (int32_t local : {kExperts, kExperts / 8}) {
            eplb_moe_shape_t shape{};
            shape.hidden = model.hidden;
            shape.intermediate = model.intermediate;
            shape.top_k = model.top_k;
            shape.num_experts = kExperts;
            shape.num_local_experts = local;
            shape.first_local_expert = 0;
            shape.swiglu_limit = model.limit;
            uint64_t workspace_bytes = 0;
            BENCH_EPLB(eplb_moe_workspace_size(&shape, kMaxTokens, &workspace_bytes));
            void* workspace = device_alloc(workspace_bytes);
            for (int64_t tokens : {1, 16, 128, 512, 4096}) {
                // Distinct uniform top-k per token, weights in (0, 1].
                std::vector<int32_t> host_ids(size_t(tokens) * model.top_k);
                std::vector<float> host_weights(host_ids.size());
                std::uniform_real_distribution<float> weight(0.05f, 1.0f);
                std::set<int32_t> active;
                int64_t local_pairs = 0;
                for (int64_t t = 0; t < tokens; ++t) {
                    std::set<int32_t> picked;
                    for (int32_t k = 0; k < model.top_k; ++k) {
                        int32_t e;
                        do e = int32_t(rng() % kExperts);
                        while (!picked.insert(e).second);
                        host_ids[size_t(t * model.top_k + k)] = e;
                        host_weights[size_t(t * model.top_k + k)] = weight(rng);
                        if (e < local) {
                            active.insert(e);
                            ++local_pairs;
                        }
                    }
                }
                BENCH_CUDA(cudaMemcpy(ids, host_ids.data(), host_ids.size() * 4, cudaMemcpyHostToDevice));
                BENCH_CUDA(cudaMemcpy(weights, host_weights.data(), host_weights.size() * 4, cudaMemcpyHostToDevice));
                const eplb_moe_tensors_t tensors{x, ids, weights, w1, w2, out, workspace, workspace_bytes};
                eplb_moe_tensors_t unfused_tensors = tensors;
                unfused_tensors.output = out_unfused;

                int32_t grid = 0, tile = 0;
                const eplb_status_t fits = eplb_mega_moe_max_grid(stream, &shape, tokens, &grid, &tile);
                double fused_us = 0;
                if (fits == EPLB_STATUS_OK) {
                    fused_us = median_us([&] { BENCH_EPLB(eplb_mega_moe(stream, &shape, tokens, &tensors, 0)); }, cuda, 5, 30);
                    BENCH_EPLB(eplb_stream_check_device_errors(stream, nullptr));
                }
                const double unfused_us =
                    median_us([&] { BENCH_EPLB(eplb_moe_unfused(stream, &shape, tokens, &unfused_tensors)); }, cuda, 5, 30);
                bool same = false;
                if (fits == EPLB_STATUS_OK) {
                    std::vector<uint16_t> a(size_t(tokens) * h), b(a.size());
                    BENCH_CUDA(cudaMemcpy(a.data(), out, a.size() * 2, cudaMemcpyDeviceToHost));
                    BENCH_CUDA(cudaMemcpy(b.data(), out_unfused, b.size() * 2, cudaMemcpyDeviceToHost));
                    same = a == b;
                }
                const double best_us = fused_us > 0 ? fused_us : unfused_us;
                const double weight_bytes = double(active.size()) * 3.0 * double(h) * double(inter) * 2.0;
                const double rate = weight_bytes / (best_us * 1e-6);
                const double flops = 2.0 * double(local_pairs) * 3.0 * double(h) * double(inter);
                char experts[32];
                std::snprintf(experts, sizeof(experts), "%d of %d (%zu active)", local, kExperts, active.size());
                if (fits == EPLB_STATUS_OK) {
                    std::printf("| %s | %s | %lld | %d | %d | %.1f | %.1f | %.0f | %.0f%% | %.1f | %.2fx | %s |\n",
                                model.name, experts, (long long)tokens, tile, grid, fused_us, unfused_us, rate / 1e9,
                                100.0 * rate / copy, flops / (best_us * 1e-6) / 1e12, unfused_us / fused_us,
                                same ? "yes" : "NO");
                } else {
                    std::printf("| %s | %s | %lld | - | - | unavailable: %s | %.1f | %.0f | %.0f%% | %.1f | - | - |\n",
                                model.name, experts, (long long)tokens, eplb_last_error_message(), unfused_us,
                                rate / 1e9, 100.0 * rate / copy, flops / (best_us * 1e-6) / 1e12);
                }
                std::fflush(stdout);
            }
            BENCH_CUDA(cudaFree(workspace));
        }
        for (void* p : {(void*)w1, (void*)w2, (void*)x, (void*)out, (void*)out_unfused, (void*)ids, (void*)weights})
            BENCH_CUDA(cudaFree(p));
    }
    return 0;
}
