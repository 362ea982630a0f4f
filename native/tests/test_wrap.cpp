// Non-owning buffers (issue 16 §1): eplb_buffer_wrap over memory the caller owns. Validated once,
// never copied, never freed; every buffer function and every kernel accepts them; bad wraps fail
// with a status naming the value.
#include <cstdlib>

#include "test_util.hpp"

using namespace eplb::test;

namespace {

bool message_has(const char* text) { return std::string(eplb_last_error_message()).find(text) != std::string::npos; }

#define EXPECT_INVALID_NAMING(expr, text)                                                                   \
    do {                                                                                                    \
        EPLB_EXPECT_STATUS(expr, EPLB_STATUS_INVALID_ARGUMENT);                                             \
        if (!message_has(text)) EPLB_FAIL(#expr ": message '" << eplb_last_error_message() << "' lacks '" << text << "'"); \
    } while (0)

// A handle over caller memory, destroyed at scope exit.
class Wrap {
public:
    Wrap(eplb_backend_t backend, int32_t device, void* data, uint64_t bytes) {
        EPLB_EXPECT_OK(eplb_buffer_wrap(backend, device, data, bytes, &buffer_));
    }
    ~Wrap() { eplb_buffer_destroy(buffer_); }
    Wrap(const Wrap&) = delete;
    Wrap& operator=(const Wrap&) = delete;
    eplb_buffer_t* get() const { return buffer_; }

private:
    eplb_buffer_t* buffer_ = nullptr;
};

}  // namespace

EPLB_TEST(wrap_host_memory_is_used_in_place_and_never_freed) {
    // One caller-owned arena holds a whole mapping call: ids, tables, counters, flag and output.
    const Tables t = random_tables(1 + int32_t(rng()() % 64), 64 + int32_t(rng()() % 64), 1);
    const int64_t tokens = 1 + int64_t(rng()() % 200);
    const int32_t top_k = 1 + int32_t(rng()() % 8);
    const size_t pairs = size_t(tokens) * top_k;
    std::vector<int32_t> arena(pairs * 2 + t.log2phy.size() + t.logcnt.size() + size_t(t.num_physical) + 1, -5);
    int32_t* ids = arena.data();
    int32_t* out = ids + pairs;
    int32_t* log2phy = out + pairs;
    int32_t* logcnt = log2phy + t.log2phy.size();
    int32_t* counters = logcnt + t.logcnt.size();
    int32_t* flag = counters + t.num_physical;
    eplb_buffer_t* wrapped = nullptr;
    EPLB_EXPECT_OK(eplb_buffer_wrap(EPLB_BACKEND_CPU, -1, arena.data(), arena.size() * 4, &wrapped));
    eplb_buffer_info_t info{};
    EPLB_EXPECT_OK(eplb_buffer_get_info(wrapped, &info));
    EPLB_EXPECT(info.data == arena.data());
    EPLB_EXPECT_EQ(info.size_bytes, uint64_t(arena.size() * 4));
    EPLB_EXPECT_EQ(int(info.backend), int(EPLB_BACKEND_CPU));
    EPLB_EXPECT_EQ(info.device, -1);

    // Written through the handle, seen in the caller's memory (no copy).
    Stream stream(EPLB_BACKEND_CPU);
    const int32_t zero = 0, one = 1;
    EPLB_EXPECT_OK(eplb_buffer_fill(wrapped, uint64_t(counters - arena.data()) * 4, uint64_t(t.num_physical), &zero, 4,
                                    stream.get()));
    EPLB_EXPECT_OK(eplb_buffer_write(wrapped, uint64_t(flag - arena.data()) * 4, &one, 4, stream.get()));
    EPLB_EXPECT(std::all_of(counters, counters + t.num_physical, [](int32_t v) { return v == 0; }));
    EPLB_EXPECT_EQ(*flag, 1);
    // Written through the caller's memory after the wrap, seen by the kernel.
    std::copy(t.log2phy.begin(), t.log2phy.end(), log2phy);
    std::copy(t.logcnt.begin(), t.logcnt.end(), logcnt);
    for (size_t i = 0; i < pairs; ++i) ids[i] = int32_t(rng()() % uint64_t(t.num_logical));
    const eplb_expert_map_t map{log2phy, logcnt, counters, flag, t.num_logical, t.max_replicas, t.num_physical, 0, 0, 0};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids, tokens, top_k, &map, nullptr, out));
    // The same call on library-owned copies of the inputs gives the same ids and counts.
    Buffer<int32_t> ids_copy(EPLB_BACKEND_CPU, std::vector<int32_t>(ids, ids + pairs));
    Buffer<int32_t> log2phy_copy(EPLB_BACKEND_CPU, t.log2phy), logcnt_copy(EPLB_BACKEND_CPU, t.logcnt);
    Buffer<int32_t> counters_copy(EPLB_BACKEND_CPU, std::vector<int32_t>(size_t(t.num_physical), 0));
    Buffer<int32_t> out_copy(EPLB_BACKEND_CPU, pairs);
    const eplb_expert_map_t owned_map{log2phy_copy.data(), logcnt_copy.data(), counters_copy.data(), flag,
                                      t.num_logical,       t.max_replicas,      t.num_physical,       0, 0, 0};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids_copy.data(), tokens, top_k, &owned_map, nullptr,
                                                out_copy.data()));
    EPLB_EXPECT(std::vector<int32_t>(out, out + pairs) == out_copy.read());
    EPLB_EXPECT(std::vector<int32_t>(counters, counters + t.num_physical) == counters_copy.read());
    // Read back through the handle: the caller's bytes, and copies between wrapped and owned buffers.
    std::vector<int32_t> back(pairs);
    EPLB_EXPECT_OK(eplb_buffer_read(wrapped, uint64_t(out - arena.data()) * 4, back.data(), pairs * 4, stream.get()));
    EPLB_EXPECT(back == out_copy.read());
    EPLB_EXPECT_OK(eplb_buffer_copy(wrapped, uint64_t(ids - arena.data()) * 4, out_copy.handle(), 0, pairs * 4, stream.get()));
    EPLB_EXPECT(std::vector<int32_t>(ids, ids + pairs) == out_copy.read());

    // Destroy frees the handle only: the memory is intact and still the caller's (ASan would flag a free).
    const std::vector<int32_t> before = arena;
    EPLB_EXPECT_OK(eplb_buffer_destroy(wrapped));
    EPLB_EXPECT(arena == before);
    arena.assign(arena.size(), 3);
    EPLB_EXPECT_STATUS(eplb_buffer_destroy(wrapped), EPLB_STATUS_INVALID_ARGUMENT);
}

EPLB_TEST(wrap_any_alignment_and_kernels_check_their_own) {
    // A wrap at an odd address is valid; a kernel refuses a misaligned int32 pointer into it, and a
    // fill refuses a pattern that would be misaligned at that address.
    std::vector<uint8_t> bytes(4096 + 8, 0);
    uint8_t* odd = bytes.data() + 1;
    Wrap wrap(EPLB_BACKEND_CPU, -1, odd, 4096);
    Stream stream(EPLB_BACKEND_CPU);
    const uint32_t word = 0x01020304u;
    EXPECT_INVALID_NAMING(eplb_buffer_fill(wrap.get(), 0, 4, &word, 4, stream.get()), "multiple of pattern_size 4");
    EPLB_EXPECT_OK(eplb_buffer_fill(wrap.get(), 3, 4, &word, 4, stream.get()));  // odd + 3 is 4-aligned
    EPLB_EXPECT_EQ(bytes[4], uint8_t(0x04));
    const uint8_t byte = 0x7f;
    EPLB_EXPECT_OK(eplb_buffer_fill(wrap.get(), 0, 3, &byte, 1, stream.get()));
    EPLB_EXPECT_EQ(bytes[1], uint8_t(0x7f));
    const int32_t log2phy[1] = {0}, logcnt[1] = {1};
    const eplb_expert_map_t map{log2phy, logcnt, nullptr, nullptr, 1, 1, 1, 0, 0, 0};
    EXPECT_INVALID_NAMING(eplb_map_logical_to_physical(stream.get(), reinterpret_cast<const int32_t*>(odd), 2, 1, &map,
                                                       nullptr, reinterpret_cast<int32_t*>(bytes.data() + 12)),
                          "topk_ids");
    EPLB_EXPECT(message_has("not aligned to its element size of 4"));
}

EPLB_TEST(wrap_bad_arguments_fail_naming_the_value) {
    std::vector<int32_t> memory(16);
    eplb_buffer_t* out = reinterpret_cast<eplb_buffer_t*>(uintptr_t(0x5eed));
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CPU, -1, memory.data(), 64, nullptr), "out_buffer");
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(eplb_backend_t(7), -1, memory.data(), 64, &out), "got 7");
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CPU, -1, nullptr, 64, &out), "data must not be NULL");
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CPU, 0, memory.data(), 64, &out), "device must be -1");
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CPU, 3, memory.data(), 64, &out), "(got 3)");
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CPU, -1, memory.data(), UINT64_MAX - 8, &out),
                          "runs past the end of the address space");
    const eplb_status_t cuda = eplb_backend_available(EPLB_BACKEND_CUDA);
    if (cuda != EPLB_STATUS_OK) {
        EPLB_EXPECT_STATUS(eplb_buffer_wrap(EPLB_BACKEND_CUDA, 0, memory.data(), 64, &out), cuda);
    } else {
        // Host memory CUDA does not know, and a device ordinal that does not exist.
        EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CUDA, 0, memory.data(), 64, &out), "not pinned");
        eplb_runtime_info_t info{};
        EPLB_EXPECT_OK(eplb_get_runtime_info(&info));
        EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CUDA, info.device_count, memory.data(), 64, &out),
                              "device must be a CUDA device ordinal");
        EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CUDA, -1, memory.data(), 64, &out), "(got -1)");
    }
    // Nothing written on failure.
    EPLB_EXPECT(out == reinterpret_cast<eplb_buffer_t*>(uintptr_t(0x5eed)));
    // Size 0 is a valid (empty) wrap.
    Wrap empty(EPLB_BACKEND_CPU, -1, memory.data(), 0);
    EPLB_EXPECT(empty.get() != nullptr);
}

EPLB_TEST(owned_buffer_overrun_is_refused_before_anything_runs) {
    // A pointer into an eplb buffer with more elements than the buffer holds: refused by the
    // registry (the library knows the allocation), outputs untouched.
    const Tables t = tables_from_phy2log({0, 1, 2, 0}, 3);
    Stream stream(EPLB_BACKEND_CPU);
    Buffer<int32_t> ids(EPLB_BACKEND_CPU, std::vector<int32_t>(12, 0));
    Buffer<int32_t> log2phy(EPLB_BACKEND_CPU, t.log2phy), logcnt(EPLB_BACKEND_CPU, t.logcnt);
    Buffer<int32_t> out(EPLB_BACKEND_CPU, 8);
    out.poison();
    const eplb_expert_map_t map{log2phy.data(), logcnt.data(), nullptr, nullptr, 3, t.max_replicas, 4, 0, 0, 0};
    EXPECT_INVALID_NAMING(eplb_map_logical_to_physical(stream.get(), ids.data() + 8, 3, 2, &map, nullptr, out.data()),
                          "topk_ids");
    EPLB_EXPECT(message_has("runs past the end of its eplb buffer"));
    EXPECT_INVALID_NAMING(eplb_map_logical_to_physical(stream.get(), ids.data(), 3, 3, &map, nullptr, out.data()),
                          "physical_ids");
    const auto untouched = out.read();
    EPLB_EXPECT(std::all_of(untouched.begin(), untouched.end(), [](int32_t v) { return uint32_t(v) == 0xDEADBEEFu; }));
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids.data() + 8, 2, 2, &map, nullptr, out.data()));
}

// ---- CUDA (skipped without a device) -----------------------------------------------------------

EPLB_TEST(wrap_cuda_device_memory_runs_kernels_in_place) {
    require_cuda();
    // Device memory the "framework" owns: here an eplb buffer; the wrap covers part of it.
    const Tables t = random_tables(64, 80, 1);
    const int64_t tokens = 1000;
    const int32_t top_k = 6;
    const size_t pairs = size_t(tokens) * top_k;
    std::vector<int32_t> host(pairs * 2 + t.log2phy.size() + t.logcnt.size() + 80 + 1, 0);
    for (size_t i = 0; i < pairs; ++i) host[i] = int32_t(rng()() % 64);
    std::copy(t.log2phy.begin(), t.log2phy.end(), host.begin() + long(pairs * 2));
    std::copy(t.logcnt.begin(), t.logcnt.end(), host.begin() + long(pairs * 2 + t.log2phy.size()));
    host.back() = 1;
    Buffer<int32_t> framework(EPLB_BACKEND_CUDA, host.size() + 64);
    eplb_runtime_info_t info{};
    EPLB_EXPECT_OK(eplb_get_runtime_info(&info));
    int32_t* base = framework.data() + 16;
    Wrap wrap(EPLB_BACKEND_CUDA, info.device, base, host.size() * 4);
    EPLB_EXPECT_OK(eplb_buffer_write(wrap.get(), 0, host.data(), host.size() * 4, nullptr));
    int32_t* ids = base;
    int32_t* out = ids + pairs;
    int32_t* log2phy = out + pairs;
    int32_t* logcnt = log2phy + t.log2phy.size();
    int32_t* counters = logcnt + t.logcnt.size();
    int32_t* flag = counters + 80;
    Stream stream(EPLB_BACKEND_CUDA);
    const eplb_expert_map_t map{log2phy, logcnt, counters, flag, 64, t.max_replicas, 80, 0, 0, 0};
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(stream.get(), ids, tokens, top_k, &map, nullptr, out));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    // The CPU reference on host copies.
    std::vector<int32_t> cpu_out(pairs), cpu_counters(80, 0);
    const int32_t on = 1;
    const eplb_expert_map_t cpu_map{t.log2phy.data(), t.logcnt.data(), cpu_counters.data(), &on, 64, t.max_replicas, 80, 0, 0, 0};
    Stream cpu(EPLB_BACKEND_CPU);
    EPLB_EXPECT_OK(eplb_map_logical_to_physical(cpu.get(), host.data(), tokens, top_k, &cpu_map, nullptr, cpu_out.data()));
    // Seen through the framework's own buffer: the kernel wrote in place.
    const auto all = framework.read();
    EPLB_EXPECT(std::vector<int32_t>(all.begin() + 16 + long(pairs), all.begin() + 16 + long(pairs * 2)) == cpu_out);
    const long c0 = 16 + long(pairs * 2 + t.log2phy.size() + t.logcnt.size());
    EPLB_EXPECT(std::vector<int32_t>(all.begin() + c0, all.begin() + c0 + 80) == cpu_counters);
}

EPLB_TEST(wrap_cuda_refuses_memory_the_device_cannot_use_and_destroy_keeps_it) {
    require_cuda();
    eplb_runtime_info_t info{};
    EPLB_EXPECT_OK(eplb_get_runtime_info(&info));
    Buffer<int32_t> device(EPLB_BACKEND_CUDA, std::vector<int32_t>{1, 2, 3, 4});
    // Device memory wrapped as host memory, and a size that runs past the allocation.
    eplb_buffer_t* out = nullptr;
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CPU, -1, device.data(), 16, &out), "wrap it with EPLB_BACKEND_CUDA");
    EXPECT_INVALID_NAMING(eplb_buffer_wrap(EPLB_BACKEND_CUDA, info.device, device.data(), uint64_t(1) << 40, &out),
                          "the last byte of data");
    EPLB_EXPECT(out == nullptr);
    {
        Wrap wrap(EPLB_BACKEND_CUDA, info.device, device.data(), 16);
        const int32_t seven = 7;
        EPLB_EXPECT_OK(eplb_buffer_fill(wrap.get(), 4, 1, &seven, 4, nullptr));
    }
    // Destroyed wrap, memory intact and usable through its owner.
    EPLB_EXPECT(device.read() == (std::vector<int32_t>{1, 7, 3, 4}));
}
