// Tests of eplb_map_logical_to_physical through the public ABI: goldens from docs/design.md §4.3 on the CPU
// backend, bad input, and CUDA == CPU bit for bit (skipped without a device).
#include "test_util.hpp"

using namespace eplb::test;

namespace {

// The formula of docs/design.md §4.3 written out independently of the library (64-bit arithmetic, explicit
// mod 2^32), used as the oracle for random inputs.
std::vector<int32_t> oracle(const std::vector<int32_t>& ids, int64_t num_tokens, int32_t top_k, const Tables& t,
                            int64_t num_unpadded, bool record, std::vector<int32_t>& counters) {
    std::vector<int32_t> out(ids.size());
    for (int64_t row = 0; row < num_tokens; ++row) {
        for (int32_t k = 0; k < top_k; ++k) {
            const int32_t id = ids[size_t(row * top_k + k)];
            int32_t phys = -1;
            if (row < num_unpadded && id >= 0 && id < t.num_logical) {
                const uint64_t hashed = (uint64_t(row) * 2654435769ull) % 4294967296ull;
                const int32_t replica = int32_t(hashed % uint64_t(t.logcnt[id]));
                phys = t.log2phy[size_t(id) * t.max_replicas + replica];
            }
            out[size_t(row * top_k + k)] = phys;
            if (record && phys >= 0) ++counters[phys];
        }
    }
    return out;
}

struct MapCall {
    eplb_backend_t backend;
    const Tables& tables;
    std::vector<int32_t> ids;
    int64_t num_tokens;
    int32_t top_k;
    int32_t num_unpadded;  // < 0: pass NULL
    int32_t record;        // < 0: pass NULL flag
    int32_t selection = EPLB_REPLICA_SELECTION_TOKEN_HASH;

    // Runs the op with poisoned outputs and zeroed counters; returns {physical ids, counters}.
    std::pair<std::vector<int32_t>, std::vector<int32_t>> run() const {
        Stream stream(backend);
        Buffer<int32_t> topk(backend, ids.empty() ? std::vector<int32_t>{0} : ids);
        Buffer<int32_t> log2phy(backend, tables.log2phy);
        Buffer<int32_t> logcnt(backend, tables.logcnt);
        Buffer<int32_t> counters(backend, std::vector<int32_t>(size_t(tables.num_physical), 0));
        Buffer<int32_t> flag(backend, std::vector<int32_t>{record < 0 ? 0 : record});
        Buffer<int32_t> unpadded(backend, std::vector<int32_t>{num_unpadded});
        Buffer<int32_t> out(backend, std::max<size_t>(ids.size(), 1));
        out.poison();
        eplb_expert_map_t map{};
        map.log2phy = log2phy.data();
        map.logcnt = logcnt.data();
        map.counters = counters.data();
        map.record_flag = record < 0 ? nullptr : flag.data();
        map.num_logical = tables.num_logical;
        map.max_replicas = tables.max_replicas;
        map.num_physical = tables.num_physical;
        map.replica_selection = selection;
        EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), topk.data(), num_tokens, top_k, &map,
                                                    num_unpadded < 0 ? nullptr : unpadded.data(), out.data()));
        EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
        auto result = out.read();
        result.resize(ids.size());
        return {result, counters.read()};
    }
};

}  // namespace

EPLB_TEST(mapping_golden_token_hash) {
    // Expert 0 has replicas in slots {0, 4, 5}; expert 1 in {1, 6}; experts 2, 3 once.
    const Tables t = tables_from_phy2log({0, 1, 2, 3, 0, 0, 1}, 4);
    EPLB_EXPECT_EQ(t.logcnt[0], 3);
    // (row * 2654435769) mod 2^32 for rows 0..7 is 0, 2654435769, 1013904242, 3668340011,
    // 2027808484, 387276957, 3041712726, 1401181199: mod 3 -> 0,0,2,2,1,0,0,2; mod 2 -> 0,1,0,1,0,1,0,1.
    std::vector<int32_t> ids;
    for (int row = 0; row < 8; ++row) {
        ids.push_back(0);
        ids.push_back(1);
    }
    MapCall call{EPLB_BACKEND_CPU, t, ids, 8, 2, -1, 1};
    const auto [phys, counters] = call.run();
    const int32_t expert0[8] = {0, 0, 5, 5, 4, 0, 0, 5};
    const int32_t expert1[8] = {1, 6, 1, 6, 1, 6, 1, 6};
    for (int row = 0; row < 8; ++row) {
        EPLB_EXPECT_EQ(phys[row * 2 + 0], expert0[row]);
        EPLB_EXPECT_EQ(phys[row * 2 + 1], expert1[row]);
    }
    // Every k of a row picks the same replica index (a function of the row only).
    EPLB_EXPECT_EQ(counters[0], 4);
    EPLB_EXPECT_EQ(counters[4], 1);
    EPLB_EXPECT_EQ(counters[5], 3);
    EPLB_EXPECT_EQ(counters[1], 4);
    EPLB_EXPECT_EQ(counters[6], 4);
    EPLB_EXPECT_EQ(counters[2] + counters[3], 0);
}

EPLB_TEST(mapping_invalid_ids_and_padding) {
    const Tables t = tables_from_phy2log({0, 1, 2, 0}, 3);
    // Row 0: valid, -1, N; row 1: a large id, -7, valid; rows 2-3 are padding.
    const std::vector<int32_t> ids = {2, -1, 3, 1000000, -7, 1, 0, 1, 2, 2, 2, 2};
    MapCall call{EPLB_BACKEND_CPU, t, ids, 4, 3, 2, 1};
    const auto [phys, counters] = call.run();
    const std::vector<int32_t> want = {2, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1};
    for (size_t i = 0; i < want.size(); ++i) EPLB_EXPECT_EQ(phys[i], want[i]);
    EPLB_EXPECT_EQ(std::accumulate(counters.begin(), counters.end(), 0), 2);
    EPLB_EXPECT_EQ(counters[2], 1);
    EPLB_EXPECT_EQ(counters[1], 1);
}

EPLB_TEST(mapping_record_flag_off_and_null) {
    const Tables t = random_tables(16, 24);
    std::vector<int32_t> ids(40 * 4);
    for (auto& id : ids) id = int32_t(rng()() % 16);
    for (int32_t record : {0, -1}) {
        MapCall call{EPLB_BACKEND_CPU, t, ids, 40, 4, -1, record};
        const auto [phys, counters] = call.run();
        EPLB_EXPECT_EQ(std::count(counters.begin(), counters.end(), 0), long(t.num_physical));
        EPLB_EXPECT_EQ(std::count(phys.begin(), phys.end(), -1), 0L);
    }
}

EPLB_TEST(mapping_counters_equal_bincount_random) {
    for (int iteration = 0; iteration < 50; ++iteration) {
        const int32_t n = 1 + int32_t(rng()() % 300);
        const int32_t r = n + int32_t(rng()() % 40);
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = int64_t(rng()() % 300);
        const int32_t unpadded = tokens == 0 ? 0 : int32_t(rng()() % (tokens + 5));
        const Tables t = random_tables(n, r, int32_t(rng()() % 3));
        std::vector<int32_t> ids(size_t(tokens) * top_k);
        for (auto& id : ids) id = int32_t(rng()() % uint64_t(n + 3)) - 1;  // includes -1 and >= N
        MapCall call{EPLB_BACKEND_CPU, t, ids, tokens, top_k, unpadded, 1};
        const auto [phys, counters] = call.run();
        std::vector<int32_t> want_counters(size_t(r), 0);
        const auto want = oracle(ids, tokens, top_k, t, std::min<int64_t>(unpadded, tokens), true, want_counters);
        for (size_t i = 0; i < want.size(); ++i) EPLB_EXPECT_EQ(phys[i], want[i]);
        // Counters are exactly the bincount of the valid physical ids.
        std::vector<int32_t> bincount(size_t(r), 0);
        for (int32_t p : phys)
            if (p >= 0) ++bincount[p];
        EPLB_EXPECT(counters == bincount);
        EPLB_EXPECT(counters == want_counters);
        // Every physical id holds the logical expert it came from.
        for (size_t i = 0; i < phys.size(); ++i)
            if (phys[i] >= 0) EPLB_EXPECT_EQ(t.phy2log[phys[i]], ids[i]);
    }
}

EPLB_TEST(mapping_in_place) {
    const Tables t = random_tables(32, 40);
    std::vector<int32_t> ids(64 * 8);
    for (auto& id : ids) id = int32_t(rng()() % 32);
    Stream stream(EPLB_BACKEND_CPU);
    Buffer<int32_t> buffer(EPLB_BACKEND_CPU, ids);
    Buffer<int32_t> log2phy(EPLB_BACKEND_CPU, t.log2phy);
    Buffer<int32_t> logcnt(EPLB_BACKEND_CPU, t.logcnt);
    eplb_expert_map_t map{log2phy.data(), logcnt.data(), nullptr, nullptr, 32, t.max_replicas, 40, 0, 0, 0};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), buffer.data(), 64, 8, &map, nullptr, buffer.data()));
    std::vector<int32_t> unused(40, 0);
    EPLB_EXPECT(buffer.read() == oracle(ids, 64, 8, t, 64, false, unused));
}

EPLB_TEST(mapping_round_robin_selection) {
    const Tables t = tables_from_phy2log({0, 1, 0, 0}, 2);  // expert 0 in {0, 2, 3}
    MapCall call{EPLB_BACKEND_CPU, t, {0, 0, 0, 0, 0, 0}, 3, 2, -1, 1, EPLB_REPLICA_SELECTION_ROUND_ROBIN};
    const auto [phys, counters] = call.run();
    // Positions 0..5 mod 3 -> replicas 0,1,2,0,1,2 -> slots 0,2,3,0,2,3.
    const std::vector<int32_t> want = {0, 2, 3, 0, 2, 3};
    EPLB_EXPECT(phys == want);
    EPLB_EXPECT_EQ(counters[0], 2);
}

EPLB_TEST(mapping_bad_input_leaves_outputs_untouched) {
    Stream stream(EPLB_BACKEND_CPU);
    const Tables t = tables_from_phy2log({0, 1, 2, 0}, 3);
    std::vector<int32_t> ids = {0, 1, 2, 0};
    std::vector<int32_t> out(4, 12345);
    std::vector<int32_t> counters(4, 7);
    const int32_t on = 1;
    auto map_of = [&](const Tables& tables) {
        return eplb_expert_map_t{tables.log2phy.data(), tables.logcnt.data(), counters.data(), &on,
                                 tables.num_logical, tables.max_replicas, tables.num_physical, 0, 0, 0};
    };
    eplb_expert_map_t map = map_of(t);
    auto expect_untouched = [&] {
        EPLB_EXPECT(std::all_of(out.begin(), out.end(), [](int32_t v) { return v == 12345; }));
        EPLB_EXPECT(std::all_of(counters.begin(), counters.end(), [](int32_t v) { return v == 7; }));
    };
    // NULL pointers, negative sizes, wrong top_k.
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(nullptr, ids.data(), 2, 2, &map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), nullptr, 2, 2, &map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("topk_ids") != std::string::npos);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 2, &map, nullptr, nullptr),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), -1, 2, &map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("num_tokens") != std::string::npos);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 0, &map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 2, nullptr, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    expect_untouched();
    // Kmax smaller than the largest replica count.
    Tables narrow = t;
    narrow.max_replicas = 1;
    narrow.log2phy = {0, 1, 2};
    eplb_expert_map_t narrow_map = map_of(narrow);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 2, &narrow_map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("logcnt[0] = 2") != std::string::npos);
    // A table entry outside [0, R).
    Tables broken = t;
    broken.log2phy[1] = 9;
    eplb_expert_map_t broken_map = map_of(broken);
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 2, &broken_map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("= 9") != std::string::npos);
    // A record flag without counters.
    eplb_expert_map_t no_counters = map;
    no_counters.counters = nullptr;
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 2, &no_counters, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    // Unknown replica selection.
    eplb_expert_map_t bad_selection = map;
    bad_selection.replica_selection = 7;
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 2, 2, &bad_selection, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    expect_untouched();
}

// CUDA == CPU bit for bit on random inputs and on rows drawn from the real load files.
EPLB_TEST(mapping_cuda_matches_cpu_random) {
    require_cuda();
    for (int iteration = 0; iteration < 40; ++iteration) {
        const int32_t n = 1 + int32_t(rng()() % 400);
        const int32_t r = n + int32_t(rng()() % 130);
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = iteration == 0 ? 1 : int64_t(rng()() % 20000);
        const int32_t unpadded = int32_t(rng()() % (tokens + 3));
        const Tables t = random_tables(n, r, int32_t(rng()() % 3));
        std::vector<int32_t> ids(size_t(tokens) * top_k);
        for (auto& id : ids) id = int32_t(rng()() % uint64_t(n + 2)) - 1;
        for (int32_t selection : {0, 1}) {
            MapCall cpu{EPLB_BACKEND_CPU, t, ids, tokens, top_k, unpadded, 1, selection};
            MapCall gpu{EPLB_BACKEND_CUDA, t, ids, tokens, top_k, unpadded, 1, selection};
            const auto want = cpu.run();
            const auto got = gpu.run();
            EPLB_EXPECT(got.first == want.first);
            EPLB_EXPECT(got.second == want.second);
        }
    }
}

EPLB_TEST(mapping_cuda_matches_cpu_real_loads) {
    require_cuda();
    for (const auto& name : {std::string("decode_in1000out1000"), std::string("prefill_in4096")}) {
        const auto rows = read_load_file(name);
        for (int layer : {3, 30, 60}) {
            // A locality-like placement: 256 experts + 32 redundant copies of the hottest ones.
            std::vector<int32_t> order(256);
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(), [&](int a, int b) { return rows[layer][a] > rows[layer][b]; });
            std::vector<int32_t> phy2log(288);
            for (int s = 0; s < 256; ++s) phy2log[s] = s;
            for (int s = 256; s < 288; ++s) phy2log[s] = order[(s - 256) % 16];
            std::shuffle(phy2log.begin(), phy2log.end(), rng());
            const Tables t = tables_from_phy2log(phy2log, 256, 8);
            const auto ids = sample_topk(rows[layer], 4096, 8);
            MapCall cpu{EPLB_BACKEND_CPU, t, ids, 4096, 8, 4000, 1};
            MapCall gpu{EPLB_BACKEND_CUDA, t, ids, 4096, 8, 4000, 1};
            const auto want = cpu.run();
            const auto got = gpu.run();
            EPLB_EXPECT(got.first == want.first);
            EPLB_EXPECT(got.second == want.second);
        }
    }
}

EPLB_TEST(mapping_cuda_bad_table_sets_device_flag) {
    require_cuda();
    Tables t = tables_from_phy2log({0, 1, 2, 0}, 3);
    t.log2phy[1] = 99;  // expert 0, replica 1 -> out of range
    Stream stream(EPLB_BACKEND_CUDA);
    Buffer<int32_t> ids(EPLB_BACKEND_CUDA, std::vector<int32_t>{0, 0, 0, 0});
    Buffer<int32_t> log2phy(EPLB_BACKEND_CUDA, t.log2phy);
    Buffer<int32_t> logcnt(EPLB_BACKEND_CUDA, t.logcnt);
    Buffer<int32_t> counters(EPLB_BACKEND_CUDA, std::vector<int32_t>(4, 0));
    Buffer<int32_t> flag(EPLB_BACKEND_CUDA, std::vector<int32_t>{1});
    Buffer<int32_t> out(EPLB_BACKEND_CUDA, 4);
    out.poison();
    eplb_expert_map_t map{log2phy.data(), logcnt.data(), counters.data(), flag.data(), 3, t.max_replicas, 4, 0, 0, 0};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids.data(), 4, 1, &map, nullptr, out.data()));
    uint32_t flags = 0;
    EPLB_EXPECT_STATUS(eplb_stream_check_device_errors(stream.get(), &flags), EPLB_STATUS_DEVICE_INPUT_ERROR);
    EPLB_EXPECT_EQ(flags, uint32_t(EPLB_DEVICE_ERROR_BAD_TABLE));
    // Rows 1 and 3 hash to replica 1 (the broken entry) -> -1; rows 0, 2 use replica 0 -> slot 0.
    const std::vector<int32_t> want = {0, -1, 0, -1};
    EPLB_EXPECT(out.read() == want);
    EPLB_EXPECT_EQ(counters.read()[0], 2);
    // The word is cleared by the check.
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), &flags));
    EPLB_EXPECT_EQ(flags, 0u);
}

EPLB_TEST(mapping_cuda_rejects_host_pointers) {
    require_cuda();
    const Tables t = tables_from_phy2log({0, 1}, 2);
    Stream stream(EPLB_BACKEND_CUDA);
    std::vector<int32_t> host_ids = {0, 1};
    Buffer<int32_t> log2phy(EPLB_BACKEND_CUDA, t.log2phy);
    Buffer<int32_t> logcnt(EPLB_BACKEND_CUDA, t.logcnt);
    Buffer<int32_t> out(EPLB_BACKEND_CUDA, 2);
    eplb_expert_map_t map{log2phy.data(), logcnt.data(), nullptr, nullptr, 2, 1, 2, 0, 0, 0};
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), host_ids.data(), 2, 1, &map, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("host memory") != std::string::npos);
}
