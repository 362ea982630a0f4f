// Index math of the Mega MoE tensor-core tiles (cuda/moe.cu), as host/device functions so a CPU
// test can check it against an emulation of the PTX fragment layouts (ldmatrix.x4 and
// mma.m16n8k16, PTX ISA "Matrix fragments for mma.m16n8k16"). Nothing here touches memory.
//
// A block tile is kBlockM rows x kBlockN = 128 columns, K in steps of kBlockK = 64. Shared memory
// holds each operand row-major with 64 bf16 (eight 16-byte chunks) per row, chunk c of row r stored
// at chunk c ^ (r % 8) so that the eight rows one ldmatrix phase reads fall in eight different bank
// groups. GEMM1's B tile stacks 64 gate rows over the 64 up rows of the same intermediate columns.
#pragma once

#include <cstddef>
#include <cstdint>

#include "hostdevice.hpp"

namespace eplb::moe_tile {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockN = 128;
constexpr int kGateColumns = kBlockN / 2;
constexpr int kBlockK = 64;
constexpr int kChunksPerRow = kBlockK / 8;
constexpr int kLoadRowsPerPass = kThreads / kChunksPerRow;

template <int kBlockM_, int kWarpsM_, int kStages_, int kMinBlocks_>
struct TileConfig {
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kWarpsM = kWarpsM_;
    static constexpr int kWarpsN = kWarps / kWarpsM;
    static constexpr int kWarpM = kBlockM / kWarpsM;
    static constexpr int kWarpN = kBlockN / kWarpsN;
    static constexpr int kFragsM = kWarpM / 16;
    static constexpr int kFragsN = kWarpN / 8;
    static constexpr int kStages = kStages_;
    static constexpr int kMinBlocks = kMinBlocks_;
    static constexpr int kATileElems = kBlockM * kBlockK;
    static constexpr int kBTileElems = kBlockN * kBlockK;
    static constexpr int kStageElems = kATileElems + kBTileElems;
    static constexpr size_t kPipelineBytes = size_t(kStages) * kStageElems * sizeof(uint16_t);
    static_assert(kBlockM % kLoadRowsPerPass == 0 && kBlockN % kLoadRowsPerPass == 0, "loader rows");
    static_assert(kFragsN % 2 == 0, "B fragments are loaded in pairs");
};

// Decode: 32 x 128 tiles, 8 warps side by side (warp tile 32 x 16), 4 stages = 80 KiB, two blocks
// per SM on H100 so six 16 KiB weight tiles are in flight per SM.
using SmallTile = TileConfig<32, 1, 4, 2>;
// Prefill: 128 x 128 tiles, 2 x 4 warps (warp tile 64 x 32), 3 stages = 96 KiB (two blocks per SM
// on H100, one on A100).
using LargeTile = TileConfig<128, 2, 3, 2>;

// Dynamic shared memory of a Mega MoE kernel block for E local experts: the cp.async pipeline, then
// each expert's first permuted row and first m-tile (E + 1 entries each, totals last).
template <class Cfg>
EPLB_HD size_t moe_shared_bytes(int32_t num_local_experts) {
    return Cfg::kPipelineBytes + size_t(2 * (num_local_experts + 1)) * sizeof(int32_t);
}

// Element offset of 16-byte chunk `chunk` of shared-memory row `row`.
EPLB_HD int swizzle(int row, int chunk) { return row * kBlockK + ((chunk ^ (row & 7)) << 3); }

// The loader: thread t copies chunk t % 8 of rows t / 8 + 32 j of both operands (16 bytes each).
EPLB_HD int load_chunk(int thread) { return thread % kChunksPerRow; }
EPLB_HD int load_row(int thread, int pass) { return thread / kChunksPerRow + pass * kLoadRowsPerPass; }

// GEMM1's B tile: shared row r < 64 holds gate row n_tile * 64 + r of W1, row 64 + r the up row
// intermediate + n_tile * 64 + r.
EPLB_HD int64_t gemm1_weight_row(int smem_row, int n_tile, int64_t intermediate) {
    const int64_t column = int64_t(n_tile) * kGateColumns + (smem_row % kGateColumns);
    return smem_row < kGateColumns ? column : intermediate + column;
}

// Row of the A tile whose address lane gives to ldmatrix.x4 for m16 fragment i: lanes 0-15 rows
// 0-15 (k chunk 0), lanes 16-31 rows 0-15 again (k chunk 1), so the four matrices come back as
// a0 (rows 0-7, k 0-7), a1 (rows 8-15, k 0-7), a2 (rows 0-7, k 8-15), a3 (rows 8-15, k 8-15).
template <class Cfg>
EPLB_HD int a_fragment_row(int warp, int lane, int i) {
    return (warp / Cfg::kWarpsN) * Cfg::kWarpM + i * 16 + (lane & 15);
}
EPLB_HD int a_fragment_chunk(int lane, int kk) { return 2 * kk + (lane >> 4); }

// First B-tile row of n8 fragment f of a warp. GEMM1 puts the warp's gate fragments first and the
// up fragments of the same columns after them, so one thread ends up holding gate and up of each
// output element; GEMM2's fragments are consecutive rows.
template <class Cfg, bool kGemm1>
EPLB_HD int b_fragment_base(int warp, int f) {
    const int warp_n = warp % Cfg::kWarpsN;
    if (kGemm1) {
        constexpr int kHalf = Cfg::kFragsN / 2;
        const int column = warp_n * (Cfg::kWarpN / 2) + 8 * (f % kHalf);
        return f < kHalf ? column : kGateColumns + column;
    }
    return warp_n * Cfg::kWarpN + 8 * f;
}

// Row of the B tile whose address lane gives to ldmatrix.x4 for fragment pair j (fragments 2j and
// 2j + 1): the four matrices come back as b[2j][0] (k 0-7), b[2j][1] (k 8-15), b[2j+1][0], b[2j+1][1].
template <class Cfg, bool kGemm1>
EPLB_HD int b_fragment_row(int warp, int lane, int j) {
    return b_fragment_base<Cfg, kGemm1>(warp, 2 * j + (lane >> 4)) + (lane & 7);
}
EPLB_HD int b_fragment_chunk(int lane, int kk) { return 2 * kk + ((lane >> 3) & 1); }

// Tile row of accumulator registers {0, 1} (half 0) or {2, 3} (half 1) of m16 fragment i.
template <class Cfg>
EPLB_HD int accumulator_row(int warp, int lane, int i, int half) {
    return (warp / Cfg::kWarpsN) * Cfg::kWarpM + i * 16 + (lane >> 2) + half * 8;
}

// Tile column of accumulator registers {0, 2} of fragment f (registers {1, 3} are the next
// column): for GEMM1 the intermediate column (0-63) of gate fragment f < kFragsN / 2, whose up
// partner is fragment f + kFragsN / 2; for GEMM2 the output column (0-127).
template <class Cfg, bool kGemm1>
EPLB_HD int accumulator_column(int warp, int lane, int f) {
    const int base = b_fragment_base<Cfg, kGemm1>(warp, f);
    return (kGemm1 ? base % kGateColumns : base) + 2 * (lane & 3);
}

}  // namespace eplb::moe_tile
