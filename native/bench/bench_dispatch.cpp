// Benchmark of the dispatch ops at DeepSeek-V3 shapes: hidden 7168 bf16, top-8 of 256 experts (one
// slot each) over 8 simulated EP ranks of 32 slots (rank 0 measured) and over 1 rank (all local),
// T in {128, 4096, 16384}; ids uniform over experts, distinct within a token (fixed seed).
//
// Prints a Markdown table. "call" is the median of CUDA events around one ABI call (host-side
// validation included, as a framework calling libeplb sees it); "graph" is the per-op time of 20
// calls captured in a CUDA graph (kernels only, as a graph-replayed decode step sees it). GB/s counts
// the bytes an op must move (rows read + rows written + index arrays) over the graph time, and
// "of copy" compares it with the measured device-to-device copy bandwidth (read + write).
// "align (one block)" / "align (several blocks)" force either align path at every size
// (EPLB_ALIGN_SPLIT_PAIRS); below 2 x max(experts, 4096) pairs both rows are the one-block kernel.
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "bench_util.hpp"

using namespace eplb::bench;

namespace {

constexpr int32_t kTopK = 8;
constexpr int32_t kExperts = 256;
constexpr int64_t kHidden = 7168;
constexpr int32_t kBlock = 128;
constexpr int kGraphOps = 20;

struct Timing {
    double call_us;
    double graph_us;  // NaN when the op could not be captured
};

using Op = std::function<eplb_status_t()>;

// Per-op time inside a CUDA graph of kGraphOps calls; NaN (and a note) when the op cannot be captured.
double graph_us(const Op& op, cudaStream_t stream) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) return NAN;
    eplb_status_t status = EPLB_STATUS_OK;
    for (int i = 0; i < kGraphOps && status == EPLB_STATUS_OK; ++i) status = op();
    const cudaError_t captured = cudaStreamEndCapture(stream, &graph);
    if (status != EPLB_STATUS_OK || captured != cudaSuccess || cudaGraphInstantiateWithFlags(&exec, graph, 0) != cudaSuccess) {
        std::fprintf(stderr, "note: graph capture failed: %s / %s\n", eplb_last_error_message(), cudaGetErrorString(captured));
        cudaGetLastError();
        if (graph) cudaGraphDestroy(graph);
        return NAN;
    }
    const double us = median_us([&] { BENCH_CUDA(cudaGraphLaunch(exec, stream)); }, stream, 3, 50) / kGraphOps;
    BENCH_CUDA(cudaGraphExecDestroy(exec));
    BENCH_CUDA(cudaGraphDestroy(graph));
    return us;
}

Timing time_op(const Op& op, cudaStream_t stream) {
    return {median_us([&] { BENCH_EPLB(op()); }, stream), graph_us(op, stream)};
}

template <typename T>
T* device_alloc(size_t count) {
    void* p = nullptr;
    BENCH_CUDA(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
    return static_cast<T*>(p);
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
    T* p = device_alloc<T>(host.size());
    BENCH_CUDA(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}

int32_t read_scalar(const int32_t* device) {
    int32_t value = 0;
    BENCH_CUDA(cudaMemcpy(&value, device, sizeof(value), cudaMemcpyDeviceToHost));
    return value;
}

void print_row(const char* op, int64_t tokens, int ranks, int64_t rows, const Timing& t, double bytes, double copy) {
    // Rates over the graph time (kernels only), or over the call time when the op could not be captured.
    const double rate = bytes / ((std::isnan(t.graph_us) ? t.call_us : t.graph_us) * 1e-6);
    std::printf("| %s | %lld | %d | %lld | %.2f | %.2f | %.0f | %.0f%% |\n", op, (long long)tokens, ranks, (long long)rows,
                t.call_us, t.graph_us, rate / 1e9, 100.0 * rate / copy);
}

}  // namespace

int main() {
    Session session("dispatch");
    cudaStream_t cuda = session.cuda;
    eplb_stream_t* stream = session.stream;
    const double copy = session.copy;
    std::printf("# hidden %lld bf16, top-%d of %d experts, block %d; rank 0 of the given ranks measured\n\n",
                (long long)kHidden, kTopK, kExperts, kBlock);
    std::printf("| op | T | ranks | rows | call us | graph us | GB/s | of copy |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");

    std::mt19937 rng(7);
    const size_t row_bytes = size_t(kHidden) * 2;
    for (int64_t tokens : {128, 4096, 16384}) {
        const int64_t pairs = tokens * kTopK;
        std::vector<int32_t> ids(static_cast<size_t>(pairs));
        std::vector<int32_t> experts(kExperts);
        for (int64_t t = 0; t < tokens; ++t) {
            std::iota(experts.begin(), experts.end(), 0);
            for (int32_t k = 0; k < kTopK; ++k) {
                std::swap(experts[size_t(k)], experts[size_t(k + int32_t(rng() % uint32_t(kExperts - k)))]);
                ids[size_t(t * kTopK + k)] = experts[size_t(k)];
            }
        }
        std::vector<uint16_t> x(size_t(tokens * kHidden));
        uint32_t state = 12345;
        for (auto& v : x) v = uint16_t(0x3C00 + ((state = state * 1664525u + 1013904223u) >> 22));  // bf16 in [2^-7, 2)
        std::vector<float> weights(size_t(pairs), 1.0f / kTopK);
        int32_t* d_ids = device_copy(ids);
        uint16_t* d_x = device_copy(x);
        float* d_weights = device_copy(weights);
        uint16_t* d_out = device_alloc<uint16_t>(size_t(tokens * kHidden));

        for (int ranks : {8, 1}) {
            const int32_t local = kExperts / ranks;
            int64_t capacity = 0;
            BENCH_EPLB(eplb_dispatch_align_capacity(pairs, local, kBlock, &capacity));
            int32_t* counts = device_alloc<int32_t>(size_t(local));
            int32_t* offsets = device_alloc<int32_t>(size_t(local) + 1);
            int32_t* sorted = device_alloc<int32_t>(size_t(capacity));
            int32_t* blocks = device_alloc<int32_t>(size_t(capacity / kBlock));
            int32_t* positions = device_alloc<int32_t>(size_t(pairs));
            uint16_t* rows = device_alloc<uint16_t>(size_t(capacity) * kHidden);

            // Align
            const Timing align = time_op([&] {
                return eplb_dispatch_align(stream, d_ids, tokens, kTopK, 0, local, kBlock, capacity, counts, offsets, sorted,
                                           blocks, positions);
            }, cuda);
            BENCH_CUDA(cudaStreamSynchronize(cuda));
            const int32_t total_rows = read_scalar(offsets + local);
            std::vector<int32_t> host_counts(static_cast<size_t>(local));
            BENCH_CUDA(cudaMemcpy(host_counts.data(), counts, size_t(local) * 4, cudaMemcpyDeviceToHost));
            int64_t local_pairs = 0;
            for (int32_t c : host_counts) local_pairs += c;
            const double align_bytes = double(pairs) * 8 + double(capacity) * 4 + double(capacity / kBlock) * 4;
            print_row("align", tokens, ranks, total_rows, align, align_bytes, copy);
            // Both align paths at this size (EPLB_ALIGN_SPLIT_PAIRS forces one), to place the switch
            // from one block to several (bucket::kSplitPairs) on measured numbers.
            for (const char* split : {"1000000000", "0"}) {
                setenv("EPLB_ALIGN_SPLIT_PAIRS", split, 1);
                const Timing forced = time_op([&] {
                    return eplb_dispatch_align(stream, d_ids, tokens, kTopK, 0, local, kBlock, capacity, counts, offsets,
                                               sorted, blocks, positions);
                }, cuda);
                print_row(split[0] == '0' ? "align (several blocks)" : "align (one block)", tokens, ranks, total_rows,
                          forced, align_bytes, copy);
            }
            unsetenv("EPLB_ALIGN_SPLIT_PAIRS");

            // Permute: every local pair's row read and written; padding rows are not written.
            const Timing permute = time_op([&] {
                return eplb_dispatch_permute(stream, EPLB_DTYPE_BF16, d_x, tokens, kHidden, kTopK, sorted, offsets + local,
                                             capacity, rows);
            }, cuda);
            print_row("permute", tokens, ranks, local_pairs, permute, double(local_pairs) * 2 * row_bytes + total_rows * 4.0,
                      copy);

            // Combine: every local pair's row read, every token's row written.
            const Timing combine = time_op([&] {
                return eplb_dispatch_combine(stream, EPLB_DTYPE_BF16, rows, capacity, kHidden, positions, d_weights, tokens,
                                             kTopK, EPLB_DTYPE_BF16, d_out);
            }, cuda);
            print_row("combine", tokens, ranks, tokens, combine,
                      double(local_pairs + tokens) * row_bytes + double(pairs) * 8, copy);

            for (void* p : {(void*)counts, (void*)offsets, (void*)sorted, (void*)blocks, (void*)positions, (void*)rows})
                BENCH_CUDA(cudaFree(p));
        }

        // EP bucketing over 8 ranks, and the send-buffer permute it feeds.
        int32_t* rank_counts = device_alloc<int32_t>(8);
        int32_t* rank_offsets = device_alloc<int32_t>(9);
        int32_t* send_ids = device_alloc<int32_t>(size_t(pairs));
        int32_t* send_positions = device_alloc<int32_t>(size_t(pairs));
        uint16_t* send = device_alloc<uint16_t>(size_t(pairs) * kHidden);
        const Timing bucket = time_op([&] {
            return eplb_dispatch_bucket_by_rank(stream, d_ids, tokens, kTopK, kExperts, 8, rank_counts, rank_offsets,
                                                send_ids, send_positions);
        }, cuda);
        print_row("bucket", tokens, 8, pairs, bucket, double(pairs) * 12, copy);
        const Timing gather = time_op([&] {
            return eplb_dispatch_permute(stream, EPLB_DTYPE_BF16, d_x, tokens, kHidden, kTopK, send_ids, rank_offsets + 8,
                                         pairs, send);
        }, cuda);
        print_row("permute (send)", tokens, 8, pairs, gather, double(pairs) * 2 * row_bytes + pairs * 4.0, copy);
        BENCH_EPLB(eplb_stream_check_device_errors(stream, nullptr));

        for (void* p : {(void*)rank_counts, (void*)rank_offsets, (void*)send_ids, (void*)send_positions, (void*)send,
                        (void*)d_ids, (void*)d_x, (void*)d_weights, (void*)d_out})
            BENCH_CUDA(cudaFree(p));
    }
    return 0;
}
