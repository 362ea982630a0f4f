// How the CUDA align and EP bucketing (cuda/dispatch.cu) split the pairs over blocks and warps, as
// host/device functions so a CPU test replays the decomposition against the CPU reference
// (tests/test_bucket_partition.cpp). Nothing here touches memory.
//
// Stability comes from the order of the pieces: block c owns a contiguous range of pairs that
// precedes block c + 1's, warp w of a block a contiguous sub-range that precedes warp w + 1's, and
// a warp walks its range in tiles of 32 consecutive pairs. A pair's row is therefore its bucket's
// first row + the bucket's pairs in earlier blocks + those in earlier warps of its block + those in
// earlier tiles of its warp + those on lower lanes of its tile: its rank in ascending pair order,
// as the CPU reference places it.
//
// Several blocks (batches of at least kSplitPairs pairs) take three launches:
//   count  block c counts its range per bucket into its scratch row;
//   scan   one block turns the rows, per bucket in block order, into each block's first row;
//   place  block c reads its row, then places its range as the one-block kernel does, and pads.
// The scratch row of block c is the first B entries of its own range of pair_positions (an output
// of the same call): only block c writes that range later, after it has read its row, so the
// several-block path needs no workspace and stays legal in a CUDA graph. Every block's range must
// hold at least B pairs for that; block_count guarantees it.
#pragma once

#include <cstdint>

#include "hostdevice.hpp"

namespace eplb::bucket {

// Batches below this many pairs run the one-block kernel (one launch); from it on, several blocks.
// A first guess from the kernels' structure: the one-block kernel walks the batch twice with 32
// warps of one SM, so its time grows with the batch, while three launches cost a few microseconds
// whatever the size. The crossover is for the GPU benchmark to pin down (docs/benchmarks.md).
constexpr int64_t kSplitPairs = 16384;
// Each block of the several-block path owns at least this many pairs (and at least B).
constexpr int64_t kMinBlockPairs = 4096;
// At most this many blocks, and at most kMaxScanEntries (blocks x buckets) for the one-block scan.
constexpr int32_t kMaxBlocks = 256;
constexpr int64_t kMaxScanEntries = int64_t(1) << 16;

// Blocks for num_pairs pairs in num_buckets buckets: 1 below split_pairs, else as many as keep
// every range >= max(B, kMinBlockPairs) pairs, within kMaxBlocks and the scan budget.
EPLB_HD int32_t block_count(int64_t num_pairs, int32_t num_buckets, int64_t split_pairs = kSplitPairs) {
    if (num_pairs < split_pairs || num_buckets < 1) return 1;
    const int64_t min_pairs = num_buckets > kMinBlockPairs ? int64_t(num_buckets) : kMinBlockPairs;
    int64_t blocks = num_pairs / min_pairs;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    const int64_t scan_blocks = kMaxScanEntries / num_buckets;
    if (blocks > scan_blocks) blocks = scan_blocks;
    return blocks < 1 ? 1 : int32_t(blocks);
}

// First pair of block c of `blocks`: floor(c * N / blocks). Ranges differ by at most one pair, so
// each holds at least floor(N / blocks) pairs.
EPLB_HD int64_t block_begin(int32_t c, int32_t blocks, int64_t num_pairs) {
    return int64_t(c) * num_pairs / blocks;
}

// First pair of warp w of `warps` inside the block range [begin, end): ceil-sized pieces in order
// (the last ones may be short or empty).
EPLB_HD int64_t warp_begin(int w, int warps, int64_t begin, int64_t end) {
    const int64_t per_warp = (end - begin + warps - 1) / warps;
    const int64_t at = begin + int64_t(w) * per_warp;
    return at < end ? at : end;
}

// Where block c keeps its per-bucket counts, then its first rows, between the launches: entries
// [scratch_row(c), scratch_row(c) + B) of pair_positions, inside its own range.
EPLB_HD int64_t scratch_row(int32_t c, int32_t blocks, int64_t num_pairs) { return block_begin(c, blocks, num_pairs); }

}  // namespace eplb::bucket
