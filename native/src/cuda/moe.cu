// Mega MoE on CUDA (docs/design.md §7): one cooperative, persistent kernel runs the whole expert layer,
//
//   route   every block counts the (token, k) pairs of each local expert (the same histogram in every
//           block, so nothing global needs zeroing) and places its own slice of pairs stably;
//   -- grid barrier --
//   GEMM1   tiles (expert, 32 or 128 rows, 64 intermediate columns): gate and up in one 128-row B
//           tile, SwiGLU in the epilogue, bf16 rows into the workspace; each tile bumps its m-tile's
//           ready counter;
//   GEMM2   tiles (expert, rows, 128 hidden columns) start as soon as their m-tile's GEMM1 tiles are
//           all done (no barrier: a block finishes all its GEMM1 tiles before it waits, so waits end);
//   -- grid barrier --
//   combine each token's K rows in ascending k in fp32 (eplb_dispatch_combine's rounding), one bf16 rounding.
//
// Tiles are taken round-robin (tile = block, block + grid, ...): deterministic, no work queue.
// Experts without tokens have no tiles. The tensor-core path is mma.sync m16n8k16 bf16 fed by
// ldmatrix from XOR-swizzled shared memory, with a cp.async multi-stage pipeline (the Ampere
// recipe of CUTLASS's sm80 GEMMs), so one source compiles for sm_80 and sm_90 with CUDA 11.8.
// A wgmma/TMA path for sm_90a is left for when it can be measured against this one.
//
// The unfused path is the dispatch ops (align, permute, combine) around the same GEMM tiles.
#include "cuda/moe.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "common/moe_tile.hpp"
#include "cuda/dispatch.cuh"
#include "cuda/launch.cuh"
#include "cuda/shared_limit.hpp"
#include "eplb/eplb.h"

namespace eplb::cuda {

namespace {

using namespace moe_tile;

constexpr int kMaxExperts = EPLB_MOE_MAX_LOCAL_EXPERTS;
constexpr int kExpertsPerThread = kMaxExperts / kThreads;

// Long enough for any legitimate wait (a phase of a huge prefill), short enough to call a hang a hang.
constexpr unsigned long long kBarrierTimeoutNs = 10ull * 1000 * 1000 * 1000;
constexpr int kControlArrivals = 0;
constexpr int kControlAbort = 1;

static_assert(kMaxExperts % kThreads == 0, "route layout");
static_assert(SmallTile::kBlockM == kMoeSmallBlockM && LargeTile::kBlockM == kMoeLargeBlockM, "tile heights");
static_assert(SmallTile::kPipelineBytes >= 2 * kMaxExperts * sizeof(int32_t) &&
                  LargeTile::kPipelineBytes >= 2 * kMaxExperts * sizeof(int32_t),
              "the route scratch lives in the pipeline buffers");

enum GemmKind : int { kGemm1Gathered = 0, kGemm1Contiguous = 1, kGemm2 = 2 };

struct KernelArgs {
    MoeProblem p;
    uint32_t* error_flags;
};

// --- PTX helpers --------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16-byte global -> shared copy through L2 only (.cg: data written by other SMs in this kernel is
// never served from a stale L1 line); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// D += A (16x16, row) * B (16x8, col), bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* address) {
    uint32_t value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ uint32_t pack_bf16(float low, float high) {
    return uint32_t(float_to_bf16(low)) | (uint32_t(float_to_bf16(high)) << 16);
}

// --- Cross-block waits (thread 0 of a block) ----------------------------------------------------

// Spins until *word >= target. Gives up, flags the stream and tells every block to stop when the
// wait outlasts the timeout or another block has already given up: never an endless spin.
__device__ bool wait_at_least(const uint32_t* word, uint32_t target, const KernelArgs& args) {
    if (load_acquire(word) >= target) return true;
    const unsigned long long start = global_timer_ns();
    while (load_acquire(word) < target) {
        if (load_acquire(&args.p.control[kControlAbort]) != 0) return false;
        if (global_timer_ns() - start > kBarrierTimeoutNs) {
            atomicExch(&args.p.control[kControlAbort], 1u);
            atomicOr(args.error_flags, uint32_t(EPLB_DEVICE_ERROR_GRID_BARRIER_TIMEOUT));
            return false;
        }
        __nanosleep(64);
    }
    return true;
}

// The whole block waits for *word >= target; false when the kernel is being abandoned.
__device__ bool block_wait(const uint32_t* word, uint32_t target, const KernelArgs& args, int* s_flag) {
    __syncthreads();  // everyone has read the previous *s_flag
    if (threadIdx.x == 0) {
        *s_flag = wait_at_least(word, target, args) ? 1 : 0;
        __threadfence();
    }
    __syncthreads();
    return *s_flag != 0;
}

// Grid barrier number `generation` (1, 2, ...) on the zeroed arrivals word.
__device__ bool grid_barrier(uint32_t generation, const KernelArgs& args, int* s_flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(&args.p.control[kControlArrivals], 1u);
    return block_wait(&args.p.control[kControlArrivals], generation * gridDim.x, args, s_flag);
}

// --- Route --------------------------------------------------------------------------------------

// s_expert[e] = first permuted row of local expert e, s_tiles[e] = its first m-tile (both exclusive
// scans of the counts, with the totals at [E]). E <= 1024: four experts per thread.
template <int kBlockM>
__device__ void scan_experts(const int32_t* s_count, int32_t experts, int32_t* s_expert, int32_t* s_tiles,
                             int32_t* s_warp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int rows[kExpertsPerThread], tiles[kExpertsPerThread];
    int row_sum = 0, tile_sum = 0;
#pragma unroll
    for (int j = 0; j < kExpertsPerThread; ++j) {
        const int e = threadIdx.x * kExpertsPerThread + j;
        const int count = e < experts ? s_count[e] : 0;
        rows[j] = row_sum;
        tiles[j] = tile_sum;
        row_sum += count;
        tile_sum += (count + kBlockM - 1) / kBlockM;
    }
    int row_scan = row_sum, tile_scan = tile_sum;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
        const int r = __shfl_up_sync(0xffffffffu, row_scan, offset);
        const int t = __shfl_up_sync(0xffffffffu, tile_scan, offset);
        if (lane >= offset) {
            row_scan += r;
            tile_scan += t;
        }
    }
    if (lane == 31) {
        s_warp[warp] = row_scan;
        s_warp[kWarps + warp] = tile_scan;
    }
    __syncthreads();
    int row_base = row_scan - row_sum, tile_base = tile_scan - tile_sum;
    for (int w = 0; w < warp; ++w) {
        row_base += s_warp[w];
        tile_base += s_warp[kWarps + w];
    }
#pragma unroll
    for (int j = 0; j < kExpertsPerThread; ++j) {
        const int e = threadIdx.x * kExpertsPerThread + j;
        if (e < experts) {
            s_expert[e] = row_base + rows[j];
            s_tiles[e] = tile_base + tiles[j];
        }
    }
    if (threadIdx.x == kThreads - 1) {
        s_expert[experts] = row_base + row_sum;
        s_tiles[experts] = tile_base + tile_sum;
    }
    __syncthreads();
}

__device__ __forceinline__ int32_t local_expert(const MoeProblem& p, int32_t id) {
    const int64_t local = int64_t(id) - p.first_local_expert;
    return (local >= 0 && local < p.num_local_experts) ? int32_t(local) : -1;
}

// One block: histogram of every pair's local expert (and of those before `begin`), the scans, then
// (warp 0) the stable placement of pairs [begin, end): a pair's row is its expert's first row plus
// the number of earlier pairs of the same expert, so rows ascend in (token, k) inside an expert.
template <int kBlockM>
__device__ void route_block(const MoeProblem& p, int64_t begin, int64_t end, int32_t* s_expert, int32_t* s_tiles,
                            int32_t* scratch) {
    int32_t* s_count = scratch;
    int32_t* s_cursor = scratch + kMaxExperts;
    __shared__ int32_t s_warp[2 * kWarps];
    const int32_t experts = p.num_local_experts;
    const int64_t pairs = p.num_tokens * p.top_k;
    for (int e = threadIdx.x; e < experts; e += kThreads) {
        s_count[e] = 0;
        s_cursor[e] = 0;
    }
    __syncthreads();
    // Count.
    for (int64_t i = threadIdx.x; i < pairs; i += kThreads) {
        const int32_t e = local_expert(p, __ldg(p.topk_ids + i));
        if (e >= 0) {
            atomicAdd(&s_count[e], 1);
            if (i < begin) atomicAdd(&s_cursor[e], 1);
        }
    }
    __syncthreads();
    scan_experts<kBlockM>(s_count, experts, s_expert, s_tiles, s_warp);
    // Place.
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        for (int64_t base = begin; base < end; base += 32) {
            const int64_t i = base + lane;
            const int32_t e = i < end ? local_expert(p, __ldg(p.topk_ids + i)) : -1;
            const unsigned peers = __match_any_sync(0xffffffffu, e);
            const int rank = __popc(peers & ((1u << lane) - 1u));
            if (e >= 0) {
                const int32_t row = s_expert[e] + s_cursor[e] + rank;
                p.positions[i] = row;
                p.sorted[row] = int32_t(i);
            } else if (i < end) {
                p.positions[i] = -1;
            }
            __syncwarp();
            if (e >= 0 && rank == 0) s_cursor[e] += __popc(peers);
            __syncwarp();
        }
    }
}

// Copies the row offsets to the workspace (block 0), for the host and the tests to read.
__device__ void publish_offsets(const MoeProblem& p, const int32_t* s_expert) {
    for (int e = threadIdx.x; e <= p.num_local_experts; e += kThreads) p.expert_offsets[e] = s_expert[e];
}

// The unfused GEMM kernels: the row offsets eplb_dispatch_align wrote, and the m-tile scan from them.
template <int kBlockM>
__device__ void load_offsets(const MoeProblem& p, int32_t* s_expert, int32_t* s_tiles, int32_t* s_count) {
    __shared__ int32_t s_warp[2 * kWarps];
    for (int e = threadIdx.x; e < p.num_local_experts; e += kThreads)
        s_count[e] = __ldcg(p.expert_offsets + e + 1) - __ldcg(p.expert_offsets + e);
    __syncthreads();
    scan_experts<kBlockM>(s_count, p.num_local_experts, s_expert, s_tiles, s_warp);
}

// --- Grouped GEMM tile --------------------------------------------------------------------------

// The local expert owning m-tile `m_tile`: the last e with s_tiles[e] <= m_tile (empty experts
// share their successor's start and are skipped by taking the last).
__device__ __forceinline__ int find_expert(const int32_t* s_tiles, int32_t experts, int m_tile) {
    int lo = 0, hi = experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_tiles[mid] <= m_tile) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// One output tile: rows [row0, row0 + rows) of expert `expert`, column tile n_tile.
//   GEMM1: A = x rows (gathered through sorted, or the permuted copy), B = W1 gate rows
//          n_tile*64 .. +64 then the matching up rows; epilogue SwiGLU -> intermediate (bf16).
//   GEMM2: A = intermediate rows, B = W2 rows n_tile*128 .. +128; epilogue -> expert_out (bf16).
template <class Cfg, int kKind>
__device__ void gemm_tile(const MoeProblem& p, uint16_t* pipe, int expert, int row0, int rows, int n_tile) {
    constexpr bool kGemm1 = kKind != kGemm2;
    constexpr int kARows = Cfg::kBlockM / kLoadRowsPerPass;
    constexpr int kBRows = kBlockN / kLoadRowsPerPass;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t hidden = p.hidden;
    const int64_t inter = p.intermediate;
    const int k_tiles = int((kGemm1 ? hidden : inter) / kBlockK);

    // Loader: one 16-byte chunk of rows load_row(t, j) = r + 32 j of each operand per thread and
    // stage; those rows share one swizzled offset. Rows past the tile's end are zero-filled from a
    // mapped address (the tile's first row). Only the gathered A keeps a pointer per row.
    const int chunk = load_chunk(threadIdx.x);
    const int r = load_row(threadIdx.x, 0);
    const int load_offset = swizzle(r, chunk);
    const int64_t a_stride = kKind == kGemm2 ? inter : hidden;
    const uint16_t* a_base = (kKind == kGemm1Contiguous ? p.expert_out : p.intermediate_rows) + row0 * a_stride + chunk * 8;
    const uint16_t* a_gathered[kKind == kGemm1Gathered ? kARows : 1];
    if (kKind == kGemm1Gathered) {
#pragma unroll
        for (int j = 0; j < kARows; ++j) {
            const int row = r + j * kLoadRowsPerPass;
            const int64_t token = __ldcg(p.sorted + row0 + (row < rows ? row : 0)) / p.top_k;
            a_gathered[j] = p.x + token * hidden + chunk * 8;
        }
    }
    // B: GEMM1 rows r + 32 j < 64 are gate rows of the tile's columns, the rest the up rows I - 64
    // further on (gemm1_weight_row); GEMM2 rows past H (a half-empty last column tile) read zeros.
    const int64_t b_stride = kGemm1 ? hidden : inter;
    const uint16_t* b_base = kGemm1 ? p.w1 + (int64_t(expert) * 2 * inter + int64_t(n_tile) * kGateColumns) * hidden + chunk * 8
                                    : p.w2 + (int64_t(expert) * hidden + int64_t(n_tile) * kBlockN) * inter + chunk * 8;
    const int b_rows = kGemm1 ? kBlockN : int(min(int64_t(kBlockN), hidden - int64_t(n_tile) * kBlockN));
    auto load_stage = [&](int stage, int k_tile) {
        uint16_t* a_tile = pipe + stage * Cfg::kStageElems;
        uint16_t* b_tile = a_tile + Cfg::kATileElems;
        const int64_t k_offset = int64_t(k_tile) * kBlockK;
#pragma unroll
        for (int j = 0; j < kARows; ++j) {
            const int row = r + j * kLoadRowsPerPass;
            const bool valid = row < rows;
            const uint16_t* src = kKind == kGemm1Gathered ? a_gathered[j] : a_base + (valid ? row : 0) * a_stride;
            cp_async_16(shared_address(a_tile + load_offset + j * kLoadRowsPerPass * kBlockK), src + k_offset, valid);
        }
#pragma unroll
        for (int j = 0; j < kBRows; ++j) {
            const int row = r + j * kLoadRowsPerPass;
            const bool valid = row < b_rows;
            const int64_t w_row = !valid ? 0 : (kGemm1 && row >= kGateColumns) ? inter - kGateColumns + row : row;
            cp_async_16(shared_address(b_tile + load_offset + j * kLoadRowsPerPass * kBlockK),
                        b_base + w_row * b_stride + k_offset, valid);
        }
    };

    // ldmatrix addresses of this lane (moe_tile.hpp); the k step only moves the chunk.
    int a_row[Cfg::kFragsM];
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i) a_row[i] = a_fragment_row<Cfg>(warp, lane, i);
    int b_row[Cfg::kFragsN / 2];
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN / 2; ++j) b_row[j] = b_fragment_row<Cfg, kGemm1>(warp, lane, j);

    float acc[Cfg::kFragsM][Cfg::kFragsN][4];
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
        for (int f = 0; f < Cfg::kFragsN; ++f)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][f][c] = 0.0f;

    // Prologue: kStages - 1 tiles in flight.
#pragma unroll
    for (int s = 0; s < Cfg::kStages - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
        cp_async_wait<Cfg::kStages - 2>();
        __syncthreads();  // tile k_tile landed for every thread; stage (k_tile - 1) is free again
        const int next = k_tile + Cfg::kStages - 1;
        if (next < k_tiles) load_stage(next % Cfg::kStages, next);
        cp_async_commit();

        const uint16_t* a_tile = pipe + (k_tile % Cfg::kStages) * Cfg::kStageElems;
        const uint32_t a_base = shared_address(a_tile);
        const uint32_t b_base = shared_address(a_tile + Cfg::kATileElems);
#pragma unroll
        for (int kk = 0; kk < kBlockK / 16; ++kk) {
            uint32_t a_frag[Cfg::kFragsM][4];
            uint32_t b_frag[Cfg::kFragsN][2];
#pragma unroll
            for (int i = 0; i < Cfg::kFragsM; ++i)
                ldmatrix_x4(a_frag[i], a_base + 2 * swizzle(a_row[i], a_fragment_chunk(lane, kk)));
#pragma unroll
            for (int j = 0; j < Cfg::kFragsN / 2; ++j) {
                uint32_t r[4];
                ldmatrix_x4(r, b_base + 2 * swizzle(b_row[j], b_fragment_chunk(lane, kk)));
                b_frag[2 * j][0] = r[0];
                b_frag[2 * j][1] = r[1];
                b_frag[2 * j + 1][0] = r[2];
                b_frag[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
                for (int f = 0; f < Cfg::kFragsN; ++f) mma_bf16_16816(acc[i][f], a_frag[i], b_frag[f][0], b_frag[f][1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: registers {0, 1} and {2, 3} of a fragment are two adjacent columns of two rows.
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = accumulator_row<Cfg>(warp, lane, i, half);
            if (r >= rows) continue;
            const int64_t row = row0 + r;
            if (kGemm1) {
                constexpr int kHalf = Cfg::kFragsN / 2;
#pragma unroll
                for (int f = 0; f < kHalf; ++f) {
                    const int64_t column = int64_t(n_tile) * kGateColumns + accumulator_column<Cfg, true>(warp, lane, f);
                    const float h0 = swiglu(acc[i][f][2 * half], acc[i][f + kHalf][2 * half], p.swiglu_limit);
                    const float h1 = swiglu(acc[i][f][2 * half + 1], acc[i][f + kHalf][2 * half + 1], p.swiglu_limit);
                    *reinterpret_cast<uint32_t*>(p.intermediate_rows + row * inter + column) = pack_bf16(h0, h1);
                }
            } else {
#pragma unroll
                for (int f = 0; f < Cfg::kFragsN; ++f) {
                    const int64_t column = int64_t(n_tile) * kBlockN + accumulator_column<Cfg, false>(warp, lane, f);
                    if (column < hidden)
                        *reinterpret_cast<uint32_t*>(p.expert_out + row * hidden + column) =
                            pack_bf16(acc[i][f][2 * half], acc[i][f][2 * half + 1]);
                }
            }
        }
    }
    __syncthreads();  // the next tile's prologue overwrites stages this tile's last steps read
}

// --- Phases -------------------------------------------------------------------------------------

// GEMM1 + SwiGLU over every (m-tile, n-tile) of the local experts, round-robin over the grid.
// With `signal`, each finished tile publishes its rows and bumps ready[m-tile].
template <class Cfg, int kKind>
__device__ void gemm1_phase(const MoeProblem& p, uint16_t* pipe, const int32_t* s_expert, const int32_t* s_tiles,
                            bool signal) {
    const int n_tiles = p.intermediate / kGateColumns;
    const int64_t total = int64_t(s_tiles[p.num_local_experts]) * n_tiles;
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const int m_tile = int(tile / n_tiles);
        const int n_tile = int(tile % n_tiles);
        const int e = find_expert(s_tiles, p.num_local_experts, m_tile);
        const int row0 = s_expert[e] + (m_tile - s_tiles[e]) * Cfg::kBlockM;
        const int rows = min(Cfg::kBlockM, s_expert[e + 1] - row0);
        gemm_tile<Cfg, kKind>(p, pipe, e, row0, rows, n_tile);
        if (signal) {
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicAdd(reinterpret_cast<uint32_t*>(p.ready) + m_tile, 1u);
        }
    }
}

// GEMM2 over every (m-tile, n-tile); with args, each m-tile first waits for its GEMM1 tiles.
// Returns false when the kernel is being abandoned.
template <class Cfg>
__device__ bool gemm2_phase(const MoeProblem& p, uint16_t* pipe, const int32_t* s_expert, const int32_t* s_tiles,
                            const KernelArgs* args, int* s_flag) {
    const int n_tiles = (p.hidden + kBlockN - 1) / kBlockN;
    const uint32_t gemm1_tiles = uint32_t(p.intermediate / kGateColumns);
    const int64_t total = int64_t(s_tiles[p.num_local_experts]) * n_tiles;
    int ready_m_tile = -1;
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const int m_tile = int(tile / n_tiles);
        const int n_tile = int(tile % n_tiles);
        if (args != nullptr && m_tile != ready_m_tile) {
            if (!block_wait(reinterpret_cast<const uint32_t*>(p.ready) + m_tile, gemm1_tiles, *args, s_flag)) return false;
            ready_m_tile = m_tile;
        }
        const int e = find_expert(s_tiles, p.num_local_experts, m_tile);
        const int row0 = s_expert[e] + (m_tile - s_tiles[e]) * Cfg::kBlockM;
        const int rows = min(Cfg::kBlockM, s_expert[e + 1] - row0);
        gemm_tile<Cfg, kGemm2>(p, pipe, e, row0, rows, n_tile);
    }
    return true;
}

// output[t] = bf16(sum over ascending k of w[t,k] * expert_out[positions[t,k]]), 8 columns per step.
__device__ void combine_phase(const MoeProblem& p, int64_t first, int64_t stride) {
    const int vectors = p.hidden / 8;
    const int64_t total = p.num_tokens * vectors;
    for (int64_t v = first; v < total; v += stride) {
        const int64_t token = v / vectors;
        const int64_t column = (v % vectors) * 8;
        float sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < p.top_k; ++k) {
            const int32_t row = __ldcg(p.positions + token * p.top_k + k);
            if (row < 0) continue;
            const float w = __ldg(p.topk_weights + token * p.top_k + k);
            const uint4 packed = __ldcg(reinterpret_cast<const uint4*>(p.expert_out + int64_t(row) * p.hidden + column));
            const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                sum[2 * j] = weighted_add(sum[2 * j], w, bf16_to_float(uint16_t(words[j] & 0xffffu)));
                sum[2 * j + 1] = weighted_add(sum[2 * j + 1], w, bf16_to_float(uint16_t(words[j] >> 16)));
            }
        }
        uint4 out;
        out.x = pack_bf16(sum[0], sum[1]);
        out.y = pack_bf16(sum[2], sum[3]);
        out.z = pack_bf16(sum[4], sum[5]);
        out.w = pack_bf16(sum[6], sum[7]);
        *reinterpret_cast<uint4*>(p.output + token * p.hidden + column) = out;
    }
}

// --- Kernels ------------------------------------------------------------------------------------

template <class Cfg>
__device__ __forceinline__ int32_t* persistent_offsets(unsigned char* smem) {
    return reinterpret_cast<int32_t*>(smem + Cfg::kPipelineBytes);
}

// The fused layer: route -> barrier -> GEMM1 (+ready) -> GEMM2 (waits per m-tile) -> barrier -> combine.
template <class Cfg>
__global__ void __launch_bounds__(kThreads, Cfg::kMinBlocks) mega_moe_kernel(KernelArgs args) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ int s_flag;
    const MoeProblem& p = args.p;
    uint16_t* pipe = reinterpret_cast<uint16_t*>(smem);
    int32_t* s_expert = persistent_offsets<Cfg>(smem);
    int32_t* s_tiles = s_expert + p.num_local_experts + 1;

    // Route: every block builds the same scans; block b places pairs [b * chunk, (b + 1) * chunk).
    const int64_t pairs = p.num_tokens * p.top_k;
    const int64_t chunk = (pairs + gridDim.x - 1) / gridDim.x;
    const int64_t begin = min(pairs, int64_t(blockIdx.x) * chunk);
    route_block<Cfg::kBlockM>(p, begin, min(pairs, begin + chunk), s_expert, s_tiles, reinterpret_cast<int32_t*>(smem));
    const int m_tiles = s_tiles[p.num_local_experts];
    for (int i = blockIdx.x * kThreads + threadIdx.x; i < m_tiles; i += gridDim.x * kThreads) p.ready[i] = 0;
    if (blockIdx.x == 0) publish_offsets(p, s_expert);
    if (!grid_barrier(1, args, &s_flag)) return;

    gemm1_phase<Cfg, kGemm1Gathered>(p, pipe, s_expert, s_tiles, /*signal=*/true);
    if (!gemm2_phase<Cfg>(p, pipe, s_expert, s_tiles, &args, &s_flag)) return;
    if (!grid_barrier(2, args, &s_flag)) return;

    combine_phase(p, int64_t(blockIdx.x) * kThreads + threadIdx.x, int64_t(gridDim.x) * kThreads);
}

template <class Cfg, int kKind>
__global__ void __launch_bounds__(kThreads, Cfg::kMinBlocks) moe_gemm_kernel(MoeProblem p) {
    extern __shared__ __align__(128) unsigned char smem[];
    uint16_t* pipe = reinterpret_cast<uint16_t*>(smem);
    int32_t* s_expert = persistent_offsets<Cfg>(smem);
    int32_t* s_tiles = s_expert + p.num_local_experts + 1;
    load_offsets<Cfg::kBlockM>(p, s_expert, s_tiles, reinterpret_cast<int32_t*>(smem));
    if (kKind == kGemm2) gemm2_phase<Cfg>(p, pipe, s_expert, s_tiles, nullptr, nullptr);
    else gemm1_phase<Cfg, kKind>(p, pipe, s_expert, s_tiles, /*signal=*/false);
}

// --- Host side ----------------------------------------------------------------------------------

int current_device() {
    int device = 0;
    return cudaGetDevice(&device) == cudaSuccess ? device : -1;
}

// Makes the kernel's dynamic shared-memory limit cover a launch of `shared_bytes` (the rule of
// cuda/shared_limit.hpp: raised once to the most any E can need, never lowered). Called before
// every launch and occupancy query; after the first call per kernel it is a map lookup.
template <class Cfg>
cudaError_t ensure_shared_limit(const void* kernel, size_t shared_bytes) {
    static SharedLimits<const void*> limits;
    const int device = current_device();
    if (limits.current(device, kernel) >= shared_bytes) return cudaSuccess;
    int max_optin = 0;
    EPLB_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return limits.ensure(device, kernel, shared_bytes, moe_shared_bytes<Cfg>(kMaxExperts), size_t(max_optin),
                         [kernel](size_t limit) {
                             return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit));
                         });
}

// Blocks per SM of a kernel at a dynamic shared memory size, cached per (device, kernel, bytes):
// the occupancy calculator is not free and the answer never changes within a process.
template <class Cfg>
cudaError_t blocks_per_sm(const void* kernel, size_t shared_bytes, int* out) {
    static std::mutex mutex;
    static std::map<std::tuple<int, const void*, size_t>, int> cache;
    EPLB_CUDA_RETURN_IF_ERROR(ensure_shared_limit<Cfg>(kernel, shared_bytes));
    const auto key = std::make_tuple(current_device(), kernel, shared_bytes);
    {
        std::lock_guard<std::mutex> lock(mutex);
        const auto found = cache.find(key);
        if (found != cache.end()) {
            *out = found->second;
            return cudaSuccess;
        }
    }
    int blocks = 0;
    EPLB_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, shared_bytes));
    std::lock_guard<std::mutex> lock(mutex);
    cache[key] = blocks;
    *out = blocks;
    return cudaSuccess;
}

template <class Cfg>
cudaError_t occupancy_of(int32_t num_local_experts, MegaMoeOccupancy* out) {
    const int device = current_device();
    int cooperative = 0, sms = 0, max_optin = 0;
    EPLB_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    EPLB_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    EPLB_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    out->cooperative_launch = cooperative != 0;
    out->sm_count = sms;
    out->shared_bytes = moe_shared_bytes<Cfg>(num_local_experts);
    out->max_shared_bytes = size_t(max_optin);
    out->blocks_per_sm = 0;
    // A block that needs more shared memory than the device grants cannot run at all: report 0
    // instead of failing the attribute call.
    if (out->shared_bytes <= out->max_shared_bytes)
        EPLB_CUDA_RETURN_IF_ERROR(
            blocks_per_sm<Cfg>(reinterpret_cast<const void*>(&mega_moe_kernel<Cfg>), out->shared_bytes, &out->blocks_per_sm));
    out->max_blocks = out->blocks_per_sm * sms;
    return cudaSuccess;
}

template <class Cfg>
cudaError_t launch_fused(const MoeProblem& problem, int grid_blocks, uint32_t* error_flags, cudaStream_t stream) {
    MegaMoeOccupancy occupancy;
    EPLB_CUDA_RETURN_IF_ERROR(occupancy_of<Cfg>(problem.num_local_experts, &occupancy));
    if (!occupancy.cooperative_launch) return cudaErrorNotSupported;
    if (grid_blocks < 1 || grid_blocks > occupancy.max_blocks) return cudaErrorCooperativeLaunchTooLarge;
    const void* kernel = reinterpret_cast<const void*>(&mega_moe_kernel<Cfg>);
    EPLB_CUDA_RETURN_IF_ERROR(ensure_shared_limit<Cfg>(kernel, occupancy.shared_bytes));
    EPLB_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(problem.control, 0, 2 * sizeof(uint32_t), stream));
    KernelArgs args{problem, error_flags};
    void* params[] = {&args};
    return cudaLaunchCooperativeKernel(kernel, dim3(grid_blocks), dim3(kThreads), params, occupancy.shared_bytes,
                                       stream);
}

template <class Cfg, int kKind>
cudaError_t launch_gemm(const MoeProblem& problem, int sm_count, cudaStream_t stream) {
    const void* kernel = reinterpret_cast<const void*>(&moe_gemm_kernel<Cfg, kKind>);
    const size_t shared = moe_shared_bytes<Cfg>(problem.num_local_experts);
    int per_sm = 0;
    EPLB_CUDA_RETURN_IF_ERROR(blocks_per_sm<Cfg>(kernel, shared, &per_sm));  // also sets the shared limit
    // Persistent grid: the tile count is only known on the device.
    const int grid = std::max(1, per_sm) * std::max(1, sm_count);
    moe_gemm_kernel<Cfg, kKind><<<grid, kThreads, shared, stream>>>(problem);
    return cudaGetLastError();
}

// The unfused path: the dispatch ops around the grouped GEMMs. Block size 1 gives the fused
// kernel's layout exactly (no padding rows, ascending pair inside an expert), so both paths run the
// same tiles in the same order and agree bit for bit.
template <class Cfg>
cudaError_t launch_unfused(const MoeProblem& p, int sm_count, uint32_t* error_flags, cudaStream_t stream) {
    const int64_t pairs = p.num_tokens * p.top_k;
    EPLB_CUDA_RETURN_IF_ERROR(align(p.topk_ids, p.num_tokens, p.top_k, p.first_local_expert, p.num_local_experts, 1,
                                    pairs, p.expert_counts, p.expert_offsets, p.sorted, nullptr, p.positions,
                                    error_flags, stream));
    EPLB_CUDA_RETURN_IF_ERROR(permute(EPLB_DTYPE_BF16, p.x, p.num_tokens, p.hidden, p.top_k, p.sorted,
                                      p.expert_offsets + p.num_local_experts, pairs, p.expert_out, error_flags,
                                      sm_count, stream));
    EPLB_CUDA_RETURN_IF_ERROR((launch_gemm<Cfg, kGemm1Contiguous>(p, sm_count, stream)));
    EPLB_CUDA_RETURN_IF_ERROR((launch_gemm<Cfg, kGemm2>(p, sm_count, stream)));
    return combine(EPLB_DTYPE_BF16, p.expert_out, pairs, p.hidden, p.positions, p.topk_weights, p.num_tokens, p.top_k,
                   EPLB_DTYPE_BF16, p.output, error_flags, sm_count, stream);
}

}  // namespace

cudaError_t mega_moe_occupancy(int block_m, int32_t num_local_experts, MegaMoeOccupancy* out) {
    return block_m == kMoeSmallBlockM ? occupancy_of<SmallTile>(num_local_experts, out)
                                      : occupancy_of<LargeTile>(num_local_experts, out);
}

cudaError_t mega_moe(const MoeProblem& problem, int block_m, int grid_blocks, uint32_t* error_flags, cudaStream_t stream) {
    return block_m == kMoeSmallBlockM ? launch_fused<SmallTile>(problem, grid_blocks, error_flags, stream)
                                      : launch_fused<LargeTile>(problem, grid_blocks, error_flags, stream);
}

cudaError_t moe_unfused(const MoeProblem& problem, int block_m, int sm_count, uint32_t* error_flags,
                        cudaStream_t stream) {
    return block_m == kMoeSmallBlockM ? launch_unfused<SmallTile>(problem, sm_count, error_flags, stream)
                                      : launch_unfused<LargeTile>(problem, sm_count, error_flags, stream);
}

}  // namespace eplb::cuda
