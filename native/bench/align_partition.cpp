// What the CPU can say about the CUDA align before a GPU has run it: for DeepSeek-V3 shapes (top-8
// of 256 slots, rank 0 of 8 = 32 local experts, or all 256 on one rank), how the pairs split over
// blocks and warps (common/bucket_partition.hpp) and how long the longest warp's walk is, for the
// one-block kernel and for the several-block path; and, for scale, the CPU reference (eplb_dispatch_align
// on the CPU backend, median of 20 runs). Built without CUDA too; prints a Markdown table.
//
// "walk" is the pairs the busiest warp reads per pass (the kernels read the batch twice: count and
// place); on one SM the one-block kernel's time grows with it, the several-block path spreads it
// over `blocks` SMs at the price of two more launches.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common/bucket_partition.hpp"
#include "eplb/eplb.h"

namespace {

constexpr int32_t kTopK = 8;
constexpr int32_t kSlots = 256;
constexpr int32_t kBlockSize = 128;
constexpr int kMaxWarps = 32;

// Warps the kernels get: as many as fit 2 x B ints each next to the fixed part in 227 KiB (H100).
int warps_for(int32_t buckets) {
    const long shared = 232448, fixed = (2L * buckets + 1 + kMaxWarps) * 4, per_warp = 2L * buckets * 4;
    return int(std::min<long>(kMaxWarps, (shared - fixed) / per_warp));
}

double cpu_align_us(const std::vector<int32_t>& ids, int64_t tokens, int32_t experts) {
    int64_t capacity = 0;
    eplb_dispatch_align_capacity(tokens * kTopK, experts, kBlockSize, &capacity);
    std::vector<int32_t> counts(static_cast<size_t>(experts)), offsets(static_cast<size_t>(experts) + 1),
        sorted(static_cast<size_t>(capacity)), blocks(static_cast<size_t>(capacity / kBlockSize) + 1),
        positions(ids.size());
    eplb_stream_t* stream = nullptr;
    eplb_stream_create(EPLB_BACKEND_CPU, &stream);
    std::vector<double> times;
    for (int run = 0; run < 21; ++run) {
        const auto start = std::chrono::steady_clock::now();
        const eplb_status_t status =
            eplb_dispatch_align(stream, ids.data(), tokens, kTopK, 0, experts, kBlockSize, capacity, counts.data(),
                                offsets.data(), sorted.data(), blocks.data(), positions.data());
        const auto stop = std::chrono::steady_clock::now();
        if (status != EPLB_STATUS_OK) {
            std::fprintf(stderr, "eplb_dispatch_align: %s\n", eplb_last_error_message());
            std::exit(1);
        }
        if (run > 0) times.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    }
    eplb_stream_destroy(stream);
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

}  // namespace

int main() {
    std::mt19937 rng(7);
    std::printf("| T | local experts | pairs | one block: warps, walk | several: blocks x warps, walk | launches | CPU reference us |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int64_t tokens : {128, 1024, 2048, 4096, 16384, 65536}) {
        const int64_t pairs = tokens * kTopK;
        std::vector<int32_t> ids(static_cast<size_t>(pairs));
        std::vector<int32_t> slots(kSlots);
        for (int64_t t = 0; t < tokens; ++t) {  // distinct uniform top-8, as bench_dispatch draws them
            for (int32_t s = 0; s < kSlots; ++s) slots[size_t(s)] = s;
            for (int32_t k = 0; k < kTopK; ++k) {
                std::swap(slots[size_t(k)], slots[size_t(k + int32_t(rng() % uint32_t(kSlots - k)))]);
                ids[size_t(t * kTopK + k)] = slots[size_t(k)];
            }
        }
        for (int32_t experts : {32, 256}) {
            const int warps = warps_for(experts);
            const int64_t one_walk = (pairs + warps - 1) / warps;
            const int32_t grid = eplb::bucket::block_count(pairs, experts);
            int64_t walk = 0;
            for (int32_t c = 0; c < grid; ++c) {
                const int64_t begin = eplb::bucket::block_begin(c, grid, pairs);
                const int64_t end = eplb::bucket::block_begin(c + 1, grid, pairs);
                walk = std::max(walk, eplb::bucket::warp_begin(1, warps, begin, end) - begin);
            }
            std::printf("| %lld | %d | %lld | %d, %lld | %s | %d | %.1f |\n", (long long)tokens, experts, (long long)pairs,
                        warps, (long long)one_walk,
                        grid == 1 ? "(one block)"
                                  : (std::to_string(grid) + " x " + std::to_string(warps) + ", " + std::to_string(walk)).c_str(),
                        grid == 1 ? 1 : 3, cpu_align_us(ids, tokens, experts));
        }
    }
    return 0;
}
