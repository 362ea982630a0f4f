// The block decomposition of the CUDA align / EP bucketing (src/common/bucket_partition.hpp) checked
// on the CPU: an emulation of the kernels of cuda/dispatch.cu (count per block into scratch rows
// inside pair_positions, scan per bucket over the blocks, then per block: per-warp counts, scan over
// warps, placement in tiles of 32 lanes, padding) built on the same index functions must equal the
// CPU reference bit for bit. Blocks of a launch run in a shuffled order (the GPU promises none), so
// a scratch row that another block overwrites, or a block that depends on another's progress, shows
// up as a wrong result. The GPU tests in test_dispatch.cpp run the kernels themselves.
#include <numeric>

#include "common/bucket_partition.hpp"
#include "common/dispatch.hpp"
#include "test_util.hpp"

using namespace eplb::test;
namespace bucket = eplb::bucket;

namespace {

constexpr int32_t kPad = EPLB_DISPATCH_PADDING;
constexpr int32_t kPoison = int32_t(0x7EADBEEF);
constexpr int kWarpSize = 32;

struct Layout {
    std::vector<int32_t> counts, offsets, sorted, blocks, positions;
};

// The CPU reference through the ABI.
Layout reference(const std::vector<int32_t>& ids, int32_t first, int32_t experts, int32_t block_size) {
    const int64_t pairs = int64_t(ids.size());
    int64_t capacity = 0;
    EPLB_EXPECT_OK(eplb_dispatch_align_capacity(pairs, experts, block_size, &capacity));
    Layout out{std::vector<int32_t>(size_t(experts)), std::vector<int32_t>(size_t(experts) + 1),
               std::vector<int32_t>(size_t(std::max<int64_t>(capacity, 1))),
               std::vector<int32_t>(size_t(std::max<int64_t>(capacity / block_size, 1))),
               std::vector<int32_t>(std::max<size_t>(ids.size(), 1))};
    Stream stream(EPLB_BACKEND_CPU);
    EPLB_EXPECT_OK(eplb_dispatch_align(stream.get(), ids.data(), pairs, 1, first, experts, block_size, capacity,
                                       out.counts.data(), out.offsets.data(), out.sorted.data(), out.blocks.data(),
                                       out.positions.data()));
    out.sorted.resize(size_t(capacity));
    out.blocks.resize(size_t(capacity / block_size));
    out.positions.resize(ids.size());
    return out;
}

// One warp's placement as place_warp_range does it: tiles of 32 consecutive pairs, a pair's row is
// its bucket's cursor + the lanes below it with the same bucket, then the cursor moves past the tile.
void place_warp(const std::vector<int32_t>& ids, int64_t begin, int64_t end, const eplb::LocalExpertOf& bucket_of,
                std::vector<int32_t>& cursor, Layout& out) {
    bool bad = false;
    for (int64_t base = begin; base < end; base += kWarpSize) {
        int32_t lane_bucket[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane) {
            const int64_t pair = base + lane;
            lane_bucket[lane] = pair < end ? bucket_of(ids[size_t(pair)], &bad) : eplb::kNoBucket;
        }
        std::vector<int32_t> advance(cursor.size(), 0);
        for (int lane = 0; lane < kWarpSize; ++lane) {
            const int64_t pair = base + lane;
            const int32_t b = lane_bucket[lane];
            if (b == eplb::kNoBucket) {
                if (pair < end) out.positions[size_t(pair)] = kPad;
                continue;
            }
            int rank = 0;
            for (int below = 0; below < lane; ++below) rank += lane_bucket[below] == b;
            const int32_t row = cursor[size_t(b)] + rank;
            out.sorted[size_t(row)] = int32_t(pair);
            out.positions[size_t(pair)] = row;
            ++advance[size_t(b)];
        }
        for (size_t b = 0; b < cursor.size(); ++b) cursor[b] += advance[b];
    }
}

// Steps 1-3 of one block on [begin, end) from its first rows: per-warp counts, scan over warps, place.
void run_block(const std::vector<int32_t>& ids, int64_t begin, int64_t end, const eplb::LocalExpertOf& bucket_of,
               int32_t buckets, int warps, const std::vector<int32_t>& first, Layout& out) {
    // Count per warp, then scan over warps from the block's first rows (scan_warps).
    bool bad = false;
    std::vector<std::vector<int32_t>> count(size_t(warps), std::vector<int32_t>(size_t(buckets), 0));
    for (int w = 0; w < warps; ++w)
        for (int64_t p = bucket::warp_begin(w, warps, begin, end); p < bucket::warp_begin(w + 1, warps, begin, end); ++p)
            if (const int32_t b = bucket_of(ids[size_t(p)], &bad); b != eplb::kNoBucket) ++count[size_t(w)][size_t(b)];
    std::vector<std::vector<int32_t>> start(size_t(warps), std::vector<int32_t>(size_t(buckets), 0));
    for (int32_t b = 0; b < buckets; ++b) {
        int32_t running = first[size_t(b)];
        for (int w = 0; w < warps; ++w) {
            start[size_t(w)][size_t(b)] = running;
            running += count[size_t(w)][size_t(b)];
        }
    }
    for (int w = 0; w < warps; ++w)
        place_warp(ids, bucket::warp_begin(w, warps, begin, end), bucket::warp_begin(w + 1, warps, begin, end), bucket_of,
                   start[size_t(w)], out);
}

// Step 4 (all blocks together): padding rows, the tail and each row block's bucket.
void pad(int32_t buckets, int32_t block_size, Layout& out) {
    const int32_t total = out.offsets[size_t(buckets)];
    for (int32_t b = 0; b < buckets; ++b)
        for (int32_t row = out.offsets[size_t(b)] + out.counts[size_t(b)]; row < out.offsets[size_t(b) + 1]; ++row)
            out.sorted[size_t(row)] = kPad;
    for (size_t row = size_t(total); row < out.sorted.size(); ++row) out.sorted[row] = kPad;
    for (size_t block = 0; block < out.blocks.size(); ++block) {
        const int64_t row = int64_t(block) * block_size;
        int32_t owner = kPad;
        if (row < total) owner = int32_t(std::upper_bound(out.offsets.begin(), out.offsets.end() - 1, row) - out.offsets.begin()) - 1;
        out.blocks[block] = owner;
    }
}

// The whole GPU algorithm with `grid` blocks of `warps` warps (grid 1: the one-block kernel).
Layout emulate(const std::vector<int32_t>& ids, int32_t first_slot, int32_t buckets, int32_t block_size, int32_t grid,
               int warps) {
    const int64_t pairs = int64_t(ids.size());
    const eplb::LocalExpertOf bucket_of{first_slot, buckets};
    int64_t capacity = 0;
    EPLB_EXPECT_OK(eplb_dispatch_align_capacity(pairs, buckets, block_size, &capacity));
    Layout out{std::vector<int32_t>(size_t(buckets), kPoison), std::vector<int32_t>(size_t(buckets) + 1, kPoison),
               std::vector<int32_t>(size_t(capacity), kPoison), std::vector<int32_t>(size_t(capacity / block_size), kPoison),
               std::vector<int32_t>(ids.size(), kPoison)};
    bool bad = false;
    std::vector<int32_t> order(static_cast<size_t>(grid));
    std::iota(order.begin(), order.end(), 0);
    std::vector<int32_t> first(size_t(buckets), 0);
    if (grid == 1) {
        // Counts and offsets in-kernel, then the block from offsets.
        for (int32_t id : ids)
            if (const int32_t b = bucket_of(id, &bad); b != eplb::kNoBucket) ++first[size_t(b)];
        out.counts = first;
    } else {
        // Launch 1: block c counts its range into its scratch row.
        std::shuffle(order.begin(), order.end(), rng());
        for (int32_t c : order) {
            const int64_t begin = bucket::block_begin(c, grid, pairs), end = bucket::block_begin(c + 1, grid, pairs);
            const int64_t row = bucket::scratch_row(c, grid, pairs);
            if (row < begin || row + buckets > end) EPLB_FAIL("block " << c << " of " << grid << ": scratch row outside its range");
            std::vector<int32_t> count(size_t(buckets), 0);
            for (int64_t p = begin; p < end; ++p)
                if (const int32_t b = bucket_of(ids[size_t(p)], &bad); b != eplb::kNoBucket) ++count[size_t(b)];
            std::copy(count.begin(), count.end(), out.positions.begin() + row);
        }
        // Launch 2: per bucket, in block order, each block's earlier pairs of the bucket; the totals.
        for (int32_t b = 0; b < buckets; ++b) {
            int32_t running = 0;
            for (int32_t c = 0; c < grid; ++c) {
                int32_t& entry = out.positions[size_t(bucket::scratch_row(c, grid, pairs) + b)];
                const int32_t count = entry;
                entry = running;
                running += count;
            }
            out.counts[size_t(b)] = running;
        }
    }
    out.offsets[0] = 0;
    for (int32_t b = 0; b < buckets; ++b)
        out.offsets[size_t(b) + 1] = out.offsets[size_t(b)] + eplb::round_up(out.counts[size_t(b)], block_size);
    if (grid == 1) {
        std::copy(out.offsets.begin(), out.offsets.end() - 1, first.begin());
        run_block(ids, 0, pairs, bucket_of, buckets, warps, first, out);
    } else {
        // Launch 3: each block reads its row (before its range is written), then counts, scans, places.
        std::shuffle(order.begin(), order.end(), rng());
        for (int32_t c : order) {
            const int64_t row = bucket::scratch_row(c, grid, pairs);
            for (int32_t b = 0; b < buckets; ++b) first[size_t(b)] = out.offsets[size_t(b)] + out.positions[size_t(row + b)];
            run_block(ids, bucket::block_begin(c, grid, pairs), bucket::block_begin(c + 1, grid, pairs), bucket_of, buckets,
                      warps, first, out);
        }
    }
    pad(buckets, block_size, out);
    return out;
}

void expect_equal(const Layout& got, const Layout& want, const std::string& what) {
    if (got.counts != want.counts) EPLB_FAIL(what << ": counts differ");
    if (got.offsets != want.offsets) EPLB_FAIL(what << ": offsets differ");
    if (got.sorted != want.sorted) EPLB_FAIL(what << ": sorted_pair_ids differ");
    if (got.blocks != want.blocks) EPLB_FAIL(what << ": block_experts differ");
    if (got.positions != want.positions) EPLB_FAIL(what << ": pair_positions differ");
}

std::vector<int32_t> random_ids(int64_t pairs, int32_t hi) {
    std::vector<int32_t> ids(static_cast<size_t>(pairs));
    for (auto& id : ids) id = int32_t(rng()() % uint64_t(hi + 2)) - 1;  // -1 (unrouted) .. hi
    return ids;
}

}  // namespace

EPLB_TEST(bucket_partition_block_count_keeps_every_range_large_enough) {
    for (int round = 0; round < 2000; ++round) {
        const int64_t pairs = int64_t(rng()() % 3000000);
        const int32_t buckets = 1 + int32_t(rng()() % EPLB_DISPATCH_MAX_BUCKETS);
        const int32_t grid = bucket::block_count(pairs, buckets);
        EPLB_EXPECT(grid >= 1 && grid <= bucket::kMaxBlocks);
        if (pairs < bucket::kSplitPairs) EPLB_EXPECT_EQ(grid, 1);
        if (grid == 1) continue;
        EPLB_EXPECT(int64_t(grid) * buckets <= bucket::kMaxScanEntries);
        for (int32_t c = 0; c < grid; ++c) {
            const int64_t size = bucket::block_begin(c + 1, grid, pairs) - bucket::block_begin(c, grid, pairs);
            if (size < std::max<int64_t>(buckets, bucket::kMinBlockPairs))
                EPLB_FAIL(pairs << " pairs, " << buckets << " buckets, " << grid << " blocks: block " << c << " holds " << size);
        }
        EPLB_EXPECT_EQ(bucket::block_begin(0, grid, pairs), int64_t(0));
        EPLB_EXPECT_EQ(bucket::block_begin(grid, grid, pairs), pairs);
    }
    // The DeepSeek-V3 shapes: 16384 tokens x top-8, 32 or 256 local experts.
    EPLB_EXPECT_EQ(bucket::block_count(16384 * 8, 32), int32_t(32));
    EPLB_EXPECT_EQ(bucket::block_count(16384 * 8, 256), int32_t(32));
    EPLB_EXPECT_EQ(bucket::block_count(4096 * 8, 256), int32_t(8));
    EPLB_EXPECT_EQ(bucket::block_count(1024 * 8, 256), int32_t(1));
}

EPLB_TEST(bucket_partition_warp_ranges_tile_the_block_in_order) {
    for (int round = 0; round < 500; ++round) {
        const int64_t begin = int64_t(rng()() % 100000), end = begin + int64_t(rng()() % 5000);
        const int warps = 1 + int(rng()() % 32);
        EPLB_EXPECT_EQ(bucket::warp_begin(0, warps, begin, end), begin);
        EPLB_EXPECT_EQ(bucket::warp_begin(warps, warps, begin, end), end);
        for (int w = 0; w < warps; ++w)
            EPLB_EXPECT(bucket::warp_begin(w, warps, begin, end) <= bucket::warp_begin(w + 1, warps, begin, end));
    }
}

EPLB_TEST(bucket_partition_emulation_equals_cpu_reference_random) {
    for (int round = 0; round < 24; ++round) {
        const int32_t buckets = round == 0 ? 1 : round == 1 ? 4096 : 1 + int32_t(rng()() % 300);
        const int32_t first_slot = int32_t(rng()() % 50);
        const int32_t block_size = int32_t(1) << (rng()() % 8);
        const int64_t pairs = round == 2 ? 0 : int64_t(rng()() % 60000) + (round == 1 ? 20000 : 0);
        const auto ids = random_ids(pairs, first_slot + buckets + 20);
        const Layout want = reference(ids, first_slot, buckets, block_size);
        const int32_t grid = bucket::block_count(pairs, buckets, /*split_pairs=*/0);
        for (int warps : {1, 3, 32}) {
            const std::string what = std::to_string(pairs) + " pairs, " + std::to_string(buckets) + " buckets, block " +
                                     std::to_string(block_size) + ", " + std::to_string(warps) + " warps";
            expect_equal(emulate(ids, first_slot, buckets, block_size, 1, warps), want, what + ", one block");
            if (grid > 1) expect_equal(emulate(ids, first_slot, buckets, block_size, grid, warps), want,
                                       what + ", " + std::to_string(grid) + " blocks");
        }
    }
}

EPLB_TEST(bucket_partition_emulation_equals_cpu_reference_real_loads) {
    // DeepSeek-V3 layer 30 of two dumps, 16384 tokens x top-8: rank 0 of 8 (32 experts) and all 256.
    for (const std::string file : {"decode_in1000out1000", "prefill_in4096"}) {
        const auto rows = read_load_file(file);
        const auto ids = sample_topk(rows[30], 16384, 8);
        for (auto [first, experts] : {std::pair{0, 32}, std::pair{0, 256}, std::pair{96, 32}}) {
            const int32_t grid = bucket::block_count(int64_t(ids.size()), experts);
            EPLB_EXPECT(grid > 1);
            for (int32_t block_size : {1, 128})
                expect_equal(emulate(ids, first, experts, block_size, grid, 32), reference(ids, first, experts, block_size),
                             file + " experts " + std::to_string(experts));
        }
    }
}
