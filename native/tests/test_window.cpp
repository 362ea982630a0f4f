// Tests of the expert-load window (eplb_load_window_push / _discard): ring contents, 64-bit sums
// past 2^31, dummy passes, bad input, and CUDA == CPU.
#include "test_util.hpp"

using namespace eplb::test;

namespace {

// Pushes random passes through the ring on one backend; checks sums == sum of the last W passes.
void run_ring(eplb_backend_t backend, int64_t count, int32_t window_size, int passes, bool huge) {
    Stream stream(backend);
    Buffer<int32_t> pass(backend, size_t(count));
    Buffer<int32_t> window(backend, std::vector<int32_t>(size_t(count) * window_size, 0));
    Buffer<int64_t> sums(backend, std::vector<int64_t>(size_t(count), 0));
    std::vector<std::vector<int32_t>> history;
    for (int p = 0; p < passes; ++p) {
        std::vector<int32_t> values(static_cast<size_t>(count));
        for (auto& v : values) v = huge ? int32_t(2000000000 - int32_t(rng()() % 1000)) : int32_t(rng()() % 5000);
        pass.write(values);
        const int32_t slot = p % window_size;
        EPLB_EXPECT_OK(eplb_load_window_push(stream.get(), pass.data(), window.data(), sums.data(), count, window_size, slot));
        EPLB_EXPECT_OK(eplb_stream_synchronize(stream.get()));
        history.push_back(values);
        // The pass counters restart from zero.
        const auto cleared = pass.read();
        EPLB_EXPECT(std::all_of(cleared.begin(), cleared.end(), [](int32_t v) { return v == 0; }));
        // Sums are the 64-bit totals of the last window_size passes.
        const auto got = sums.read();
        for (int64_t i = 0; i < count; ++i) {
            int64_t want = 0;
            for (int q = std::max(0, p - window_size + 1); q <= p; ++q) want += history[size_t(q)][size_t(i)];
            EPLB_EXPECT_EQ(got[size_t(i)], want);
        }
        // The ring row holds the pass just pushed.
        const auto ring = window.read();
        for (int64_t i = 0; i < count; ++i) EPLB_EXPECT_EQ(ring[size_t(slot * count + i)], values[size_t(i)]);
    }
}

}  // namespace

EPLB_TEST(window_ring_sums_cpu) {
    run_ring(EPLB_BACKEND_CPU, 1 + int64_t(rng()() % 300), 1 + int32_t(rng()() % 5), 12, false);
    run_ring(EPLB_BACKEND_CPU, 58 * 288, 3, 7, false);
}

EPLB_TEST(window_sums_exceed_int32) {
    // Three passes of ~2e9 each: the window sum (~6e9) only fits in 64 bits.
    run_ring(EPLB_BACKEND_CPU, 17, 3, 5, true);
}

EPLB_TEST(window_discard_zeroes_without_recording) {
    Stream stream(EPLB_BACKEND_CPU);
    Buffer<int32_t> pass(EPLB_BACKEND_CPU, std::vector<int32_t>{5, 6, 7});
    EPLB_EXPECT_OK(eplb_load_window_discard(stream.get(), pass.data(), 3));
    EPLB_EXPECT(pass.read() == (std::vector<int32_t>{0, 0, 0}));
    EPLB_EXPECT_OK(eplb_load_window_discard(stream.get(), nullptr, 0));  // a stage with no MoE layer
    EPLB_EXPECT_OK(eplb_load_window_push(stream.get(), nullptr, nullptr, nullptr, 0, 4, 0));
}

EPLB_TEST(window_bad_input) {
    Stream stream(EPLB_BACKEND_CPU);
    std::vector<int32_t> pass = {1, 2}, window(4, 9);
    std::vector<int64_t> sums = {3, 4};
    EPLB_EXPECT_STATUS(eplb_load_window_push(stream.get(), pass.data(), window.data(), sums.data(), 2, 2, 2),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("slot") != std::string::npos);
    EPLB_EXPECT_STATUS(eplb_load_window_push(stream.get(), pass.data(), window.data(), sums.data(), 2, 0, 0),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_load_window_push(stream.get(), pass.data(), nullptr, sums.data(), 2, 2, 0),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_load_window_push(stream.get(), pass.data(), window.data(), sums.data(), -1, 2, 0),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_load_window_push(nullptr, pass.data(), window.data(), sums.data(), 2, 2, 0),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(pass == (std::vector<int32_t>{1, 2}));
    EPLB_EXPECT(window == (std::vector<int32_t>(4, 9)));
    EPLB_EXPECT(sums == (std::vector<int64_t>{3, 4}));
}

EPLB_TEST(window_cuda_matches_cpu) {
    require_cuda();
    for (int iteration = 0; iteration < 5; ++iteration) {
        const int64_t count = 1 + int64_t(rng()() % 40000);
        const int32_t window_size = 1 + int32_t(rng()() % 6);
        run_ring(EPLB_BACKEND_CUDA, count, window_size, 9, iteration == 0);
    }
}
