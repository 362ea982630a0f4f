// Host cost of the pointer checks of one routing call (issue 11, "Speed that needs no GPU").
//
// Before the registry, every pointer an op received was asked of the driver
// (cudaPointerGetAttributes): 9 calls for a mapped, recording eplb_route_topk. Now memory of a live
// eplb buffer (created or wrapped) is found in the registry and the driver is asked only for memory
// it does not know. This program runs the library's own check code (capi/registry.cpp, compiled in)
// both ways against a stub driver query that counts its calls, so it runs without a GPU; it then
// times whole CPU-stream ABI calls, and on a machine with a CUDA device the real driver query and
// whole CUDA-stream calls.
//
//   eplb_bench_pointer_checks [iterations]       prints Markdown tables
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "capi/registry.hpp"
#include "eplb/eplb.h"

#if EPLB_TESTS_WITH_CUDART
#include <cuda_runtime_api.h>
#endif

using eplb::capi::MemoryRange;
using eplb::capi::PointerAttributes;
using eplb::capi::Registry;
using eplb::capi::StreamPlace;

namespace {

std::atomic<uint64_t> g_queries{0};

// The stub driver: answers "device memory of device 0" (so the checks pass) and counts.
PointerAttributes stub_query(const void*) {
    g_queries.fetch_add(1, std::memory_order_relaxed);
    PointerAttributes a;
    a.ok = true;
    a.type = PointerAttributes::Type::Device;
    a.device = 0;
    return a;
}

struct Pointer {
    uintptr_t address;
    uint64_t bytes;
    uint64_t alignment;
    const char* name;
};

// Median over `rounds` of the mean ns per call of `iterations` calls.
double median_ns(int iterations, int rounds, const std::function<void()>& call) {
    std::vector<double> samples;
    for (int r = 0; r < rounds; ++r) {
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iterations; ++i) call();
        const auto stop = std::chrono::steady_clock::now();
        samples.push_back(std::chrono::duration<double, std::nano>(stop - start).count() / iterations);
    }
    std::sort(samples.begin(), samples.end());
    return samples[samples.size() / 2];
}

// The ranges of a DeepSeek-V3-sized EPLB setup: 58 layers of tables (log2phy, logcnt, counters,
// window rows), per-pass buffers, 256 KiB apart like separate allocations.
struct Model {
    static constexpr int kLayers = 58, kExperts = 256, kSlots = 288, kMaxReplicas = 4, kTopK = 8;
    int64_t tokens;
    std::vector<Pointer> call;  // the 9 pointers of one mapped, recording eplb_route_topk

    explicit Model(int64_t tokens_) : tokens(tokens_) {}

    void register_into(Registry& registry, uintptr_t base) {
        uintptr_t next = base;
        auto add = [&](uint64_t bytes) {
            const uintptr_t at = next;
            registry.add_buffer(nullptr, MemoryRange{at, bytes, EPLB_BACKEND_CUDA, 0, true});
            next += (bytes + (256u << 10) - 1) / (256u << 10) * (256u << 10);
            return at;
        };
        uintptr_t log2phy = 0, logcnt = 0, counters = 0;
        for (int layer = 0; layer < kLayers; ++layer) {
            const uintptr_t a = add(uint64_t(kExperts) * kMaxReplicas * 4), b = add(kExperts * 4), c = add(kSlots * 4);
            add(uint64_t(kSlots) * 1000 * 4);  // window rows
            if (layer == kLayers / 2) log2phy = a, logcnt = b, counters = c;
        }
        const uintptr_t logits = add(uint64_t(tokens) * kExperts * 4), bias = add(kExperts * 4);
        const uintptr_t ids = add(uint64_t(tokens) * kTopK * 4), weights = add(uint64_t(tokens) * kTopK * 4);
        const uintptr_t flag = add(4), unpadded = add(4);
        call = {{logits, uint64_t(tokens) * kExperts * 4, 4, "logits"},
                {bias, kExperts * 4, 4, "bias"},
                {ids, uint64_t(tokens) * kTopK * 4, 4, "topk_ids"},
                {weights, uint64_t(tokens) * kTopK * 4, 4, "topk_weights"},
                {log2phy, uint64_t(kExperts) * kMaxReplicas * 4, 4, "map->log2phy"},
                {logcnt, kExperts * 4, 4, "map->logcnt"},
                {counters, kSlots * 4, 4, "map->counters"},
                {flag, 4, 4, "map->record_flag"},
                {unpadded, 4, 4, "num_unpadded"}};
    }
};

void check_call(const Registry& registry, const std::vector<Pointer>& call) {
    const StreamPlace stream{EPLB_BACKEND_CUDA, 0};
    for (const Pointer& p : call)
        registry.check_pointer(stream, reinterpret_cast<const void*>(p.address), p.bytes, p.alignment, p.name, &stub_query);
}

// ns per call seen by each of `threads` threads checking the same call at once (median thread).
double ns_per_call_threads(const Registry& registry, const std::vector<Pointer>& call, int threads, int iterations) {
    std::vector<double> results(static_cast<size_t>(threads));
    std::vector<std::thread> pool;
    std::atomic<int> ready{0};
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            ++ready;
            while (ready.load() < threads) std::this_thread::yield();
            results[size_t(t)] = median_ns(iterations, 5, [&] { check_call(registry, call); });
        });
    }
    for (auto& thread : pool) thread.join();
    std::sort(results.begin(), results.end());
    return results[results.size() / 2];
}

void section_registry(int iterations) {
    // As many threads as cores, so they really run at once and share the registry's lock.
    const int threads = int(std::max(2u, std::thread::hardware_concurrency()));
    std::printf("\n### The checks of one eplb_route_topk call (9 pointers), stub driver\n\n");
    std::printf("| tokens | path | driver queries / call | ns / call (1 thread) | ns / call (%d threads at once) |\n",
                threads);
    std::printf("|---:|---|---:|---:|---:|\n");
    for (int64_t tokens : {1, 4096}) {
        Model model(tokens);
        Registry empty;   // before: nothing known, every pointer is asked of the driver
        Registry known;   // after: the model's buffers registered
        model.register_into(known, 0x7f0000000000);
        const std::vector<Pointer>& call = model.call;
        for (int mode = 0; mode < 2; ++mode) {
            const Registry& registry = mode == 0 ? empty : known;
            const uint64_t before = g_queries.load();
            check_call(registry, call);
            const uint64_t per_call = g_queries.load() - before;
            const double one = median_ns(iterations, 9, [&] { check_call(registry, call); });
            const double many = ns_per_call_threads(registry, call, threads, iterations);
            std::printf("| %lld | %s | %llu | %.0f | %.0f |\n", (long long)tokens,
                        mode == 0 ? "memory not registered: a driver query per pointer (stub, 0 ns each)"
                                  : "eplb buffers: registry lookup (233 ranges registered)",
                        (unsigned long long)per_call, one, many);
        }
    }
}

// Whole CPU-stream eplb_map_logical_to_physical calls (top-8, R = 288, recording): the handle
// lookup, every check and the op. Uses only functions every libeplb has, so the same binary can
// time an older library (LD_LIBRARY_PATH) for a before/after.
void section_abi_cpu(int iterations) {
    std::printf("\n### Whole eplb_map_logical_to_physical calls on a CPU stream (top-8, R = 288, recording)\n\n");
    std::printf("| tokens | memory | ns / call |\n|---:|---|---:|\n");
    const int32_t n = 256, r = 288, kmax = 4, k = 8;
    eplb_stream_t* stream = nullptr;
    if (eplb_stream_create(EPLB_BACKEND_CPU, &stream) != EPLB_STATUS_OK) std::exit(1);
    for (int64_t tokens : {1, 16, 128, 4096}) {
        std::vector<int32_t> log2phy(static_cast<size_t>(n) * kmax, -1), logcnt(static_cast<size_t>(n), 1);
        for (int32_t e = 0; e < n; ++e) log2phy[size_t(e) * kmax] = e;
        for (int32_t s = n; s < r; ++s) {
            const int32_t e = (s - n) * 7 % n;
            log2phy[size_t(e) * kmax + size_t(logcnt[size_t(e)]++)] = s;
        }
        std::vector<int32_t> ids(static_cast<size_t>(tokens) * k), out(ids.size()), counters(static_cast<size_t>(r), 0);
        for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 2654435761u) % n);
        std::vector<int32_t> flag = {1};
        const int calls = int(std::max<int64_t>(1, iterations / tokens));
        for (int registered = 0; registered < 2; ++registered) {
            std::vector<int32_t>* arrays[] = {&log2phy, &logcnt, &ids, &out, &counters, &flag};
            std::vector<eplb_buffer_t*> buffers;
            int32_t* at[6];
            for (int a = 0; a < 6; ++a) {
                at[a] = arrays[a]->data();
                if (registered) {
                    eplb_buffer_t* b = nullptr;
                    if (eplb_buffer_create(EPLB_BACKEND_CPU, arrays[a]->size() * 4, &b) != EPLB_STATUS_OK) std::exit(1);
                    eplb_buffer_write(b, 0, arrays[a]->data(), arrays[a]->size() * 4, nullptr);
                    eplb_buffer_info_t info{};
                    eplb_buffer_get_info(b, &info);
                    at[a] = static_cast<int32_t*>(info.data);
                    buffers.push_back(b);
                }
            }
            eplb_expert_map_t map{at[0], at[1], at[4], at[5], n, kmax, r, 0, 0, 0};
            const double ns = median_ns(calls, 9, [&] {
                if (eplb_map_logical_to_physical(stream, at[2], tokens, k, &map, nullptr, at[3]) != EPLB_STATUS_OK) std::exit(2);
            });
            std::printf("| %lld | %s | %.0f |\n", (long long)tokens,
                        registered ? "eplb buffers (registered)" : "caller memory (not registered)", ns);
            for (auto* b : buffers) eplb_buffer_destroy(b);
        }
    }
    eplb_stream_destroy(stream);
}

#if EPLB_TESTS_WITH_CUDART
void section_cuda(int iterations) {
    if (eplb_backend_available(EPLB_BACKEND_CUDA) != EPLB_STATUS_OK) {
        std::printf("\n(no CUDA device: the driver query and CUDA-stream calls are measured on a GPU machine)\n");
        return;
    }
    std::printf("\n### On the CUDA device\n\n| what | ns / call |\n|---|---:|\n");
    void* memory = nullptr;
    cudaMalloc(&memory, 1 << 20);
    cudaPointerAttributes attributes{};
    const double query = median_ns(iterations, 9, [&] { cudaPointerGetAttributes(&attributes, memory); });
    std::printf("| cudaPointerGetAttributes (device memory) | %.0f |\n", query);
    const int32_t n = 256, r = 288, kmax = 4, k = 8;
    eplb_stream_t* stream = nullptr;
    eplb_stream_create(EPLB_BACKEND_CUDA, &stream);
    char* base = static_cast<char*>(memory);
    std::vector<int32_t> host(size_t(n) * kmax, 0);
    for (int32_t e = 0; e < n; ++e) host[size_t(e) * kmax] = e;
    cudaMemcpy(base, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
    std::vector<int32_t> ones(size_t(n), 1);
    cudaMemcpy(base + 8192, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice);
    cudaMemset(base + 16384, 0, 4096);
    eplb_expert_map_t map{reinterpret_cast<int32_t*>(base), reinterpret_cast<int32_t*>(base + 8192),
                          reinterpret_cast<int32_t*>(base + 12288), reinterpret_cast<int32_t*>(base + 8192), n, kmax, r, 0, 0, 0};
    auto call = [&] {
        eplb_map_logical_to_physical(stream, reinterpret_cast<int32_t*>(base + 16384), 1, k, &map, nullptr,
                                     reinterpret_cast<int32_t*>(base + 20480));
    };
    const double unknown = median_ns(iterations, 9, call);
    eplb_buffer_t* wrap = nullptr;
    eplb_buffer_wrap(EPLB_BACKEND_CUDA, 0, memory, 1 << 20, &wrap);
    const double known = median_ns(iterations, 9, call);
    eplb_stream_synchronize(stream);
    std::printf("| eplb_map_logical_to_physical launch, memory not registered (6 driver queries) | %.0f |\n", unknown);
    std::printf("| eplb_map_logical_to_physical launch, memory wrapped (0 driver queries) | %.0f |\n", known);
    eplb_buffer_destroy(wrap);
    eplb_stream_destroy(stream);
    cudaFree(memory);
}
#endif

}  // namespace

int main(int argc, char** argv) {
    const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20000;
    std::printf("eplb_bench_pointer_checks: libeplb %s (ABI %u), %d iterations per sample, median of 9 samples\n",
                eplb_version_string(), eplb_abi_version(), iterations);
    section_registry(iterations);
    section_abi_cpu(iterations);
#if EPLB_TESTS_WITH_CUDART
    section_cuda(iterations / 10);
#endif
    return 0;
}
