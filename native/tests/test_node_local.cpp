// Node-local replica selection (issue 15 §3, EPLB_REPLICA_SELECTION_NODE_LOCAL): goldens by hand,
// properties on random tables against an oracle written from the header's words, the real load
// files, bad configurations, the routing kernels' epilogue, and CUDA == CPU (skipped without a device).
#include "test_util.hpp"

using namespace eplb::test;

namespace {

uint32_t token_hash(int64_t row) { return uint32_t((uint64_t(row) * 2654435769ull) % 4294967296ull); }

// The header's rule, written out independently: the local replicas of `id` are its first logcnt
// log2phy entries with slot / (R / nodes) == source_node, in table order.
int32_t oracle_slot(const Tables& t, int32_t id, int64_t row, int32_t nodes, int32_t source_node) {
    if (id < 0 || id >= t.num_logical) return -1;
    const int32_t per_node = t.num_physical / nodes;
    std::vector<int32_t> all, local;
    for (int32_t r = 0; r < t.logcnt[size_t(id)]; ++r) {
        const int32_t slot = t.log2phy[size_t(id) * t.max_replicas + r];
        all.push_back(slot);
        if (slot / per_node == source_node) local.push_back(slot);
    }
    const uint64_t h = token_hash(row);
    return local.empty() ? all[h % all.size()] : local[h % local.size()];
}

// Runs the mapping op with NODE_LOCAL on a backend; returns {physical ids, counters}.
std::pair<std::vector<int32_t>, std::vector<int32_t>> map_node_local(eplb_backend_t backend, const Tables& t,
                                                                     const std::vector<int32_t>& ids, int64_t tokens,
                                                                     int32_t top_k, int32_t nodes, int32_t source_node) {
    Stream stream(backend);
    Buffer<int32_t> topk(backend, ids.empty() ? std::vector<int32_t>{0} : ids);
    Buffer<int32_t> log2phy(backend, t.log2phy), logcnt(backend, t.logcnt);
    Buffer<int32_t> counters(backend, std::vector<int32_t>(size_t(t.num_physical), 0));
    Buffer<int32_t> flag(backend, std::vector<int32_t>{1});
    Buffer<int32_t> out(backend, std::max<size_t>(ids.size(), 1));
    out.poison();
    const eplb_expert_map_t map{log2phy.data(),  logcnt.data(),  counters.data(),
                                flag.data(),     t.num_logical,  t.max_replicas,
                                t.num_physical,  EPLB_REPLICA_SELECTION_NODE_LOCAL, nodes, source_node};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), topk.data(), tokens, top_k, &map, nullptr, out.data()));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    auto result = out.read();
    result.resize(ids.size());
    return {result, counters.read()};
}

// A random placement over nodes * per_node slots with every expert at least once.
Tables random_node_tables(int32_t n, int32_t nodes, int32_t per_node) {
    const int32_t r = nodes * per_node;
    std::vector<int32_t> phy2log(static_cast<size_t>(r));
    for (int32_t s = 0; s < r; ++s) phy2log[size_t(s)] = s < n ? s : int32_t(rng()() % uint64_t(n));
    std::shuffle(phy2log.begin(), phy2log.end(), rng());
    return tables_from_phy2log(phy2log, n, 0);
}

}  // namespace

EPLB_TEST(node_local_golden) {
    // 8 slots on 2 nodes (0-3, 4-7). Expert 0 in {0, 4, 5}, 1 in {1, 6}, 2 in {2}, 3 in {3}, 4 in {7}.
    // (row * 2654435769) mod 2^32 for rows 0..5, mod 2: 0,1,0,1,0,1; mod 3: 0,0,2,2,1,0.
    const Tables t = tables_from_phy2log({0, 1, 2, 3, 0, 0, 1, 4}, 5);
    std::vector<int32_t> ids;
    for (int row = 0; row < 6; ++row)
        for (int32_t e : {0, 1, 2, 4}) ids.push_back(e);
    // From node 1: expert 0 -> local {4, 5} by h mod 2; 1 -> {6}; 2 -> no local replica: TokenHash
    // over {2}; 4 -> {7}.
    const auto [from1, counters1] = map_node_local(EPLB_BACKEND_CPU, t, ids, 6, 4, 2, 1);
    const std::vector<int32_t> want1 = {4, 6, 2, 7, 5, 6, 2, 7, 4, 6, 2, 7, 5, 6, 2, 7, 4, 6, 2, 7, 5, 6, 2, 7};
    EPLB_EXPECT(from1 == want1);
    EPLB_EXPECT(counters1 == (std::vector<int32_t>{0, 0, 6, 0, 3, 3, 6, 6}));
    // From node 0: expert 0 -> {0}; 1 -> {1}; 2 -> {2}; 4 has none on node 0 -> TokenHash over {7}.
    const auto [from0, counters0] = map_node_local(EPLB_BACKEND_CPU, t, ids, 6, 4, 2, 0);
    for (int row = 0; row < 6; ++row)
        EPLB_EXPECT(std::vector<int32_t>(from0.begin() + row * 4, from0.begin() + row * 4 + 4) ==
                    (std::vector<int32_t>{0, 1, 2, 7}));
    // Three local replicas: expert 0 in {4, 5, 6} and {0} -> from node 1 the (h mod 3)-th of {4, 5, 6}.
    const Tables three = tables_from_phy2log({0, 1, 2, 3, 0, 0, 0, 1}, 4);
    const auto [by3, unused] = map_node_local(EPLB_BACKEND_CPU, three, {0, 0, 0, 0, 0, 0}, 6, 1, 2, 1);
    EPLB_EXPECT(by3 == (std::vector<int32_t>{4, 4, 6, 6, 5, 4}));
    // One node: every replica is local, which is TokenHash exactly.
    const auto [one_node, unused1] = map_node_local(EPLB_BACKEND_CPU, t, ids, 6, 4, 1, 0);
    for (int row = 0; row < 6; ++row)
        for (int k = 0; k < 4; ++k)
            EPLB_EXPECT_EQ(one_node[size_t(row * 4 + k)], oracle_slot(t, ids[size_t(row * 4 + k)], row, 1, 0));
}

EPLB_TEST(node_local_properties_on_random_tables) {
    for (int iteration = 0; iteration < 60; ++iteration) {
        const int32_t nodes = 1 + int32_t(rng()() % 8);
        const int32_t per_node = 1 + int32_t(rng()() % 40);
        const int32_t r = nodes * per_node;
        const int32_t n = 1 + int32_t(rng()() % uint64_t(r));
        const int32_t source = int32_t(rng()() % uint64_t(nodes));
        const Tables t = random_node_tables(n, nodes, per_node);
        const int32_t top_k = 1 + int32_t(rng()() % 8);
        const int64_t tokens = 1 + int64_t(rng()() % 500);
        std::vector<int32_t> ids(size_t(tokens) * top_k);
        for (auto& id : ids) id = int32_t(rng()() % uint64_t(n + 2)) - 1;  // includes -1 and N
        const auto [slots, counters] = map_node_local(EPLB_BACKEND_CPU, t, ids, tokens, top_k, nodes, source);
        std::vector<int32_t> bincount(size_t(r), 0);
        for (size_t i = 0; i < ids.size(); ++i) {
            const int32_t id = ids[i];
            const int64_t row = int64_t(i) / top_k;
            EPLB_EXPECT_EQ(slots[i], oracle_slot(t, id, row, nodes, source));
            if (id < 0 || id >= n) {
                EPLB_EXPECT_EQ(slots[i], -1);
                continue;
            }
            // The chosen slot holds the expert; it is on the source node whenever a replica is there.
            EPLB_EXPECT_EQ(t.phy2log[size_t(slots[i])], id);
            bool has_local = false;
            for (int32_t s = source * per_node; s < (source + 1) * per_node; ++s) has_local |= t.phy2log[size_t(s)] == id;
            EPLB_EXPECT_EQ(slots[i] / per_node == source, has_local);
            ++bincount[size_t(slots[i])];
        }
        EPLB_EXPECT(counters == bincount);
    }
}

EPLB_TEST(node_local_spreads_evenly_over_local_replicas_and_depends_on_the_row_only) {
    // An expert with m replicas on the source node (and others elsewhere): over many rows each local
    // replica takes about 1/m of them.
    for (int32_t m : {2, 3, 5, 7}) {
        const int32_t nodes = 3, per_node = 8;
        std::vector<int32_t> phy2log(static_cast<size_t>(nodes * per_node));
        for (size_t s = 0; s < phy2log.size(); ++s) phy2log[s] = 1 + int32_t(s % 9);
        for (int32_t j = 0; j < m; ++j) phy2log[size_t(per_node + j)] = 0;  // node 1
        phy2log[0] = 0;                                                      // and one on node 0
        const Tables t = tables_from_phy2log(phy2log, 10);
        const int64_t tokens = 30000;
        const std::vector<int32_t> ids(size_t(tokens), 0);
        const auto [slots, counters] = map_node_local(EPLB_BACKEND_CPU, t, ids, tokens, 1, nodes, 1);
        for (int32_t j = 0; j < m; ++j) {
            const double share = double(counters[size_t(per_node + j)]) / double(tokens);
            if (std::abs(share - 1.0 / m) > 0.02)
                EPLB_FAIL("local replica " << j << " of " << m << " took " << share << " of the rows, want ~" << 1.0 / m);
        }
        EPLB_EXPECT_EQ(counters[0], 0);
        // Rank invariance: a row's slot depends on the row, not on the rest of the batch or the stream.
        std::vector<int32_t> mixed(static_cast<size_t>(tokens));
        for (auto& id : mixed) id = int32_t(rng()() % 10);
        for (int64_t row = 0; row < tokens; row += 7) mixed[size_t(row)] = 0;
        const auto [again, unused] = map_node_local(EPLB_BACKEND_CPU, t, mixed, tokens, 1, nodes, 1);
        for (int64_t row = 0; row < tokens; row += 7) EPLB_EXPECT_EQ(again[size_t(row)], slots[size_t(row)]);
    }
}

EPLB_TEST(node_local_on_real_loads_crosses_nodes_only_without_a_local_replica) {
    // Real DeepSeek-V3 routing drawn from the SGLang loads, 4 nodes x 72 slots, the 32 hottest
    // experts replicated on other nodes: a pair leaves its node exactly when its expert has no
    // replica there, and never more often than with TokenHash.
    const auto rows = read_load_file("decode_in1000out1000");
    for (int layer : {3, 31, 60}) {
        std::vector<int32_t> order(256);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int a, int b) { return rows[size_t(layer)][size_t(a)] > rows[size_t(layer)][size_t(b)]; });
        std::vector<int32_t> phy2log(288);
        for (int node = 0; node < 4; ++node) {
            for (int j = 0; j < 64; ++j) phy2log[size_t(node * 72 + j)] = node * 64 + j;  // groups of 64 per node
            for (int j = 0; j < 8; ++j) phy2log[size_t(node * 72 + 64 + j)] = order[size_t(((node + 1) % 4) * 8 + j)];
        }
        const Tables t = tables_from_phy2log(phy2log, 256, 4);
        const auto ids = sample_topk(rows[size_t(layer)], 2048, 8);
        for (int32_t source = 0; source < 4; ++source) {
            const auto [slots, counters] = map_node_local(EPLB_BACKEND_CPU, t, ids, 2048, 8, 4, source);
            int64_t remote = 0, without_local = 0, hash_remote = 0;
            for (size_t i = 0; i < ids.size(); ++i) {
                remote += slots[i] / 72 != source;
                bool local = false;
                for (int32_t s = source * 72; s < source * 72 + 72; ++s) local |= phy2log[size_t(s)] == ids[i];
                without_local += !local;
                hash_remote += oracle_slot(t, ids[i], int64_t(i) / 8, 1, 0) / 72 != source;
            }
            EPLB_EXPECT_EQ(remote, without_local);
            EPLB_EXPECT(remote <= hash_remote);
        }
    }
}

EPLB_TEST(node_local_routing_epilogue_equals_route_then_map) {
    // The routing kernels' epilogue uses the same rule: route with the map == route logically, then
    // map the logical ids with NODE_LOCAL.
    const int32_t n = 64, k = 6, nodes = 4;
    const Tables t = random_node_tables(n, nodes, 20);
    const int64_t tokens = 300;
    std::vector<float> logits(size_t(tokens) * n);
    for (auto& x : logits) x = float(int64_t(rng()() % 20001) - 10000) / 1000.0f;
    eplb_router_config_t config{};
    config.num_experts = n;
    config.top_k = k;
    config.score = EPLB_ROUTING_SCORE_SQRT_SOFTPLUS;
    config.num_groups = 1;
    config.topk_groups = 1;
    config.renormalize = 1;
    Stream stream(EPLB_BACKEND_CPU);
    std::vector<int32_t> logical(size_t(tokens) * k), physical(logical.size());
    std::vector<float> weights(logical.size());
    EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &config, logits.data(), nullptr, tokens, nullptr, nullptr, logical.data(),
                                   weights.data()));
    std::vector<int32_t> counters(size_t(t.num_physical), 0);
    const int32_t on = 1;
    for (int32_t source = 0; source < nodes; ++source) {
        std::fill(counters.begin(), counters.end(), 0);
        const eplb_expert_map_t map{t.log2phy.data(), t.logcnt.data(), counters.data(), &on, n, t.max_replicas,
                                    t.num_physical, EPLB_REPLICA_SELECTION_NODE_LOCAL, nodes, source};
        EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &config, logits.data(), nullptr, tokens, &map, nullptr,
                                       physical.data(), weights.data()));
        const auto [want, want_counters] = map_node_local(EPLB_BACKEND_CPU, t, logical, tokens, k, nodes, source);
        EPLB_EXPECT(physical == want);
        EPLB_EXPECT(counters == want_counters);
    }
}

EPLB_TEST(node_local_bad_configuration_fails_naming_the_field) {
    const Tables t = tables_from_phy2log({0, 1, 2, 3, 0, 0}, 4);  // R = 6
    Stream stream(EPLB_BACKEND_CPU);
    const std::vector<int32_t> ids = {0, 1, 2, 3};
    std::vector<int32_t> out(4, 12345);
    auto call = [&](int32_t nodes, int32_t source) {
        const eplb_expert_map_t map{t.log2phy.data(), t.logcnt.data(), nullptr, nullptr, 4, t.max_replicas, 6,
                                    EPLB_REPLICA_SELECTION_NODE_LOCAL, nodes, source};
        return eplb_map_logical_to_physical(stream.get(), ids.data(), 4, 1, &map, nullptr, out.data());
    };
    const struct {
        int32_t nodes, source;
        const char* text;
    } bad[] = {{0, 0, "map->num_nodes"}, {-2, 0, "map->num_nodes"}, {7, 0, "map->num_nodes"},
               {4, 0, "does not divide map->num_physical = 6"}, {3, 3, "map->source_node"}, {2, -1, "map->source_node"}};
    for (const auto& b : bad) {
        EPLB_EXPECT_STATUS(call(b.nodes, b.source), EPLB_STATUS_INVALID_ARGUMENT);
        if (std::string(eplb_last_error_message()).find(b.text) == std::string::npos)
            EPLB_FAIL("nodes " << b.nodes << ", source " << b.source << ": '" << eplb_last_error_message() << "' lacks '"
                               << b.text << "'");
    }
    EPLB_EXPECT(std::all_of(out.begin(), out.end(), [](int32_t v) { return v == 12345; }));
    EPLB_EXPECT_OK(call(3, 2));
    // Other selections ignore both fields.
    const eplb_expert_map_t token_hash{t.log2phy.data(), t.logcnt.data(), nullptr, nullptr, 4, t.max_replicas, 6,
                                       EPLB_REPLICA_SELECTION_TOKEN_HASH, -9, 99};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids.data(), 4, 1, &token_hash, nullptr, out.data()));
    // An unknown selection names the three valid ones.
    const eplb_expert_map_t unknown{t.log2phy.data(), t.logcnt.data(), nullptr, nullptr, 4, t.max_replicas, 6, 3, 1, 0};
    EPLB_EXPECT_STATUS(eplb_map_logical_to_physical(stream.get(), ids.data(), 4, 1, &unknown, nullptr, out.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("NODE_LOCAL (2)") != std::string::npos);
}

// ---- CUDA == CPU, bit for bit (skipped without a device) ---------------------------------------

EPLB_TEST(node_local_cuda_matches_cpu) {
    require_cuda();
    for (int iteration = 0; iteration < 30; ++iteration) {
        const int32_t nodes = 1 + int32_t(rng()() % 8);
        const int32_t per_node = 1 + int32_t(rng()() % (iteration % 5 == 0 ? 1500 : 60));  // R > 8192 at times
        const int32_t n = 1 + int32_t(rng()() % uint64_t(nodes * per_node));
        const Tables t = random_node_tables(n, nodes, per_node);
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = iteration == 0 ? 1 : int64_t(rng()() % 20000);
        std::vector<int32_t> ids(size_t(tokens) * top_k);
        for (auto& id : ids) id = int32_t(rng()() % uint64_t(n + 2)) - 1;
        const int32_t source = int32_t(rng()() % uint64_t(nodes));
        const auto want = map_node_local(EPLB_BACKEND_CPU, t, ids, tokens, top_k, nodes, source);
        const auto got = map_node_local(EPLB_BACKEND_CUDA, t, ids, tokens, top_k, nodes, source);
        EPLB_EXPECT(got.first == want.first);
        EPLB_EXPECT(got.second == want.second);
    }
}

EPLB_TEST(node_local_cuda_routing_matches_cpu) {
    require_cuda();
    // Both routing kernels (scored top-k and hash) with a NODE_LOCAL map, on random logits.
    const int32_t n = 256, k = 8, nodes = 4;
    const Tables t = random_node_tables(n, nodes, 72);
    const int64_t tokens = 3000, vocab = 1000;
    std::vector<float> logits(size_t(tokens) * n);
    for (auto& x : logits) x = float(int64_t(rng()() % 20001) - 10000) / 1000.0f;
    std::vector<int64_t> token_ids(static_cast<size_t>(tokens));
    for (auto& id : token_ids) id = int64_t(rng()() % uint64_t(vocab));
    std::vector<int32_t> tid2eid(size_t(vocab) * k);
    for (auto& e : tid2eid) e = int32_t(rng()() % uint64_t(n));
    eplb_router_config_t config{};
    config.num_experts = n;
    config.top_k = k;
    config.score = EPLB_ROUTING_SCORE_SIGMOID;
    config.num_groups = 1;
    config.topk_groups = 1;
    config.renormalize = 1;
    for (bool hash : {false, true}) {
        const int32_t source = int32_t(rng()() % nodes);
        std::vector<int32_t> results[2], counts[2];
        for (eplb_backend_t backend : {EPLB_BACKEND_CPU, EPLB_BACKEND_CUDA}) {
            Stream stream(backend);
            Buffer<float> x(backend, logits);
            Buffer<int64_t> tok(backend, token_ids);
            Buffer<int32_t> table(backend, tid2eid), log2phy(backend, t.log2phy), logcnt(backend, t.logcnt);
            Buffer<int32_t> counters(backend, std::vector<int32_t>(size_t(t.num_physical), 0));
            Buffer<int32_t> flag(backend, std::vector<int32_t>{1});
            Buffer<int32_t> ids(backend, size_t(tokens) * k);
            Buffer<float> weights(backend, size_t(tokens) * k);
            const eplb_expert_map_t map{log2phy.data(), logcnt.data(), counters.data(), flag.data(), n, t.max_replicas,
                                        t.num_physical, EPLB_REPLICA_SELECTION_NODE_LOCAL, nodes, source};
            if (hash)
                EPLB_EXPECT_OK(eplb_route_hash(stream.get(), &config, x.data(), tok.data(), table.data(), vocab, tokens, &map,
                                               nullptr, ids.data(), weights.data()));
            else
                EPLB_EXPECT_OK(eplb_route_topk(stream.get(), &config, x.data(), nullptr, tokens, &map, nullptr, ids.data(),
                                               weights.data()));
            EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
            results[backend] = ids.read();
            counts[backend] = counters.read();
        }
        EPLB_EXPECT(results[1] == results[0]);
        EPLB_EXPECT(counts[1] == counts[0]);
    }
}
