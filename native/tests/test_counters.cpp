// Load counters (issue 13 §3): no increment lost when several threads record into one layer, and a
// counter at INT32_MAX saturates (EPLB_DEVICE_ERROR_COUNTER_OVERFLOW) instead of wrapping to a
// negative load, in the mapping, both routing kernels and the window push, on CPU and CUDA alike.
#include <atomic>
#include <climits>
#include <thread>

#include "test_util.hpp"

using namespace eplb::test;

namespace {

eplb_router_config_t sigmoid_config(int32_t n, int32_t k) {
    eplb_router_config_t c{};
    c.num_experts = n;
    c.top_k = k;
    c.score = EPLB_ROUTING_SCORE_SIGMOID;
    c.num_groups = 1;
    c.topk_groups = 1;
    c.renormalize = 1;
    return c;
}

// The tables and counters of one layer, on a backend, shared by the threads of a test.
struct Layer {
    Tables tables;
    Buffer<int32_t> log2phy, logcnt, counters, flag;
    eplb_expert_map_t map{};

    Layer(eplb_backend_t backend, const Tables& t, const std::vector<int32_t>& start)
        : tables(t), log2phy(backend, t.log2phy), logcnt(backend, t.logcnt), counters(backend, start),
          flag(backend, std::vector<int32_t>{1}) {
        map = eplb_expert_map_t{log2phy.data(), logcnt.data(), counters.data(), flag.data(), t.num_logical,
                                t.max_replicas, t.num_physical, EPLB_REPLICA_SELECTION_TOKEN_HASH, 0, 0};
    }
};

uint32_t take_flags(eplb_stream_t* stream) {
    uint32_t flags = 0;
    const eplb_status_t status = eplb_stream_check_device_errors(stream, &flags);
    if ((status == EPLB_STATUS_OK) != (flags == 0)) EPLB_FAIL("status " << status << " with flags " << flags);
    return flags;
}

}  // namespace

EPLB_TEST(counters_cpu_lose_nothing_with_8_threads_on_one_layer) {
    // 8 threads, each with its own stream, map and route into the same layer's counters at once.
    constexpr int kThreads = 8;
    const int32_t n = 256, r = 288, top_k = 8;
    const int64_t tokens = 1024;
    const int calls = 12;
    const Tables t = random_tables(n, r);
    Layer layer(EPLB_BACKEND_CPU, t, std::vector<int32_t>(size_t(r), 0));
    std::vector<std::vector<int32_t>> ids(kThreads), logits_ids(kThreads);
    std::vector<std::vector<float>> logits(kThreads);
    for (int i = 0; i < kThreads; ++i) {
        ids[size_t(i)].resize(size_t(tokens) * top_k);
        for (auto& id : ids[size_t(i)]) id = int32_t(rng()() % uint64_t(n));
        logits[size_t(i)].resize(size_t(tokens) * n);
        for (auto& x : logits[size_t(i)]) x = float(int64_t(rng()() % 20001) - 10000) / 1000.0f;
    }
    // Every routed slot, bincounted afterwards: the counters must equal it exactly.
    std::vector<std::vector<int32_t>> routed(kThreads);
    std::atomic<int> errors{0};
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; ++i) {
        threads.emplace_back([&, i] {
            eplb_stream_t* stream = nullptr;
            if (eplb_stream_create(EPLB_BACKEND_CPU, &stream) != EPLB_STATUS_OK) ++errors;
            const eplb_router_config_t config = sigmoid_config(n, top_k);
            std::vector<int32_t> out(size_t(tokens) * top_k);
            std::vector<float> weights(out.size());
            ++ready;
            while (ready.load() < kThreads) std::this_thread::yield();
            for (int call = 0; call < calls; ++call) {
                // Alternate the mapping op and the routing kernel: both record through the same epilogue rule.
                const eplb_status_t status =
                    call % 3 == 2 ? eplb_route_topk(stream, &config, logits[size_t(i)].data(), nullptr, tokens, &layer.map,
                                                    nullptr, out.data(), weights.data())
                                  : eplb_map_logical_to_physical(stream, ids[size_t(i)].data(), tokens, top_k, &layer.map,
                                                                 nullptr, out.data());
                if (status != EPLB_STATUS_OK) ++errors;
                routed[size_t(i)].insert(routed[size_t(i)].end(), out.begin(), out.end());
            }
            uint32_t flags = 0;
            if (eplb_stream_check_device_errors(stream, &flags) != EPLB_STATUS_OK || flags != 0) ++errors;
            eplb_stream_destroy(stream);
        });
    }
    for (auto& thread : threads) thread.join();
    EPLB_EXPECT_EQ(errors.load(), 0);
    std::vector<int32_t> bincount(size_t(r), 0);
    int64_t total = 0;
    for (const auto& slots : routed) {
        for (int32_t slot : slots) {
            EPLB_EXPECT(slot >= 0 && slot < r);
            ++bincount[size_t(slot)];
            ++total;
        }
    }
    EPLB_EXPECT_EQ(total, int64_t(kThreads) * calls * tokens * top_k);
    const auto counters = layer.counters.read();
    int64_t counted = 0;
    for (int32_t c : counters) counted += c;
    EPLB_EXPECT_EQ(counted, total);
    EPLB_EXPECT(counters == bincount);
}

namespace {

// Maps `hits` tokens onto slot 0 of a layer whose counters start at `start`; returns counters and flags.
std::pair<std::vector<int32_t>, uint32_t> map_onto_slot0(eplb_backend_t backend, const std::vector<int32_t>& start,
                                                         int64_t hits) {
    const int32_t r = int32_t(start.size());
    std::vector<int32_t> phy2log(static_cast<size_t>(r));
    for (int32_t s = 0; s < r; ++s) phy2log[size_t(s)] = s;  // one replica each: expert e -> slot e
    const Tables t = tables_from_phy2log(phy2log, r);
    Layer layer(backend, t, start);
    Stream stream(backend);
    std::vector<int32_t> ids(size_t(hits) * 2);
    for (int64_t i = 0; i < hits; ++i) {
        ids[size_t(2 * i)] = 0;
        ids[size_t(2 * i + 1)] = 1 + int32_t(i % (r - 1));
    }
    Buffer<int32_t> ids_buffer(backend, ids);
    Buffer<int32_t> out(backend, ids.size());
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids_buffer.data(), hits, 2, &layer.map, nullptr, out.data()));
    const uint32_t flags = take_flags(stream.get());
    return {layer.counters.read(), flags};
}

}  // namespace

EPLB_TEST(counters_cpu_saturate_at_int32_max_and_flag_it) {
    for (int32_t start0 : {INT32_MAX - 3, INT32_MAX, -5, INT32_MIN}) {
        std::vector<int32_t> start(17, 0);
        start[0] = start0;
        start[5] = INT32_MAX - 1000;  // near the edge, not over it
        const int64_t hits = 64;
        const auto [counters, flags] = map_onto_slot0(EPLB_BACKEND_CPU, start, hits);
        EPLB_EXPECT_EQ(counters[0], INT32_MAX);
        EPLB_EXPECT_EQ(flags, uint32_t(EPLB_DEVICE_ERROR_COUNTER_OVERFLOW));
        for (int32_t s = 1; s < 17; ++s) {
            const int64_t want = int64_t(start[size_t(s)]) + hits / 16 + (s <= hits % 16 ? 1 : 0);
            EPLB_EXPECT_EQ(int64_t(counters[size_t(s)]), want);
        }
    }
    // Reaching INT32_MAX exactly is not an overflow.
    std::vector<int32_t> start(17, 0);
    start[0] = INT32_MAX - 64;
    const auto [counters, flags] = map_onto_slot0(EPLB_BACKEND_CPU, start, 64);
    EPLB_EXPECT_EQ(counters[0], INT32_MAX);
    EPLB_EXPECT_EQ(flags, 0u);
}

EPLB_TEST(counters_cpu_saturate_in_both_routing_kernels) {
    // Every row picks expert 0 first (largest logit), whose only slot starts near INT32_MAX.
    const int32_t n = 8, k = 2;
    const int64_t tokens = 50;
    std::vector<int32_t> phy2log(static_cast<size_t>(n));
    for (int32_t s = 0; s < n; ++s) phy2log[size_t(s)] = s;
    const Tables t = tables_from_phy2log(phy2log, n);
    std::vector<float> logits(size_t(tokens) * n, -1.0f);
    for (int64_t row = 0; row < tokens; ++row) logits[size_t(row * n)] = 5.0f;
    std::vector<int32_t> start(size_t(n), 0);
    start[0] = INT32_MAX - 10;
    for (bool hash : {false, true}) {
        Layer layer(EPLB_BACKEND_CPU, t, start);
        Stream stream(EPLB_BACKEND_CPU);
        Buffer<float> logits_buffer(EPLB_BACKEND_CPU, logits);
        Buffer<int32_t> ids(EPLB_BACKEND_CPU, size_t(tokens) * k);
        Buffer<float> weights(EPLB_BACKEND_CPU, size_t(tokens) * k);
        const eplb_router_config_t config = sigmoid_config(n, k);
        if (hash) {
            Buffer<int64_t> token_ids(EPLB_BACKEND_CPU, std::vector<int64_t>(size_t(tokens), 1));
            Buffer<int32_t> tid2eid(EPLB_BACKEND_CPU, std::vector<int32_t>{3, 4, 0, 7});  // token 1 -> experts 0, 7
            EPLB_EXPECT_OK(eplb_route_hash(stream.get(), &config, logits_buffer.data(), token_ids.data(), tid2eid.data(), 2,
                                           tokens, &layer.map, nullptr, ids.data(), weights.data()));
        } else {
            EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &config, logits_buffer.data(), nullptr, tokens, &layer.map,
                                           nullptr, ids.data(), weights.data()));
        }
        EPLB_EXPECT_EQ(take_flags(stream.get()), uint32_t(EPLB_DEVICE_ERROR_COUNTER_OVERFLOW));
        const auto counters = layer.counters.read();
        EPLB_EXPECT_EQ(counters[0], INT32_MAX);
        EPLB_EXPECT(std::all_of(counters.begin(), counters.end(), [](int32_t c) { return c >= 0; }));
        EPLB_EXPECT_EQ(std::accumulate(counters.begin() + 1, counters.end(), int64_t(0)), int64_t(tokens));
        // The flag is cleared by the check.
        EPLB_EXPECT_EQ(take_flags(stream.get()), 0u);
    }
}

EPLB_TEST(counters_cpu_saturate_under_concurrent_overflow) {
    // 8 threads push one counter far past INT32_MAX at once: it ends at INT32_MAX, never negative.
    const std::vector<int32_t> start = {INT32_MAX - 1000, 0};
    std::vector<int32_t> phy2log = {0, 1};
    const Tables t = tables_from_phy2log(phy2log, 2);
    Layer layer(EPLB_BACKEND_CPU, t, start);
    std::vector<int32_t> ids(4096, 0);
    std::atomic<uint32_t> flags{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < 8; ++i) {
        threads.emplace_back([&] {
            eplb_stream_t* stream = nullptr;
            eplb_stream_create(EPLB_BACKEND_CPU, &stream);
            std::vector<int32_t> out(ids.size());
            for (int call = 0; call < 20; ++call)
                eplb_map_logical_to_physical(stream, ids.data(), int64_t(ids.size()), 1, &layer.map, nullptr, out.data());
            uint32_t mine = 0;
            eplb_stream_check_device_errors(stream, &mine);
            flags |= mine;
            eplb_stream_destroy(stream);
        });
    }
    for (auto& thread : threads) thread.join();
    EPLB_EXPECT_EQ(layer.counters.read()[0], INT32_MAX);
    EPLB_EXPECT_EQ(flags.load(), uint32_t(EPLB_DEVICE_ERROR_COUNTER_OVERFLOW));
}

namespace {

// Pushes passes (possibly negative values) through a 2-slot window; returns {window, sums, flags}.
struct Pushed {
    std::vector<int32_t> window;
    std::vector<int64_t> sums;
    std::vector<int32_t> pass_after;
    uint32_t flags;
};

Pushed push_passes(eplb_backend_t backend, const std::vector<std::vector<int32_t>>& passes) {
    const int64_t count = int64_t(passes[0].size());
    Stream stream(backend);
    Buffer<int32_t> pass(backend, size_t(count));
    Buffer<int32_t> window(backend, std::vector<int32_t>(size_t(count) * 2, 0));
    Buffer<int64_t> sums(backend, std::vector<int64_t>(size_t(count), 0));
    uint32_t flags = 0;
    for (size_t p = 0; p < passes.size(); ++p) {
        pass.write(passes[p]);
        EPLB_EXPECT_OK(eplb_load_window_push(stream.get(), pass.data(), window.data(), sums.data(), count, 2, int32_t(p % 2)));
        flags |= take_flags(stream.get());
    }
    return {window.read(), sums.read(), pass.read(), flags};
}

}  // namespace

EPLB_TEST(window_push_records_wrapped_counters_as_saturated_cpu) {
    // A pass counter that wrapped (negative) enters the window as INT32_MAX: no negative load, no
    // negative sum, the flag raised; the pass counters restart at 0.
    const std::vector<std::vector<int32_t>> passes = {{5, -1, INT32_MIN, 7}, {INT32_MAX, -100, 3, 0}, {1, 2, 3, 4}};
    const Pushed got = push_passes(EPLB_BACKEND_CPU, passes);
    EPLB_EXPECT_EQ(got.flags, uint32_t(EPLB_DEVICE_ERROR_COUNTER_OVERFLOW));
    const std::vector<int32_t> want_window = {1, 2, 3, 4, INT32_MAX, INT32_MAX, 3, 0};  // slot 0 = pass 3, slot 1 = pass 2
    EPLB_EXPECT(got.window == want_window);
    const std::vector<int64_t> want_sums = {int64_t(INT32_MAX) + 1, int64_t(INT32_MAX) + 2, 6, 4};
    EPLB_EXPECT(got.sums == want_sums);
    EPLB_EXPECT(got.pass_after == (std::vector<int32_t>{0, 0, 0, 0}));
    // Clean passes raise nothing.
    EPLB_EXPECT_EQ(push_passes(EPLB_BACKEND_CPU, {{0, 1}, {INT32_MAX, 2}}).flags, 0u);
}

EPLB_TEST(counters_cuda_saturate_like_the_cpu) {
    require_cuda();
    // Both kernels' record paths: the per-block shared histogram (R <= 8192) and direct global
    // atomics (R > 8192).
    for (int32_t r : {17, 9000}) {
        for (int32_t start0 : {INT32_MAX - 3, INT32_MAX - 64, -5}) {
            std::vector<int32_t> start(size_t(r), 0);
            start[0] = start0;
            start[5] = INT32_MAX - 1000;
            const auto want = map_onto_slot0(EPLB_BACKEND_CPU, start, 5000);
            const auto got = map_onto_slot0(EPLB_BACKEND_CUDA, start, 5000);
            EPLB_EXPECT(got.first == want.first);
            EPLB_EXPECT_EQ(got.second, want.second);
        }
    }
    const std::vector<std::vector<int32_t>> passes = {{5, -1, INT32_MIN, 7}, {INT32_MAX, -100, 3, 0}, {1, 2, 3, 4}};
    const Pushed want = push_passes(EPLB_BACKEND_CPU, passes);
    const Pushed got = push_passes(EPLB_BACKEND_CUDA, passes);
    EPLB_EXPECT(got.window == want.window);
    EPLB_EXPECT(got.sums == want.sums);
    EPLB_EXPECT_EQ(got.flags, want.flags);
}
