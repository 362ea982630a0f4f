// The handle and memory registry (issue 13 §3, issue 11): stale, forged and mistyped handles fail
// with a status naming them at every export that takes one, never abort; pointer checks find known
// memory without asking the driver. The registry unit cases compile capi/registry.cpp into this
// binary and run its checks against a stub driver query that counts calls.
#include <atomic>
#include <thread>

#include "capi/registry.hpp"
#include "common/error.hpp"
#include "test_util.hpp"

using namespace eplb::test;
using eplb::capi::MemoryRange;
using eplb::capi::PointerAttributes;
using eplb::capi::Registry;
using eplb::capi::StreamPlace;

namespace {

bool message_has(const char* text) { return std::string(eplb_last_error_message()).find(text) != std::string::npos; }

#define EXPECT_STALE(expr, name, why)                                                          \
    do {                                                                                       \
        EPLB_EXPECT_STATUS(expr, EPLB_STATUS_INVALID_ARGUMENT);                                \
        if (!message_has(name) || !message_has(why))                                           \
            EPLB_FAIL(#expr ": message '" << eplb_last_error_message() << "' does not name '" \
                                          << name << "' and '" << why << "'");                \
    } while (0)

// Every export that takes a stream, called with `stream`; each must fail naming "stream".
void expect_every_stream_export_refuses(eplb_stream_t* stream, const char* why) {
    int32_t ids[8] = {0, 1, 0, 1, 0, 1, 0, 1};
    int32_t out[8] = {};
    float logits[8] = {};
    float weights[8] = {};
    int64_t tokens[1] = {0};
    int32_t table[4] = {0, 1, 0, 1};
    int32_t log2phy[2] = {0, 1};
    int32_t logcnt[2] = {1, 1};
    int32_t counters[2] = {};
    int64_t sums[2] = {};
    int32_t window[2] = {};
    const eplb_expert_map_t map{log2phy, logcnt, nullptr, nullptr, 2, 1, 2, 0, 0, 0};
    eplb_router_config_t config{};
    config.num_experts = 2;
    config.top_k = 2;
    config.num_groups = 1;
    config.topk_groups = 1;
    uint32_t flags = 0;
    eplb_backend_t backend{};
    void* cuda = nullptr;
    EXPECT_STALE(eplb_stream_synchronize(stream), "stream", why);
    EXPECT_STALE(eplb_stream_check_device_errors(stream, &flags), "stream", why);
    EXPECT_STALE(eplb_stream_get_backend(stream, &backend), "stream", why);
    EXPECT_STALE(eplb_stream_get_cuda_stream(stream, &cuda), "stream", why);
    EXPECT_STALE(eplb_map_logical_to_physical(stream, ids, 4, 2, &map, nullptr, out), "stream", why);
    EXPECT_STALE(eplb_route_topk(stream, &config, logits, nullptr, 4, nullptr, nullptr, out, weights), "stream", why);
    EXPECT_STALE(eplb_route_hash(stream, &config, logits, tokens, table, 2, 1, nullptr, nullptr, out, weights), "stream",
                 why);
    EXPECT_STALE(eplb_load_window_push(stream, counters, window, sums, 2, 1, 0), "stream", why);
    EXPECT_STALE(eplb_load_window_discard(stream, counters, 2), "stream", why);
    int32_t counts[2], offsets[3], sorted[64], blocks[64], positions[8];
    EXPECT_STALE(eplb_dispatch_align(stream, ids, 4, 2, 0, 2, 1, 64, counts, offsets, sorted, blocks, positions), "stream",
                 why);
    EXPECT_STALE(eplb_dispatch_bucket_by_rank(stream, ids, 4, 2, 2, 1, counts, offsets, sorted, positions), "stream", why);
    uint16_t x[64] = {}, y[64] = {};
    int32_t rows = 0;
    EXPECT_STALE(eplb_dispatch_permute(stream, EPLB_DTYPE_BF16, x, 4, 2, 2, ids, &rows, 8, y), "stream", why);
    EXPECT_STALE(eplb_dispatch_combine(stream, EPLB_DTYPE_BF16, x, 8, 2, positions, weights, 4, 2, EPLB_DTYPE_BF16, y),
                 "stream", why);
    eplb_moe_shape_t shape{};
    shape.hidden = 64;
    shape.intermediate = 64;
    shape.top_k = 1;
    shape.num_experts = 1;
    shape.num_local_experts = 1;
    int32_t blocks_out = 0;
    EXPECT_STALE(eplb_mega_moe_max_grid(stream, &shape, 1, &blocks_out, nullptr), "stream", why);
    const eplb_moe_tensors_t tensors{};
    EXPECT_STALE(eplb_mega_moe(stream, &shape, 1, &tensors, 0), "stream", why);
    EXPECT_STALE(eplb_moe_unfused(stream, &shape, 1, &tensors), "stream", why);
}

// Every export that takes a buffer, called with `buffer` (in each buffer position); each must fail
// naming the argument.
void expect_every_buffer_export_refuses(eplb_buffer_t* buffer, eplb_buffer_t* good, const char* why) {
    eplb_buffer_info_t info{};
    uint8_t bytes[16] = {};
    const uint32_t pattern = 0;
    EXPECT_STALE(eplb_buffer_get_info(buffer, &info), "buffer", why);
    EXPECT_STALE(eplb_buffer_write(buffer, 0, bytes, 4, nullptr), "dst", why);
    EXPECT_STALE(eplb_buffer_read(buffer, 0, bytes, 4, nullptr), "src", why);
    EXPECT_STALE(eplb_buffer_copy(buffer, 0, good, 0, 4, nullptr), "dst", why);
    EXPECT_STALE(eplb_buffer_copy(good, 0, buffer, 0, 4, nullptr), "src", why);
    EXPECT_STALE(eplb_buffer_fill(buffer, 0, 1, &pattern, 4, nullptr), "dst", why);
    EXPECT_STALE(eplb_buffer_destroy(buffer), "buffer", why);
}

}  // namespace

EPLB_TEST(registry_double_destroy_and_use_after_destroy_fail_naming_the_handle) {
    eplb_buffer_t* good = nullptr;
    EPLB_EXPECT_OK(eplb_buffer_create(EPLB_BACKEND_CPU, 64, &good));
    eplb_buffer_t* buffer = nullptr;
    EPLB_EXPECT_OK(eplb_buffer_create(EPLB_BACKEND_CPU, 64, &buffer));
    EPLB_EXPECT_OK(eplb_buffer_destroy(buffer));
    expect_every_buffer_export_refuses(buffer, good, "already destroyed");

    eplb_stream_t* stream = nullptr;
    EPLB_EXPECT_OK(eplb_stream_create(EPLB_BACKEND_CPU, &stream));
    EPLB_EXPECT_OK(eplb_stream_destroy(stream));
    EXPECT_STALE(eplb_stream_destroy(stream), "stream", "already destroyed");
    expect_every_stream_export_refuses(stream, "already destroyed");
    // A destroyed stream passed as the optional stream of a buffer copy fails too.
    EXPECT_STALE(eplb_buffer_fill(good, 0, 1, &good, 4, stream), "stream", "already destroyed");
    EPLB_EXPECT_OK(eplb_buffer_destroy(good));
}

EPLB_TEST(registry_forged_and_mistyped_handles_fail) {
    eplb_buffer_t* good = nullptr;
    EPLB_EXPECT_OK(eplb_buffer_create(EPLB_BACKEND_CPU, 64, &good));
    eplb_stream_t* stream = nullptr;
    EPLB_EXPECT_OK(eplb_stream_create(EPLB_BACKEND_CPU, &stream));
    // Random values, the address of a real object, and the other kind of handle.
    for (int i = 0; i < 20; ++i) {
        const uintptr_t value = uintptr_t(rng()()) | 1u;
        expect_every_buffer_export_refuses(reinterpret_cast<eplb_buffer_t*>(value), good, "");
        expect_every_stream_export_refuses(reinterpret_cast<eplb_stream_t*>(value), "");
    }
    int object = 0;
    expect_every_buffer_export_refuses(reinterpret_cast<eplb_buffer_t*>(&object), good, "never returned by libeplb");
    expect_every_stream_export_refuses(reinterpret_cast<eplb_stream_t*>(&object), "never returned by libeplb");
    expect_every_buffer_export_refuses(reinterpret_cast<eplb_buffer_t*>(stream), good, "not a buffer handle");
    expect_every_stream_export_refuses(reinterpret_cast<eplb_stream_t*>(good), "not a stream handle");
    // Still alive and usable after all that.
    uint32_t flags = 1;
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream, &flags));
    EPLB_EXPECT_EQ(flags, 0u);
    EPLB_EXPECT_OK(eplb_buffer_fill(good, 0, 16, &flags, 4, stream));
    EPLB_EXPECT_OK(eplb_stream_destroy(stream));
    EPLB_EXPECT_OK(eplb_buffer_destroy(good));
}

EPLB_TEST(registry_handles_are_never_reused) {
    std::vector<eplb_buffer_t*> seen;
    for (int i = 0; i < 200; ++i) {
        eplb_buffer_t* buffer = nullptr;
        EPLB_EXPECT_OK(eplb_buffer_create(EPLB_BACKEND_CPU, 16, &buffer));
        EPLB_EXPECT(std::find(seen.begin(), seen.end(), buffer) == seen.end());
        seen.push_back(buffer);
        EPLB_EXPECT_OK(eplb_buffer_destroy(buffer));
    }
    for (eplb_buffer_t* stale : seen) EXPECT_STALE(eplb_buffer_destroy(stale), "buffer", "already destroyed");
}

EPLB_TEST(registry_concurrent_create_use_destroy) {
    // Threads create, use and destroy buffers and streams while others destroy stale handles; every
    // status is the one expected, and nothing aborts.
    constexpr int kThreads = 8, kRounds = 300;
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            std::vector<eplb_buffer_t*> stale;
            for (int round = 0; round < kRounds; ++round) {
                eplb_buffer_t* buffer = nullptr;
                eplb_stream_t* stream = nullptr;
                if (eplb_buffer_create(EPLB_BACKEND_CPU, 64, &buffer) != EPLB_STATUS_OK) ++wrong;
                if (eplb_stream_create(EPLB_BACKEND_CPU, &stream) != EPLB_STATUS_OK) ++wrong;
                const uint32_t value = uint32_t(t * kRounds + round);
                if (eplb_buffer_fill(buffer, 0, 16, &value, 4, stream) != EPLB_STATUS_OK) ++wrong;
                uint32_t back = 0;
                if (eplb_buffer_read(buffer, 60, &back, 4, stream) != EPLB_STATUS_OK || back != value) ++wrong;
                if (eplb_stream_destroy(stream) != EPLB_STATUS_OK) ++wrong;
                if (eplb_buffer_destroy(buffer) != EPLB_STATUS_OK) ++wrong;
                stale.push_back(buffer);
                if (eplb_buffer_destroy(stale[size_t(round) / 2]) != EPLB_STATUS_INVALID_ARGUMENT) ++wrong;
                if (eplb_stream_synchronize(stream) != EPLB_STATUS_INVALID_ARGUMENT) ++wrong;
            }
        });
    }
    for (auto& thread : threads) thread.join();
    EPLB_EXPECT_EQ(wrong.load(), 0);
}

// ---- The registry's pointer checks against a stub driver -------------------------------------

namespace {

std::atomic<int> g_queries{0};
PointerAttributes g_answer;

PointerAttributes stub_query(const void*) {
    ++g_queries;
    return g_answer;
}

PointerAttributes device_answer(int32_t device) {
    PointerAttributes a;
    a.ok = true;
    a.type = PointerAttributes::Type::Device;
    a.device = device;
    return a;
}

PointerAttributes host_answer() {
    PointerAttributes a;
    a.ok = true;
    a.type = PointerAttributes::Type::Unregistered;
    return a;
}

// Expects the check to fail with a message containing `text`.
void expect_refused(const Registry& registry, const StreamPlace& stream, uintptr_t ptr, uint64_t bytes,
                    uint64_t alignment, const char* text) {
    try {
        registry.check_pointer(stream, reinterpret_cast<const void*>(ptr), bytes, alignment, "arg", &stub_query);
    } catch (const eplb::Error& e) {
        EPLB_EXPECT_EQ(int(e.status()), int(EPLB_STATUS_INVALID_ARGUMENT));
        if (std::string(e.what()).find(text) == std::string::npos || std::string(e.what()).find("arg") != 0)
            EPLB_FAIL("message '" << e.what() << "' does not name arg and '" << text << "'");
        return;
    }
    EPLB_FAIL("check of 0x" << std::hex << ptr << " + " << std::dec << bytes << " was accepted, want '" << text << "'");
}

int queries_of(const Registry& registry, const StreamPlace& stream, uintptr_t ptr, uint64_t bytes) {
    const int before = g_queries.load();
    registry.check_pointer(stream, reinterpret_cast<const void*>(ptr), bytes, 4, "arg", &stub_query);
    return g_queries.load() - before;
}

MemoryRange range_of(uintptr_t begin, uint64_t size, eplb_backend_t backend, int32_t device, bool owned) {
    return MemoryRange{begin, size, backend, device, owned};
}

}  // namespace

EPLB_TEST(registry_known_memory_needs_no_driver_query) {
    Registry registry;
    const StreamPlace cuda0{EPLB_BACKEND_CUDA, 0};
    // The nine pointers of a mapped, recording eplb_route_topk call, in eplb buffers of device 0.
    const uint64_t tokens = 1 + rng()() % 4096, n = 256, k = 8, r = 288, kmax = 4;
    const std::vector<uint64_t> sizes = {tokens * n * 4, n * 4, tokens * k * 4, tokens * k * 4, n * kmax * 4, n * 4,
                                         r * 4, 4, 4};
    std::vector<uintptr_t> bases;
    uintptr_t next = 0x7f0000000000;
    for (uint64_t size : sizes) {
        bases.push_back(next);
        registry.add_buffer(nullptr, range_of(next, size, EPLB_BACKEND_CUDA, 0, true));
        next += (size + 511) / 512 * 512;
    }
    g_answer = host_answer();  // would refuse everything, were it asked
    for (size_t i = 0; i < sizes.size(); ++i) EPLB_EXPECT_EQ(queries_of(registry, cuda0, bases[i], sizes[i]), 0);
    // An interior pointer with the bytes that remain, and a 0-byte tail.
    EPLB_EXPECT_EQ(queries_of(registry, cuda0, bases[0] + 64, sizes[0] - 64), 0);
    // Unknown memory: one query per check, accepted or refused by the driver's answer.
    g_answer = device_answer(0);
    EPLB_EXPECT_EQ(queries_of(registry, cuda0, 0x100000, 64), 1);
    g_answer = host_answer();
    expect_refused(registry, cuda0, 0x100000, 64, 4, "is host memory but the stream is a CUDA stream");
    g_answer = device_answer(1);
    expect_refused(registry, cuda0, 0x100000, 64, 4, "lives on CUDA device 1 but the stream is on device 0");
    g_answer = PointerAttributes{};
    g_answer.error = "invalid argument";
    expect_refused(registry, cuda0, 0x100000, 64, 4, "is not memory the CUDA device can address");
}

EPLB_TEST(registry_owned_memory_is_refused_without_a_query_when_it_cannot_serve) {
    Registry registry;
    const uintptr_t base = 0x7f0000001000;
    registry.add_buffer(nullptr, range_of(base, 1024, EPLB_BACKEND_CUDA, 0, true));
    g_answer = device_answer(0);  // the driver would accept: the refusals below must come first
    const int before = g_queries.load();
    expect_refused(registry, {EPLB_BACKEND_CUDA, 0}, base + 512, 516, 4, "runs past the end of its eplb buffer");
    expect_refused(registry, {EPLB_BACKEND_CUDA, 1}, base, 64, 4, "lives on CUDA device 0 but the stream is on device 1");
    expect_refused(registry, {EPLB_BACKEND_CPU, -1}, base, 64, 4, "is CUDA device memory");
    expect_refused(registry, {EPLB_BACKEND_CUDA, 0}, base + 2, 4, 4, "not aligned to its element size of 4");
    EPLB_EXPECT_EQ(g_queries.load() - before, 0);
    expect_refused(registry, {EPLB_BACKEND_CUDA, 0}, 0, 4, 4, "must not be NULL");
    // A CPU eplb buffer on a CUDA stream: only the driver knows whether it was pinned and mapped.
    registry.add_buffer(nullptr, range_of(0x600000, 256, EPLB_BACKEND_CPU, -1, true));
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CPU, -1}, 0x600000, 256), 0);
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, 0x600000, 256), 1);
}

EPLB_TEST(registry_wrapped_memory_falls_back_to_the_driver_where_it_cannot_vouch) {
    Registry registry;
    const uintptr_t base = 0x7f0000100000;
    eplb_buffer* wrap = registry.add_buffer(nullptr, range_of(base, 4096, EPLB_BACKEND_CUDA, 0, false));
    g_answer = device_answer(0);
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, base + 100 * 4, 4096 - 400), 0);
    // Past the wrapped part: the tensor may be larger than what was wrapped, so the driver decides.
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, base + 4000, 200), 1);
    // Managed memory wrapped on device 0, used on device 1.
    g_answer.type = PointerAttributes::Type::Managed;
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 1}, base, 64), 1);
    // Overlapping wraps: a small one starting inside a large one; pointers past the small one are
    // still inside the large one, without a query.
    registry.add_buffer(nullptr, range_of(base + 1024, 16, EPLB_BACKEND_CUDA, 0, false));
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, base + 1024, 2048), 0);
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, base + 1024, 16), 0);
    // Destroying the large wrap unregisters its range.
    registry.remove_buffer(wrap, "buffer");
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, base + 2048, 64), 1);
    EPLB_EXPECT_EQ(queries_of(registry, {EPLB_BACKEND_CUDA, 0}, base + 1024, 16), 0);
}

EPLB_TEST(registry_cpu_streams_without_cuda_ask_nobody) {
    Registry registry;
    // No query function (no CUDA context): unknown host memory is accepted, known memory checked.
    int32_t values[16] = {};
    registry.check_pointer({EPLB_BACKEND_CPU, -1}, values, sizeof(values), 4, "values", nullptr);
    registry.add_buffer(nullptr, range_of(reinterpret_cast<uintptr_t>(values), 32, EPLB_BACKEND_CPU, -1, true));
    try {
        registry.check_pointer({EPLB_BACKEND_CPU, -1}, values, sizeof(values), 4, "values", nullptr);
        EPLB_FAIL("an overrun of an owned buffer was accepted");
    } catch (const eplb::Error& e) {
        EPLB_EXPECT(std::string(e.what()).find("runs past the end") != std::string::npos);
    }
}

EPLB_TEST(registry_lookups_while_other_threads_register) {
    // Readers check pointers of stable ranges (no query ever) while writers add and remove others.
    Registry registry;
    constexpr int kStable = 64;
    const uintptr_t base = 0x7f0000000000;
    for (int i = 0; i < kStable; ++i) registry.add_buffer(nullptr, range_of(base + uintptr_t(i) * 0x10000, 0x8000, EPLB_BACKEND_CUDA, 0, true));
    std::atomic<bool> stop{false};
    std::atomic<int> failures{0};
    g_answer = host_answer();
    const int before = g_queries.load();
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937_64 local(uint64_t(t) + seed());
            for (int i = 0; i < 20000; ++i) {
                const uintptr_t ptr = base + uintptr_t(local() % kStable) * 0x10000 + (local() % 0x1000) * 4;
                try {
                    registry.check_pointer({EPLB_BACKEND_CUDA, 0}, reinterpret_cast<const void*>(ptr), 256, 4, "p", &stub_query);
                } catch (...) {
                    ++failures;
                }
            }
        });
    }
    std::thread writer([&] {
        std::vector<eplb_buffer*> handles;
        uintptr_t next = base + uintptr_t(kStable) * 0x10000 + 0x100000;
        while (!stop.load()) {
            handles.push_back(registry.add_buffer(nullptr, range_of(next, 0x1000, EPLB_BACKEND_CUDA, 0, true)));
            next += 0x2000;
            if (handles.size() > 32) {
                registry.remove_buffer(handles.front(), "buffer");
                handles.erase(handles.begin());
            }
        }
    });
    for (auto& thread : threads) thread.join();
    stop = true;
    writer.join();
    EPLB_EXPECT_EQ(failures.load(), 0);
    EPLB_EXPECT_EQ(g_queries.load() - before, 0);
}
