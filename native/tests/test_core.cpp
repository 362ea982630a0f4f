// Tests of the core ABI: versions, statuses, runtime info, buffers, streams.
#include "eplb_abi_layout.g.h"  // static_asserts on struct sizes/offsets, generated from eplb.h
#include "test_util.hpp"

using namespace eplb::test;

EPLB_TEST(core_versions) {
    EPLB_EXPECT_EQ(eplb_abi_version(), uint32_t(EPLB_ABI_VERSION));
    EPLB_EXPECT(std::strlen(eplb_version_string()) >= 5);
}

EPLB_TEST(core_status_strings_and_last_error) {
    for (int s = 0; s <= 9; ++s) EPLB_EXPECT(std::strlen(eplb_status_string(eplb_status_t(s))) > 0);
    EPLB_EXPECT_EQ(std::string(eplb_status_string(eplb_status_t(1234))), std::string("unknown status"));
    EPLB_EXPECT_STATUS(eplb_get_runtime_info(nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("info") != std::string::npos);
}

EPLB_TEST(core_runtime_info_consistent) {
    eplb_runtime_info_t info{};
    EPLB_EXPECT_OK(eplb_get_runtime_info(&info));
    EPLB_EXPECT_EQ(info.abi_version, uint32_t(EPLB_ABI_VERSION));
    const eplb_status_t cuda = eplb_backend_available(EPLB_BACKEND_CUDA);
    if (!info.cuda_compiled) {
        EPLB_EXPECT_EQ(cuda, EPLB_STATUS_NOT_COMPILED);
        EPLB_EXPECT_EQ(info.device_count, 0);
    } else if (info.device_count == 0) {
        EPLB_EXPECT_EQ(cuda, EPLB_STATUS_NO_DEVICE);
        EPLB_EXPECT(std::strlen(info.last_cuda_error_string) > 0);  // says why
        EPLB_EXPECT_EQ(info.device, -1);
    } else {
        EPLB_EXPECT_EQ(cuda, EPLB_STATUS_OK);
        EPLB_EXPECT(info.sm_count > 0);
        EPLB_EXPECT(info.compute_capability_major >= 7);
    }
    EPLB_EXPECT_OK(eplb_backend_available(EPLB_BACKEND_CPU));
    EPLB_EXPECT_STATUS(eplb_backend_available(eplb_backend_t(5)), EPLB_STATUS_INVALID_ARGUMENT);
}

static void buffer_round_trip(eplb_backend_t backend) {
    Stream stream(backend);
    const size_t count = 1 + rng()() % 5000;
    std::vector<int32_t> values(count);
    for (auto& v : values) v = int32_t(rng()());
    Buffer<int32_t> a(backend, values);
    EPLB_EXPECT(a.read() == values);
    // Copy into the middle of a second buffer, fill a pattern around it.
    Buffer<int32_t> b(backend, count + 8);
    const int32_t pattern = -77;
    EPLB_EXPECT_OK(eplb_buffer_fill(b.handle(), 0, count + 8, &pattern, 4, stream.get()));
    EPLB_EXPECT_OK(eplb_buffer_copy(b.handle(), 16, a.handle(), 0, count * 4, stream.get()));
    EPLB_EXPECT_OK(eplb_stream_synchronize(stream.get()));
    const auto got = b.read();
    for (size_t i = 0; i < count + 8; ++i) {
        const int32_t want = (i >= 4 && i < 4 + count) ? values[i - 4] : pattern;
        EPLB_EXPECT_EQ(got[i], want);
    }
    // 1-, 2- and 8-byte patterns.
    const uint16_t half = 0xBEEF;
    EPLB_EXPECT_OK(eplb_buffer_fill(b.handle(), 2, 3, &half, 2, stream.get()));
    const uint8_t byte = 0x5A;
    EPLB_EXPECT_OK(eplb_buffer_fill(b.handle(), 8, 4, &byte, 1, stream.get()));
    const uint64_t wide = 0x0123456789ABCDEFull;
    EPLB_EXPECT_OK(eplb_buffer_fill(b.handle(), 16, 1, &wide, 8, stream.get()));
    EPLB_EXPECT_OK(eplb_stream_synchronize(stream.get()));
    std::vector<uint8_t> bytes(24);
    EPLB_EXPECT_OK(eplb_buffer_read(b.handle(), 0, bytes.data(), 24, stream.get()));
    EPLB_EXPECT_EQ(int(bytes[2]), 0xEF);
    EPLB_EXPECT_EQ(int(bytes[3]), 0xBE);
    EPLB_EXPECT_EQ(int(bytes[7]), 0xBE);
    EPLB_EXPECT_EQ(int(bytes[8]), 0x5A);
    EPLB_EXPECT_EQ(int(bytes[11]), 0x5A);
    uint64_t read_wide = 0;
    std::memcpy(&read_wide, bytes.data() + 16, 8);
    EPLB_EXPECT_EQ(read_wide, wide);
}

EPLB_TEST(core_buffers_cpu) { buffer_round_trip(EPLB_BACKEND_CPU); }

EPLB_TEST(core_buffers_cuda) {
    require_cuda();
    buffer_round_trip(EPLB_BACKEND_CUDA);
    // Host <-> device buffer copies.
    Buffer<int32_t> host(EPLB_BACKEND_CPU, std::vector<int32_t>{1, 2, 3, 4});
    Buffer<int32_t> device(EPLB_BACKEND_CUDA, 4);
    EPLB_EXPECT_OK(eplb_buffer_copy(device.handle(), 0, host.handle(), 0, 16, nullptr));
    Buffer<int32_t> back(EPLB_BACKEND_CPU, 4);
    EPLB_EXPECT_OK(eplb_buffer_copy(back.handle(), 0, device.handle(), 0, 16, nullptr));
    EPLB_EXPECT(back.read() == (std::vector<int32_t>{1, 2, 3, 4}));
}

EPLB_TEST(core_buffer_bad_input) {
    eplb_buffer_t* buffer = nullptr;
    EPLB_EXPECT_STATUS(eplb_buffer_create(EPLB_BACKEND_CPU, 16, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_buffer_create(eplb_backend_t(9), 16, &buffer), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(buffer == nullptr);
    EPLB_EXPECT_OK(eplb_buffer_create(EPLB_BACKEND_CPU, 16, &buffer));
    int32_t values[8] = {};
    EPLB_EXPECT_STATUS(eplb_buffer_write(buffer, 8, values, 16, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("exceeds the buffer size 16") != std::string::npos);
    EPLB_EXPECT_STATUS(eplb_buffer_read(buffer, 0, values, 17, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    const int32_t pattern = 1;
    EPLB_EXPECT_STATUS(eplb_buffer_fill(buffer, 0, 4, &pattern, 3, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_buffer_fill(buffer, 2, 1, &pattern, 4, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_buffer_fill(buffer, 0, 5, &pattern, 4, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_buffer_copy(buffer, 0, buffer, 4, 8, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_OK(eplb_buffer_destroy(buffer));
    EPLB_EXPECT_OK(eplb_buffer_destroy(nullptr));
    EPLB_EXPECT_OK(eplb_stream_destroy(nullptr));
}

EPLB_TEST(core_cuda_unavailable_is_reported) {
    const eplb_status_t available = eplb_backend_available(EPLB_BACKEND_CUDA);
    if (available == EPLB_STATUS_OK) EPLB_SKIP("a CUDA device is present");
    eplb_buffer_t* buffer = nullptr;
    eplb_stream_t* stream = nullptr;
    EPLB_EXPECT_STATUS(eplb_buffer_create(EPLB_BACKEND_CUDA, 16, &buffer), available);
    EPLB_EXPECT_STATUS(eplb_stream_create(EPLB_BACKEND_CUDA, &stream), available);
    EPLB_EXPECT(buffer == nullptr && stream == nullptr);
    EPLB_EXPECT(std::strlen(eplb_last_error_message()) > 0);
}

EPLB_TEST(core_streams) {
    Stream cpu(EPLB_BACKEND_CPU);
    eplb_backend_t backend = EPLB_BACKEND_CUDA;
    EPLB_EXPECT_OK(eplb_stream_get_backend(cpu.get(), &backend));
    EPLB_EXPECT_EQ(int(backend), int(EPLB_BACKEND_CPU));
    EPLB_EXPECT_OK(eplb_stream_synchronize(cpu.get()));
    uint32_t flags = 99;
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(cpu.get(), &flags));
    EPLB_EXPECT_EQ(flags, 0u);
    EPLB_EXPECT_STATUS(eplb_stream_synchronize(nullptr), EPLB_STATUS_INVALID_ARGUMENT);
}
