// Benchmark of the routing kernels with the fused EPLB epilogue (map + record on), per op, for
// T in {1, 128, 4096, 16384}, N in {256, 384}, K in {6, 8}. Prints a Markdown table: median time,
// achieved bytes/s and its fraction of the measured device copy bandwidth (docs/design.md §10: >= 80% at 16K
// tokens). Bytes are what the op must move at least once:
//   scored top-k  logits T*N*4 + bias N*4 + ids and weights T*K*8 + tables (log2phy, logcnt, counters r/w)
//   hash          token ids T*8 + table rows T*K*4 + the K logits read per row T*K*4 + outputs T*K*8 + tables
// The hash op reads only K logits a row, so it is latency- rather than bandwidth-bound; its bytes/s
// is reported for completeness.
#include <random>

#include "bench_util.hpp"

using namespace eplb::bench;

namespace {

struct Op {
    const char* name;
    int32_t score;
    int32_t groups;
    int32_t topk_groups;
    bool bias;
    bool hash;
};

constexpr Op kOps[] = {
    {"hash (V4)", EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, 1, 1, false, true},
    {"biased sqrtsoftplus (V4)", EPLB_ROUTING_SCORE_SQRT_SOFTPLUS, 1, 1, true, false},
    {"grouped sigmoid 8/4 (V3)", EPLB_ROUTING_SCORE_SIGMOID, 8, 4, true, false},
    {"softmax renormalised", EPLB_ROUTING_SCORE_SOFTMAX, 1, 1, false, false},
};

constexpr int64_t kVocab = 129280;  // DeepSeek-V4's vocabulary
constexpr int32_t kRedundant = 32;  // R = N + 32
constexpr int32_t kMaxReplicas = 4;

template <typename T>
T* upload(const std::vector<T>& values) {
    T* device = nullptr;
    BENCH_CUDA(cudaMalloc(&device, values.size() * sizeof(T)));
    BENCH_CUDA(cudaMemcpy(device, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice));
    return device;
}

}  // namespace

int main() {
    Session session("routing");
    cudaStream_t cuda = session.cuda;
    eplb_stream_t* stream = session.stream;
    const double copy = session.copy;
    std::printf("\n");
    std::printf("EPLB map (R = N + %d, TokenHash) and load recording on; logits ~ N(0, 1), bias ~ N(0, 0.1).\n\n",
                kRedundant);
    std::printf("| op | T | N | K | us | GB/s | of copy |\n|---|---:|---:|---:|---:|---:|---:|\n");
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);

    // The largest inputs once; smaller T use prefixes.
    const int64_t max_tokens = 16384;
    std::vector<float> host_logits(size_t(max_tokens) * 384);
    for (auto& x : host_logits) x = normal(rng);
    std::vector<int64_t> host_tokens(static_cast<size_t>(max_tokens));
    for (auto& t : host_tokens) t = int64_t(rng() % kVocab);
    float* logits = upload(host_logits);
    int64_t* token_ids = upload(host_tokens);
    int32_t* ids = nullptr;
    float* weights = nullptr;
    BENCH_CUDA(cudaMalloc(&ids, size_t(max_tokens) * 8 * sizeof(int32_t)));
    BENCH_CUDA(cudaMalloc(&weights, size_t(max_tokens) * 8 * sizeof(float)));

    for (const Op& op : kOps) {
        for (int32_t n : {256, 384}) {
            for (int32_t k : {6, 8}) {
                // Tables: every expert once, the first 32 experts (by a fixed shuffle) a second time.
                const int32_t r = n + kRedundant;
                std::vector<int32_t> log2phy(size_t(n) * kMaxReplicas, -1), logcnt(size_t(n), 1);
                for (int32_t e = 0; e < n; ++e) log2phy[size_t(e) * kMaxReplicas] = e;
                for (int32_t s = n; s < r; ++s) {
                    const int32_t e = (s - n) * 7 % n;
                    log2phy[size_t(e) * kMaxReplicas + logcnt[e]++] = s;
                }
                std::vector<float> host_bias(static_cast<size_t>(n));
                for (auto& b : host_bias) b = 0.1f * normal(rng);
                std::vector<int32_t> host_table(size_t(kVocab) * k);
                for (auto& e : host_table) e = int32_t(rng() % n);
                int32_t* d_log2phy = upload(log2phy);
                int32_t* d_logcnt = upload(logcnt);
                int32_t* d_counters = upload(std::vector<int32_t>(size_t(r), 0));
                int32_t* d_flag = upload(std::vector<int32_t>{1});
                float* d_bias = upload(host_bias);
                int32_t* d_table = op.hash ? upload(host_table) : nullptr;
                eplb_expert_map_t map{d_log2phy, d_logcnt, d_counters, d_flag, n, kMaxReplicas, r,
                                      EPLB_REPLICA_SELECTION_TOKEN_HASH};
                eplb_router_config_t config{n, k, op.score, op.groups, op.topk_groups, 1, 1, 2.5f};

                for (int64_t tokens : {int64_t(1), int64_t(128), int64_t(4096), int64_t(16384)}) {
                    const double us = median_us([&] {
                        if (op.hash)
                            BENCH_EPLB(eplb_route_hash(stream, &config, logits, token_ids, d_table, kVocab, tokens, &map,
                                                       nullptr, ids, weights));
                        else
                            BENCH_EPLB(eplb_route_topk(stream, &config, logits, op.bias ? d_bias : nullptr, tokens, &map,
                                                       nullptr, ids, weights));
                    }, cuda);
                    const double tables = double(log2phy.size() + logcnt.size() + 2 * size_t(r)) * 4;
                    const double outputs = double(tokens) * k * 8;
                    const double bytes = op.hash ? double(tokens) * 8 + double(tokens) * k * 8 + outputs + tables
                                                 : double(tokens) * n * 4 + (op.bias ? n * 4.0 : 0.0) + outputs + tables;
                    const double rate = bytes / (us * 1e-6);
                    std::printf("| %s | %lld | %d | %d | %.2f | %.0f | %.0f%% |\n", op.name, (long long)tokens, n, k, us,
                                rate / 1e9, 100.0 * rate / copy);
                }
                BENCH_EPLB(eplb_stream_check_device_errors(stream, nullptr));
                for (void* p : {(void*)d_log2phy, (void*)d_logcnt, (void*)d_counters, (void*)d_flag, (void*)d_bias, (void*)d_table})
                    if (p) BENCH_CUDA(cudaFree(p));
            }
        }
    }
    for (void* p : {(void*)logits, (void*)token_ids, (void*)ids, (void*)weights}) BENCH_CUDA(cudaFree(p));
    return 0;
}
