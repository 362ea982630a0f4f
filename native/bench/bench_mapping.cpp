// Benchmark of the stand-alone logical -> physical mapping with load recording.
// Prints a Markdown table: tokens, top-k, R, median time, achieved bytes/s and its fraction of
// the measured device copy bandwidth (the op reads ids + tables and writes ids + counters).
#include <random>

#include "bench_util.hpp"

using namespace eplb::bench;

int main() {
    Session session("mapping");
    cudaStream_t cuda = session.cuda;
    eplb_stream_t* stream = session.stream;
    const double copy = session.copy;
    std::printf("\n");
    std::printf("| T | K | N | R | us | GB/s | of copy |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    std::mt19937 rng(7);
    for (int64_t tokens : {1, 128, 4096, 16384, 65536}) {
        for (int32_t top_k : {6, 8}) {
            const int32_t n = 256, r = 288, kmax = 4;
            std::vector<int32_t> ids(size_t(tokens) * top_k), log2phy(size_t(n) * kmax, -1), logcnt(n, 1);
            for (auto& id : ids) id = int32_t(rng() % n);
            for (int32_t e = 0; e < n; ++e) log2phy[size_t(e) * kmax] = e;
            for (int32_t s = n; s < r; ++s) {
                const int32_t e = (s - n) * 7 % n;
                log2phy[size_t(e) * kmax + logcnt[e]++] = s;
            }
            int32_t *d_ids, *d_out, *d_table, *d_cnt, *d_counters, *d_flag;
            BENCH_CUDA(cudaMalloc(&d_ids, ids.size() * 4));
            BENCH_CUDA(cudaMalloc(&d_out, ids.size() * 4));
            BENCH_CUDA(cudaMalloc(&d_table, log2phy.size() * 4));
            BENCH_CUDA(cudaMalloc(&d_cnt, logcnt.size() * 4));
            BENCH_CUDA(cudaMalloc(&d_counters, size_t(r) * 4));
            BENCH_CUDA(cudaMalloc(&d_flag, 4));
            const int32_t one = 1;
            BENCH_CUDA(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
            BENCH_CUDA(cudaMemcpy(d_table, log2phy.data(), log2phy.size() * 4, cudaMemcpyHostToDevice));
            BENCH_CUDA(cudaMemcpy(d_cnt, logcnt.data(), logcnt.size() * 4, cudaMemcpyHostToDevice));
            BENCH_CUDA(cudaMemcpy(d_flag, &one, 4, cudaMemcpyHostToDevice));
            BENCH_CUDA(cudaMemset(d_counters, 0, size_t(r) * 4));
            eplb_expert_map_t map{d_table, d_cnt, d_counters, d_flag, n, kmax, r, EPLB_REPLICA_SELECTION_TOKEN_HASH};
            const double us = median_us([&] {
                BENCH_EPLB(eplb_map_logical_to_physical(stream, d_ids, tokens, top_k, &map, nullptr, d_out));
            }, cuda);
            const double bytes = double(ids.size()) * 8 + double(log2phy.size() + logcnt.size() + r) * 4;
            const double rate = bytes / (us * 1e-6);
            std::printf("| %lld | %d | %d | %d | %.2f | %.0f | %.0f%% |\n", (long long)tokens, top_k, n, r, us, rate / 1e9,
                        100.0 * rate / copy);
            for (void* p : {(void*)d_ids, (void*)d_out, (void*)d_table, (void*)d_cnt, (void*)d_counters, (void*)d_flag})
                BENCH_CUDA(cudaFree(p));
        }
    }
    return 0;
}
