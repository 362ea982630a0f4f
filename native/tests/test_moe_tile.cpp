// The index math of the Mega MoE tensor-core tiles (src/common/moe_tile.hpp) checked on the CPU:
// the loader's swizzled stores, the ldmatrix.x4 addresses and the accumulator mapping of the CUDA
// kernel are run through an emulation of the PTX fragment layouts of ldmatrix.m8n8.x4.b16 and
// mma.m16n8k16.row.col (PTX ISA, "Warp-level matrix fragments"), written from the documentation,
// and the emulated block tile must equal a plain matrix product. This is the part of the kernel
// a CPU-only machine can verify; the GPU tests in test_moe.cpp cover the rest.
#include <array>
#include <cmath>
#include <map>
#include <set>

#include "../src/common/moe_tile.hpp"
#include "../src/cuda/shared_limit.hpp"
#include "test_util.hpp"

using namespace eplb::test;
using namespace eplb::moe_tile;

namespace {

// An 8x8 matrix of b16 as one ldmatrix phase sees it.
using Matrix8 = std::array<std::array<double, 8>, 8>;

// ldmatrix.x4: lane l supplies the address of row l % 8 of matrix l / 8 (8 consecutive elements).
// Afterwards lane t holds, in register m, row t / 4 and columns 2 (t % 4), 2 (t % 4) + 1 of matrix m.
std::array<std::array<std::array<double, 2>, 4>, 32> ldmatrix_x4(const std::vector<double>& smem,
                                                                 const std::array<int, 32>& address) {
    // One phase of ldmatrix reads the 8 rows of one matrix; with 16-byte rows they are free of bank
    // conflicts when they fall into the 8 different 16-byte columns of the 128-byte bank row.
    for (int m = 0; m < 4; ++m) {
        std::set<int> columns;
        for (int r = 0; r < 8; ++r) columns.insert((address[size_t(8 * m + r)] / 8) % 8);
        if (columns.size() != 8) EPLB_FAIL("ldmatrix matrix " << m << " has shared-memory bank conflicts");
    }
    std::array<Matrix8, 4> matrices{};
    for (int lane = 0; lane < 32; ++lane)
        for (int c = 0; c < 8; ++c) matrices[size_t(lane / 8)][size_t(lane % 8)][size_t(c)] = smem[size_t(address[size_t(lane)] + c)];
    std::array<std::array<std::array<double, 2>, 4>, 32> registers{};
    for (int lane = 0; lane < 32; ++lane)
        for (int m = 0; m < 4; ++m)
            for (int e = 0; e < 2; ++e)
                registers[size_t(lane)][size_t(m)][size_t(e)] = matrices[size_t(m)][size_t(lane / 4)][size_t(2 * (lane % 4) + e)];
    return registers;
}

// mma.m16n8k16.row.col, g = lane / 4, c = lane % 4:
//   A: a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)   [row, k]
//   B: b0 = (k 2c..2c+1, n g), b1 = (k 2c+8..2c+9, n g)
//   D: d0, d1 = (g, 2c..2c+1), d2, d3 = (g+8, 2c..2c+1)
void mma_16816(std::array<std::array<double, 4>, 32>& d, const std::array<std::array<std::array<double, 2>, 4>, 32>& a,
               const std::array<std::array<std::array<double, 2>, 2>, 32>& b) {
    double A[16][16] = {}, B[16][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, c = lane % 4;
        for (int e = 0; e < 2; ++e) {
            A[g][2 * c + e] = a[size_t(lane)][0][size_t(e)];
            A[g + 8][2 * c + e] = a[size_t(lane)][1][size_t(e)];
            A[g][2 * c + 8 + e] = a[size_t(lane)][2][size_t(e)];
            A[g + 8][2 * c + 8 + e] = a[size_t(lane)][3][size_t(e)];
            B[2 * c + e][g] = b[size_t(lane)][0][size_t(e)];
            B[2 * c + 8 + e][g] = b[size_t(lane)][1][size_t(e)];
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, c = lane % 4;
        for (int reg = 0; reg < 4; ++reg) {
            const int row = g + (reg >= 2 ? 8 : 0), col = 2 * c + (reg & 1);
            double sum = 0;
            for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
            d[size_t(lane)][size_t(reg)] += sum;
        }
    }
}

// Stores a rows x 64 operand into emulated shared memory exactly as the kernel's loader does.
std::vector<double> load_operand(const std::vector<std::vector<double>>& operand) {
    const int rows = int(operand.size());
    std::vector<double> smem(size_t(rows) * kBlockK, NAN);
    std::vector<int> writes(smem.size(), 0);
    for (int thread = 0; thread < kThreads; ++thread) {
        for (int pass = 0; pass * kLoadRowsPerPass < rows; ++pass) {
            const int row = load_row(thread, pass), chunk = load_chunk(thread);
            for (int e = 0; e < 8; ++e) {
                const int at = swizzle(row, chunk) + e;
                smem[size_t(at)] = operand[size_t(row)][size_t(chunk * 8 + e)];
                ++writes[size_t(at)];
            }
        }
    }
    for (int w : writes) EPLB_EXPECT_EQ(w, 1);  // the swizzle is a bijection of the tile
    return smem;
}

std::vector<std::vector<double>> random_operand(int rows) {
    std::vector<std::vector<double>> operand(static_cast<size_t>(rows), std::vector<double>(kBlockK));
    for (auto& row : operand)
        for (auto& v : row) v = double(int(rng()() % 7) - 3);  // small integers: every sum exact
    return operand;
}

// Emulates one block tile of the kernel (all warps, the four k16 steps of a 64-deep stage) and
// checks every output element against the plain product, each written exactly once.
template <class Cfg, bool kGemm1>
void check_tile() {
    const auto a = random_operand(Cfg::kBlockM);
    const auto b = random_operand(kBlockN);
    const auto a_smem = load_operand(a);
    const auto b_smem = load_operand(b);
    auto dot = [&](int row, int b_row) {
        double sum = 0;
        for (int k = 0; k < kBlockK; ++k) sum += a[size_t(row)][size_t(k)] * b[size_t(b_row)][size_t(k)];
        return sum;
    };
    std::map<std::pair<int, int>, int> seen;
    for (int warp = 0; warp < kWarps; ++warp) {
        // acc[i][f][lane][reg]
        std::vector<std::vector<std::array<std::array<double, 4>, 32>>> acc(
            Cfg::kFragsM, std::vector<std::array<std::array<double, 4>, 32>>(Cfg::kFragsN));
        for (int kk = 0; kk < kBlockK / 16; ++kk) {
            for (int i = 0; i < Cfg::kFragsM; ++i) {
                std::array<int, 32> a_address{};
                for (int lane = 0; lane < 32; ++lane)
                    a_address[size_t(lane)] = swizzle(a_fragment_row<Cfg>(warp, lane, i), a_fragment_chunk(lane, kk));
                const auto a_frag = ldmatrix_x4(a_smem, a_address);
                for (int j = 0; j < Cfg::kFragsN / 2; ++j) {
                    std::array<int, 32> b_address{};
                    for (int lane = 0; lane < 32; ++lane)
                        b_address[size_t(lane)] =
                            swizzle(b_fragment_row<Cfg, kGemm1>(warp, lane, j), b_fragment_chunk(lane, kk));
                    const auto r = ldmatrix_x4(b_smem, b_address);
                    // The kernel's unpacking: b[2j] = {r0, r1}, b[2j + 1] = {r2, r3}.
                    for (int half = 0; half < 2; ++half) {
                        std::array<std::array<std::array<double, 2>, 2>, 32> b_frag{};
                        for (int lane = 0; lane < 32; ++lane) {
                            b_frag[size_t(lane)][0] = r[size_t(lane)][size_t(2 * half)];
                            b_frag[size_t(lane)][1] = r[size_t(lane)][size_t(2 * half + 1)];
                        }
                        mma_16816(acc[size_t(i)][size_t(2 * j + half)], a_frag, b_frag);
                    }
                }
            }
        }
        // Epilogue mapping.
        for (int i = 0; i < Cfg::kFragsM; ++i) {
            for (int lane = 0; lane < 32; ++lane) {
                for (int reg = 0; reg < 4; ++reg) {
                    const int row = accumulator_row<Cfg>(warp, lane, i, reg / 2);
                    if (kGemm1) {
                        constexpr int kHalf = Cfg::kFragsN / 2;
                        for (int f = 0; f < kHalf; ++f) {
                            const int column = accumulator_column<Cfg, true>(warp, lane, f) + (reg & 1);
                            EPLB_EXPECT(column >= 0 && column < kGateColumns);
                            const double gate = acc[size_t(i)][size_t(f)][size_t(lane)][size_t(reg)];
                            const double up = acc[size_t(i)][size_t(f + kHalf)][size_t(lane)][size_t(reg)];
                            if (gate != dot(row, column) || up != dot(row, kGateColumns + column))
                                EPLB_FAIL("GEMM1 tile " << Cfg::kBlockM << ": warp " << warp << " lane " << lane << " row " << row
                                                        << " column " << column << ": gate " << gate << " want "
                                                        << dot(row, column) << ", up " << up << " want "
                                                        << dot(row, kGateColumns + column));
                            ++seen[{row, column}];
                        }
                    } else {
                        for (int f = 0; f < Cfg::kFragsN; ++f) {
                            const int column = accumulator_column<Cfg, false>(warp, lane, f) + (reg & 1);
                            const double value = acc[size_t(i)][size_t(f)][size_t(lane)][size_t(reg)];
                            if (value != dot(row, column))
                                EPLB_FAIL("GEMM2 tile " << Cfg::kBlockM << ": warp " << warp << " lane " << lane << " row "
                                                        << row << " column " << column << ": " << value << " want "
                                                        << dot(row, column));
                            ++seen[{row, column}];
                        }
                    }
                }
            }
        }
    }
    const int columns = kGemm1 ? kGateColumns : kBlockN;
    EPLB_EXPECT_EQ(seen.size(), size_t(Cfg::kBlockM) * size_t(columns));
    for (const auto& [where, count] : seen) EPLB_EXPECT_EQ(count, 1);
}

}  // namespace

EPLB_TEST(moe_tile_fragments_small_gemm1) { check_tile<SmallTile, true>(); }
EPLB_TEST(moe_tile_fragments_small_gemm2) { check_tile<SmallTile, false>(); }
EPLB_TEST(moe_tile_fragments_large_gemm1) { check_tile<LargeTile, true>(); }
EPLB_TEST(moe_tile_fragments_large_gemm2) { check_tile<LargeTile, false>(); }

EPLB_TEST(moe_tile_gemm1_weight_rows) {
    // Shared row r < 64: gate row n_tile * 64 + r; r >= 64: up row I + n_tile * 64 + (r - 64).
    EPLB_EXPECT_EQ(gemm1_weight_row(0, 0, 2048), int64_t(0));
    EPLB_EXPECT_EQ(gemm1_weight_row(63, 3, 2048), int64_t(3 * 64 + 63));
    EPLB_EXPECT_EQ(gemm1_weight_row(64, 3, 2048), int64_t(2048 + 3 * 64));
    EPLB_EXPECT_EQ(gemm1_weight_row(127, 31, 2048), int64_t(2048 + 31 * 64 + 63));
}

// --- The dynamic shared-memory limit of the Mega MoE kernels (cuda/shared_limit.hpp) ------------

namespace {

// A kernel as the CUDA runtime treats it: a launch fails when it asks for more dynamic shared
// memory than the kernel's current limit (48 KiB until set), and a set above what the device grants
// per block fails.
struct FakeKernel {
    size_t limit = 48 * 1024;
    size_t device_max = 0;
    int sets = 0;
    int set(size_t value) {
        if (value > device_max) return 1;  // cudaErrorInvalidValue
        limit = value;
        ++sets;
        return 0;
    }
    bool launch(size_t bytes) const { return bytes <= limit; }
};

// Runs launches with the given local-expert counts through the rule, on devices granting the H100 /
// H200 (227 KiB) and the A100 (163 KiB) maximum per block; every launch the device can hold must go
// through, the limit must never fall, and it is set once per kernel.
template <class Cfg>
void expect_every_launch_covered(const std::vector<int32_t>& experts) {
    for (size_t device_max : {size_t(232448), size_t(166912)}) {
        eplb::cuda::SharedLimits<int> limits;
        FakeKernel kernel;
        kernel.device_max = device_max;
        const size_t largest = moe_shared_bytes<Cfg>(EPLB_MOE_MAX_LOCAL_EXPERTS);
        for (int32_t e : experts) {
            const size_t needed = moe_shared_bytes<Cfg>(e);
            const size_t before = kernel.limit;
            const int error = limits.ensure(0, 1, needed, largest, device_max, [&](size_t v) { return kernel.set(v); });
            EPLB_EXPECT_EQ(error, 0);
            if (!kernel.launch(needed))
                EPLB_FAIL("block_m " << Cfg::kBlockM << ", E = " << e << ": launch of " << needed
                                     << " bytes over the limit " << kernel.limit);
            EPLB_EXPECT(kernel.limit >= before);
        }
        EPLB_EXPECT_EQ(kernel.sets, 1);
        EPLB_EXPECT_EQ(kernel.limit, std::min(largest, device_max));
    }
}

}  // namespace

EPLB_TEST(moe_shared_limit_covers_a_larger_launch_after_a_smaller_one) {
    // The sequence that broke: E = 256 sets the limit, E = 32 lowered it, E = 256 again skipped the set.
    expect_every_launch_covered<SmallTile>({256, 32, 256});
    expect_every_launch_covered<LargeTile>({256, 32, 256});
    // Awkward and extreme counts, and fresh random orders.
    expect_every_launch_covered<SmallTile>({1, EPLB_MOE_MAX_LOCAL_EXPERTS, 7, 1, 1000, 3});
    for (int round = 0; round < 20; ++round) {
        std::vector<int32_t> experts(12);
        for (auto& e : experts) e = 1 + int32_t(rng()() % EPLB_MOE_MAX_LOCAL_EXPERTS);
        expect_every_launch_covered<SmallTile>(experts);
        expect_every_launch_covered<LargeTile>(experts);
    }
}

EPLB_TEST(moe_shared_limit_rule) {
    using eplb::cuda::shared_limit_to_set;
    // Covered: nothing to set.
    EPLB_EXPECT_EQ(shared_limit_to_set(1000, 1000, 5000, 9000), size_t(0));
    EPLB_EXPECT_EQ(shared_limit_to_set(999, 4000, 5000, 9000), size_t(0));
    // Not covered: straight to the largest any launch needs, or what the device grants if less.
    EPLB_EXPECT_EQ(shared_limit_to_set(1001, 1000, 5000, 9000), size_t(5000));
    EPLB_EXPECT_EQ(shared_limit_to_set(1001, 0, 5000, 3000), size_t(3000));
    // More than the device grants: ask for exactly that, so CUDA's set fails and reports it.
    EPLB_EXPECT_EQ(shared_limit_to_set(9001, 0, 12000, 9000), size_t(9001));
    // A failed set is not remembered: the next launch tries again.
    eplb::cuda::SharedLimits<int> limits;
    FakeKernel kernel;
    kernel.device_max = 9000;
    EPLB_EXPECT_EQ(limits.ensure(0, 7, 9500, 12000, 9000, [&](size_t v) { return kernel.set(v); }), 1);
    EPLB_EXPECT_EQ(limits.current(0, 7), size_t(0));
    EPLB_EXPECT_EQ(limits.ensure(0, 7, 100, 12000, 9000, [&](size_t v) { return kernel.set(v); }), 0);
    EPLB_EXPECT_EQ(limits.current(0, 7), size_t(9000));
    // Kernels and devices are tracked apart.
    EPLB_EXPECT_EQ(limits.current(1, 7), size_t(0));
    EPLB_EXPECT_EQ(limits.current(0, 8), size_t(0));
}
