#include "cuda/dispatch.cuh"

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "common/bf16.hpp"
#include "common/bucket_partition.hpp"
#include "common/dispatch.hpp"
#include "cuda/launch.cuh"
#include "cuda/shared_limit.hpp"

namespace eplb::cuda {

namespace {

constexpr int kWarpSize = 32;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ void flag_bad_index(uint32_t* error_flags) {
    if (error_flags != nullptr) atomicOr(error_flags, uint32_t(EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX));
}

// ------------------------------------------------------------------------------------------------
// Align and EP bucketing: a stable counting sort of the pairs by bucket.
//
// Warp w owns a contiguous pair range, so (warp, tile of 32 pairs, lane) is ascending pair order
// and a stable placement only needs each warp's first row in each bucket:
//   1. Count  each warp counts its range into its own shared row (shared atomics, no contention
//             between warps).
//   2. Scan   per bucket, the warps' counts in warp order give each warp's start inside the
//             bucket; the padded bucket sizes, scanned over the block, give the offsets.
//   3. Place  each warp walks its range again; a pair's row is the warp's cursor of its bucket
//             plus its rank among the tile's lanes of that bucket. The lanes of a bucket find each
//             other by OR-ing their lane bits into a per-warp shared mask (CUB's onesweep radix
//             sort ranks digits the same way, WARP_MATCH_ATOMIC_OR): a few shared accesses per
//             lane whatever the number of buckets.
//   4. Pad    padding rows, the tail [total, capacity) and the bucket of every row block.
// Batches below bucket::kSplitPairs run all four steps in one block and one launch (shared-memory
// counts and a prefix sum, as vLLM's moe_align_block_size, which places pairs with atomics, so its
// order inside an expert varies from run to run). Larger ones split the pairs over several blocks
// (common/bucket_partition.hpp): count per block, scan per bucket over the blocks, then each block
// runs steps 1-4 on its range from its own first rows. No workspace either way, so both are safe
// to capture in a CUDA graph.

constexpr int kBucketMaxWarps = 32;
// Tiles of 32 pairs a lane loads before using any of them: that many loads in flight per warp.
constexpr int kBucketTiles = 16;
constexpr int kCountThreads = 512;
constexpr int kCountUnroll = 8;
constexpr int kScanThreads = 1024;

// Exclusive scan of values[0, count) in place by the whole block; writes the total to values[count].
// warp_sums is kBucketMaxWarps ints of shared scratch.
__device__ void block_exclusive_scan(int32_t* values, int32_t count, int32_t* warp_sums) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
    const int32_t per_thread = (count + int32_t(blockDim.x) - 1) / int32_t(blockDim.x);
    const int32_t lo = min(count, int32_t(threadIdx.x) * per_thread);
    const int32_t hi = min(count, lo + per_thread);
    int32_t local = 0;
    for (int32_t i = lo; i < hi; ++i) local += values[i];
    int32_t inclusive = local;
#pragma unroll
    for (int delta = 1; delta < kWarpSize; delta <<= 1) {
        const int32_t other = __shfl_up_sync(kFullMask, inclusive, delta);
        if (lane >= delta) inclusive += other;
    }
    if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int32_t sum = lane < warps ? warp_sums[lane] : 0;
        int32_t scanned = sum;
#pragma unroll
        for (int delta = 1; delta < kWarpSize; delta <<= 1) {
            const int32_t other = __shfl_up_sync(kFullMask, scanned, delta);
            if (lane >= delta) scanned += other;
        }
        if (lane < warps) warp_sums[lane] = scanned - sum;
        if (lane == kWarpSize - 1) values[count] = scanned;
    }
    __syncthreads();
    int32_t running = warp_sums[warp] + inclusive - local;
    for (int32_t i = lo; i < hi; ++i) {
        const int32_t value = values[i];
        values[i] = running;
        running += value;
    }
    __syncthreads();
}

template <class BucketOf>
__device__ __forceinline__ void load_tiles(const int32_t* __restrict__ ids, int64_t base, int64_t end, int lane,
                                           const BucketOf& bucket_of, bool* bad, int32_t (&bucket)[kBucketTiles]) {
#pragma unroll
    for (int j = 0; j < kBucketTiles; ++j) {
        const int64_t pair = base + j * kWarpSize + lane;
        bucket[j] = pair < end ? bucket_of(__ldg(ids + pair), bad) : kNoBucket;
    }
}

// Step 1 for one warp: its pairs [begin, end) counted into its shared row `cursor`.
template <class BucketOf>
__device__ void count_warp_range(const int32_t* __restrict__ ids, int64_t begin, int64_t end, const BucketOf& bucket_of,
                                 int32_t* cursor, bool* bad) {
    const int lane = threadIdx.x % kWarpSize;
    for (int64_t base = begin; base < end; base += kWarpSize * kBucketTiles) {
        int32_t bucket[kBucketTiles];
        load_tiles(ids, base, end, lane, bucket_of, bad, bucket);
#pragma unroll
        for (int j = 0; j < kBucketTiles; ++j)
            if (bucket[j] != kNoBucket) atomicAdd(&cursor[bucket[j]], 1);
    }
}

// Step 2 within a block: cursors[w][b] becomes first[b] (0 when NULL) + the counts of warps before
// w; with totals, each bucket's first[b] + block total goes there.
__device__ void scan_warps(int32_t* cursors, int warps, int32_t num_buckets, const int32_t* first, int32_t* totals) {
    for (int32_t b = threadIdx.x; b < num_buckets; b += blockDim.x) {
        int32_t running = first != nullptr ? first[b] : 0;
        for (int w = 0; w < warps; ++w) {
            const int32_t count = cursors[w * num_buckets + b];
            cursors[w * num_buckets + b] = running;
            running += count;
        }
        if (totals != nullptr) totals[b] = running;
    }
}

// Step 3 for one warp: places its pairs [begin, end) from its cursors (advanced as it goes).
template <class BucketOf>
__device__ void place_warp_range(const int32_t* __restrict__ ids, int64_t begin, int64_t end, const BucketOf& bucket_of,
                                 int32_t* cursor, uint32_t* peers, int32_t* __restrict__ sorted,
                                 int32_t* __restrict__ positions) {
    const int lane = threadIdx.x % kWarpSize;
    const uint32_t lanes_below = (1u << lane) - 1u;
    bool bad = false;  // flagged by the counting pass
    for (int64_t base = begin; base < end; base += kWarpSize * kBucketTiles) {
        int32_t bucket[kBucketTiles];
        load_tiles(ids, base, end, lane, bucket_of, &bad, bucket);
#pragma unroll
        for (int j = 0; j < kBucketTiles; ++j) {
            const int64_t pair = base + j * kWarpSize + lane;
            const int32_t b = bucket[j];
            if (b != kNoBucket) atomicOr(&peers[b], 1u << lane);
            __syncwarp();
            uint32_t same = 0;
            if (b != kNoBucket) {
                same = peers[b];
                const int32_t row = cursor[b] + __popc(same & lanes_below);
                sorted[row] = int32_t(pair);
                positions[pair] = row;
            } else if (pair < end) {
                positions[pair] = EPLB_DISPATCH_PADDING;
            }
            __syncwarp();
            // The lowest lane of each bucket advances the cursor and clears the mask for the next tile.
            if (b != kNoBucket && (same & lanes_below) == 0) {
                cursor[b] += __popc(same);
                peers[b] = 0;
            }
            __syncwarp();
        }
    }
}

// Step 4, shared by all blocks of the launch: padding rows [pad_begin(b), offsets[b + 1]) of every
// bucket, the tail [total, capacity), and the bucket owning each row block (when blocks != NULL).
template <class PadBegin>
__device__ void pad_rows(const int32_t* offsets, const PadBegin& pad_begin, int32_t num_buckets, int32_t block_size,
                         int64_t capacity, int32_t* __restrict__ sorted, int32_t* __restrict__ blocks) {
    const int lane = threadIdx.x % kWarpSize;
    const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
    const int64_t num_warps = int64_t(gridDim.x) * blockDim.x / kWarpSize;
    const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t threads = int64_t(gridDim.x) * blockDim.x;
    for (int64_t b = warp; b < num_buckets; b += num_warps)
        for (int32_t row = pad_begin(int32_t(b)) + lane; row < offsets[b + 1]; row += kWarpSize)
            sorted[row] = EPLB_DISPATCH_PADDING;
    const int32_t total = offsets[num_buckets];
    for (int64_t row = total + thread; row < capacity; row += threads) sorted[row] = EPLB_DISPATCH_PADDING;
    if (blocks != nullptr) {
        const int64_t num_blocks = capacity / block_size;
        for (int64_t block = thread; block < num_blocks; block += threads) {
            const int64_t row = block * block_size;
            int32_t owner = EPLB_DISPATCH_PADDING;
            if (row < total) {
                // The last bucket starting at or before the row; it owns the row since row < total.
                int32_t lo = 0, hi = num_buckets - 1;
                while (lo < hi) {
                    const int32_t mid = (lo + hi + 1) / 2;
                    if (offsets[mid] <= row)
                        lo = mid;
                    else
                        hi = mid - 1;
                }
                owner = lo;
            }
            blocks[block] = owner;
        }
    }
}

// The whole sort in one block (batches below bucket::kSplitPairs).
template <class BucketOf>
__global__ void __launch_bounds__(kBucketMaxWarps* kWarpSize, 1)
    stable_bucket_kernel(const int32_t* __restrict__ ids, int64_t num_pairs, BucketOf bucket_of, int32_t num_buckets,
                         int32_t block_size, int64_t capacity, int32_t* __restrict__ counts,
                         int32_t* __restrict__ offsets, int32_t* __restrict__ sorted, int32_t* __restrict__ blocks,
                         int32_t* __restrict__ positions, uint32_t* error_flags) {
    extern __shared__ int32_t bucket_shared[];
    const int warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
    int32_t* cursors = bucket_shared;                                                   // [warps][num_buckets]
    uint32_t* peer_masks = reinterpret_cast<uint32_t*>(cursors + warps * num_buckets);  // [warps][num_buckets]
    int32_t* starts = reinterpret_cast<int32_t*>(peer_masks + warps * num_buckets);     // [num_buckets + 1]
    int32_t* warp_sums = starts + num_buckets + 1;                                      // [kBucketMaxWarps]
    int32_t* cursor = cursors + warp * num_buckets;

    for (int32_t i = threadIdx.x; i < 2 * warps * num_buckets; i += blockDim.x) bucket_shared[i] = 0;
    __syncthreads();
    const int64_t begin = bucket::warp_begin(warp, warps, 0, num_pairs);
    const int64_t end = bucket::warp_begin(warp + 1, warps, 0, num_pairs);

    // 1. Count
    bool bad = false;
    count_warp_range(ids, begin, end, bucket_of, cursor, &bad);
    if (bad) flag_bad_index(error_flags);
    __syncthreads();

    // 2. Scan
    scan_warps(cursors, warps, num_buckets, nullptr, starts);
    __syncthreads();
    for (int32_t b = threadIdx.x; b < num_buckets; b += blockDim.x) {
        counts[b] = starts[b];
        starts[b] = round_up(starts[b], block_size);
    }
    __syncthreads();
    block_exclusive_scan(starts, num_buckets, warp_sums);
    for (int32_t b = threadIdx.x; b <= num_buckets; b += blockDim.x) offsets[b] = starts[b];
    for (int32_t i = threadIdx.x; i < warps * num_buckets; i += blockDim.x) cursors[i] += starts[i % num_buckets];
    __syncthreads();

    // 3. Place
    place_warp_range(ids, begin, end, bucket_of, cursor, peer_masks + warp * num_buckets, sorted, positions);
    __syncthreads();

    // 4. Pad. After placing, the last warp's cursor of a bucket is the bucket's first padding row.
    const int32_t* pad_begin = cursors + (warps - 1) * num_buckets;
    pad_rows(starts, [pad_begin](int32_t b) { return pad_begin[b]; }, num_buckets, block_size, capacity, sorted, blocks);
}

// Several blocks, launch 1: block c counts its range per bucket into its scratch row.
template <class BucketOf>
__global__ void __launch_bounds__(kCountThreads)
    bucket_count_kernel(const int32_t* __restrict__ ids, int64_t num_pairs, BucketOf bucket_of, int32_t num_buckets,
                        int32_t* __restrict__ positions, uint32_t* error_flags) {
    extern __shared__ int32_t count_shared[];  // [num_buckets]
    const int32_t c = blockIdx.x, grid = gridDim.x;
    for (int32_t b = threadIdx.x; b < num_buckets; b += blockDim.x) count_shared[b] = 0;
    __syncthreads();
    const int64_t begin = bucket::block_begin(c, grid, num_pairs), end = bucket::block_begin(c + 1, grid, num_pairs);
    bool bad = false;
    for (int64_t base = begin; base < end; base += int64_t(kCountThreads) * kCountUnroll) {
        int32_t bucket[kCountUnroll];
#pragma unroll
        for (int u = 0; u < kCountUnroll; ++u) {
            const int64_t pair = base + int64_t(u) * kCountThreads + threadIdx.x;
            bucket[u] = pair < end ? bucket_of(__ldg(ids + pair), &bad) : kNoBucket;
        }
#pragma unroll
        for (int u = 0; u < kCountUnroll; ++u)
            if (bucket[u] != kNoBucket) atomicAdd(&count_shared[bucket[u]], 1);
    }
    if (bad) flag_bad_index(error_flags);
    __syncthreads();
    int32_t* row = positions + bucket::scratch_row(c, grid, num_pairs);
    for (int32_t b = threadIdx.x; b < num_buckets; b += blockDim.x) row[b] = count_shared[b];
}

// Several blocks, launch 2 (one block): per bucket, the blocks' counts in block order become each
// block's count of the bucket's earlier pairs; the totals give counts and the padded offsets.
__global__ void __launch_bounds__(kScanThreads)
    bucket_scan_kernel(int64_t num_pairs, int32_t num_buckets, int32_t grid, int32_t block_size,
                       int32_t* __restrict__ counts, int32_t* __restrict__ offsets, int32_t* __restrict__ positions) {
    extern __shared__ int32_t scan_shared[];
    int32_t* starts = scan_shared;                     // [num_buckets + 1]
    int32_t* warp_sums = scan_shared + num_buckets + 1;  // [kBucketMaxWarps]
    for (int32_t b = threadIdx.x; b < num_buckets; b += blockDim.x) {
        int32_t running = 0;
        for (int32_t c = 0; c < grid; ++c) {
            int32_t* entry = positions + bucket::scratch_row(c, grid, num_pairs) + b;
            const int32_t count = *entry;
            *entry = running;
            running += count;
        }
        counts[b] = running;
        starts[b] = round_up(running, block_size);
    }
    __syncthreads();
    block_exclusive_scan(starts, num_buckets, warp_sums);
    for (int32_t b = threadIdx.x; b <= num_buckets; b += blockDim.x) offsets[b] = starts[b];
}

// Several blocks, launch 3: block c reads its first rows (offsets + its scratch row), then runs
// count, scan and place on its range as the one-block kernel does; all blocks share the padding.
template <class BucketOf>
__global__ void __launch_bounds__(kBucketMaxWarps* kWarpSize, 1)
    bucket_place_kernel(const int32_t* __restrict__ ids, int64_t num_pairs, BucketOf bucket_of, int32_t num_buckets,
                        int32_t block_size, int64_t capacity, const int32_t* __restrict__ counts,
                        const int32_t* __restrict__ offsets, int32_t* __restrict__ sorted, int32_t* __restrict__ blocks,
                        int32_t* __restrict__ positions) {
    extern __shared__ int32_t bucket_shared[];
    const int warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
    const int32_t c = blockIdx.x, grid = gridDim.x;
    int32_t* cursors = bucket_shared;                                                   // [warps][num_buckets]
    uint32_t* peer_masks = reinterpret_cast<uint32_t*>(cursors + warps * num_buckets);  // [warps][num_buckets]
    int32_t* first = reinterpret_cast<int32_t*>(peer_masks + warps * num_buckets);      // [num_buckets]
    int32_t* s_offsets = first + num_buckets;                                           // [num_buckets + 1]
    int32_t* cursor = cursors + warp * num_buckets;

    // Read the scratch row before anything of this block's range is overwritten.
    const int32_t* row = positions + bucket::scratch_row(c, grid, num_pairs);
    for (int32_t b = threadIdx.x; b < num_buckets; b += blockDim.x) first[b] = __ldcg(offsets + b) + __ldcg(row + b);
    for (int32_t b = threadIdx.x; b <= num_buckets; b += blockDim.x) s_offsets[b] = __ldcg(offsets + b);
    for (int32_t i = threadIdx.x; i < 2 * warps * num_buckets; i += blockDim.x) bucket_shared[i] = 0;
    __syncthreads();
    const int64_t block_begin = bucket::block_begin(c, grid, num_pairs);
    const int64_t block_end = bucket::block_begin(c + 1, grid, num_pairs);
    const int64_t begin = bucket::warp_begin(warp, warps, block_begin, block_end);
    const int64_t end = bucket::warp_begin(warp + 1, warps, block_begin, block_end);

    bool bad = false;  // flagged by bucket_count_kernel
    count_warp_range(ids, begin, end, bucket_of, cursor, &bad);
    __syncthreads();
    scan_warps(cursors, warps, num_buckets, first, nullptr);
    __syncthreads();
    place_warp_range(ids, begin, end, bucket_of, cursor, peer_masks + warp * num_buckets, sorted, positions);
    pad_rows(s_offsets, [counts, s_offsets](int32_t b) { return s_offsets[b] + __ldcg(counts + b); }, num_buckets,
             block_size, capacity, sorted, blocks);
}

// Batches from this many pairs on use several blocks: bucket::kSplitPairs, or EPLB_ALIGN_SPLIT_PAIRS
// when set (a measurement knob: the benchmark times both paths on one GPU to place the crossover).
int64_t split_pairs() {
    const char* text = std::getenv("EPLB_ALIGN_SPLIT_PAIRS");
    if (text == nullptr || *text == '\0') return bucket::kSplitPairs;
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    return (end != nullptr && *end == '\0' && value >= 0) ? int64_t(value) : bucket::kSplitPairs;
}

SharedLimits<const void*>& bucket_shared_limits() {
    static SharedLimits<const void*> limits;
    return limits;
}

// Raises a bucketing kernel's dynamic shared-memory limit to what the device grants, once
// (cuda/shared_limit.hpp: never lowered, so concurrent callers cannot undercut each other).
cudaError_t ensure_bucket_shared(const void* kernel, int device, size_t bytes, size_t max_shared) {
    if (bytes <= 48 * 1024) return cudaSuccess;
    return bucket_shared_limits().ensure(device, kernel, bytes, max_shared, max_shared, [kernel](size_t limit) {
        return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit));
    });
}

template <class BucketOf>
cudaError_t launch_stable_bucket(const int32_t* ids, int64_t num_pairs, BucketOf bucket_of, int32_t num_buckets,
                                 int32_t block_size, int64_t capacity, int32_t* counts, int32_t* offsets,
                                 int32_t* sorted, int32_t* blocks, int32_t* positions, uint32_t* error_flags,
                                 cudaStream_t stream) {
    int device = 0;
    int max_shared = 0;
    EPLB_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    EPLB_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int32_t grid = bucket::block_count(num_pairs, num_buckets, split_pairs());
    // As many warps as have room for their private cursors and peer masks, at most 32 (1024 threads).
    const size_t fixed_ints = grid == 1 ? size_t(num_buckets) + 1 + kBucketMaxWarps : 2 * size_t(num_buckets) + 1;
    const size_t fixed_bytes = fixed_ints * sizeof(int32_t);
    const size_t warp_bytes = 2 * size_t(num_buckets) * sizeof(int32_t);
    if (size_t(max_shared) < fixed_bytes + warp_bytes) return cudaErrorInvalidConfiguration;
    const int warps = int(std::min<size_t>(kBucketMaxWarps, (size_t(max_shared) - fixed_bytes) / warp_bytes));
    const size_t shared_bytes = fixed_bytes + warp_bytes * size_t(warps);

    if (grid == 1) {
        const void* kernel = reinterpret_cast<const void*>(&stable_bucket_kernel<BucketOf>);
        EPLB_CUDA_RETURN_IF_ERROR(ensure_bucket_shared(kernel, device, shared_bytes, size_t(max_shared)));
        stable_bucket_kernel<BucketOf><<<1, warps * kWarpSize, shared_bytes, stream>>>(
            ids, num_pairs, bucket_of, num_buckets, block_size, capacity, counts, offsets, sorted, blocks, positions,
            error_flags);
        return cudaGetLastError();
    }
    // Count (B ints of shared memory, at most 32 KiB), scan ((B + 1 + 32) ints), place.
    bucket_count_kernel<BucketOf><<<grid, kCountThreads, size_t(num_buckets) * sizeof(int32_t), stream>>>(
        ids, num_pairs, bucket_of, num_buckets, positions, error_flags);
    EPLB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    bucket_scan_kernel<<<1, kScanThreads, (size_t(num_buckets) + 1 + kBucketMaxWarps) * sizeof(int32_t), stream>>>(
        num_pairs, num_buckets, grid, block_size, counts, offsets, positions);
    EPLB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    const void* place = reinterpret_cast<const void*>(&bucket_place_kernel<BucketOf>);
    EPLB_CUDA_RETURN_IF_ERROR(ensure_bucket_shared(place, device, shared_bytes, size_t(max_shared)));
    bucket_place_kernel<BucketOf><<<grid, warps * kWarpSize, shared_bytes, stream>>>(
        ids, num_pairs, bucket_of, num_buckets, block_size, capacity, counts, offsets, sorted, blocks, positions);
    return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Permute and combine: one block per row (grid-stride over rows), enough blocks to fill the GPU.

constexpr int kRowThreads = 128;
constexpr int kRowBlocksPerSm = 2048 / kRowThreads;
// Vectors a thread loads before storing any (permute): 8 x 16 bytes in flight per thread.
constexpr int kPermuteUnroll = 8;

int row_grid(int64_t rows, int sm_count) {
    return int(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(std::max(sm_count, 1)) * kRowBlocksPerSm)));
}

template <typename Vec>
__global__ void __launch_bounds__(kRowThreads)
    permute_kernel(const Vec* __restrict__ x, int64_t row_vecs, int64_t num_pairs, int32_t top_k,
                   const int32_t* __restrict__ row_pair_ids, const int32_t* __restrict__ num_rows, int64_t capacity,
                   Vec* __restrict__ out, uint32_t* error_flags) {
    int64_t rows = *num_rows;
    if (rows < 0 || rows > capacity) {
        if (blockIdx.x == 0 && threadIdx.x == 0) flag_bad_index(error_flags);
        rows = rows < 0 ? 0 : capacity;
    }
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const int32_t pair = __ldg(row_pair_ids + row);
        if (pair < 0 || pair >= num_pairs) {
            if (pair != EPLB_DISPATCH_PADDING && threadIdx.x == 0) flag_bad_index(error_flags);
            continue;  // padding rows are not written
        }
        const Vec* source = x + int64_t(pair / top_k) * row_vecs;
        Vec* target = out + row * row_vecs;
        for (int64_t base = threadIdx.x; base < row_vecs; base += int64_t(kRowThreads) * kPermuteUnroll) {
            Vec values[kPermuteUnroll];
            // Load
#pragma unroll
            for (int u = 0; u < kPermuteUnroll; ++u) {
                const int64_t i = base + int64_t(u) * kRowThreads;
                if (i < row_vecs) values[u] = __ldg(source + i);
            }
            // Store
#pragma unroll
            for (int u = 0; u < kPermuteUnroll; ++u) {
                const int64_t i = base + int64_t(u) * kRowThreads;
                if (i < row_vecs) target[i] = values[u];
            }
        }
    }
}

template <typename Vec>
cudaError_t launch_permute(const void* x, int64_t row_vecs, int64_t num_pairs, int32_t top_k,
                           const int32_t* row_pair_ids, const int32_t* num_rows, int64_t capacity, void* out,
                           uint32_t* error_flags, int sm_count, cudaStream_t stream) {
    permute_kernel<Vec><<<row_grid(capacity, sm_count), kRowThreads, 0, stream>>>(
        static_cast<const Vec*>(x), row_vecs, num_pairs, top_k, row_pair_ids, num_rows, capacity, static_cast<Vec*>(out),
        error_flags);
    return cudaGetLastError();
}

// Combine works on chunks of 8 elements per thread: 16 bytes of bf16 or 32 bytes of fp32.
constexpr int kChunk = 8;
// Terms (contributing k) whose chunks a thread loads before summing them, in ascending k.
constexpr int kCombineTerms = 4;

__device__ __forceinline__ void load_chunk(const uint16_t* p, float (&v)[kChunk]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = bf16_to_float(uint16_t(words[i] & 0xFFFFu));
        v[2 * i + 1] = bf16_to_float(uint16_t(words[i] >> 16));
    }
}

__device__ __forceinline__ void load_chunk(const float* p, float (&v)[kChunk]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void store_chunk(uint16_t* p, const float (&v)[kChunk]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = uint32_t(float_to_bf16(v[2 * i])) | (uint32_t(float_to_bf16(v[2 * i + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ void store_chunk(float* p, const float (&v)[kChunk]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename TIn, typename TOut, bool kVector>
__global__ void __launch_bounds__(kRowThreads)
    combine_kernel(const TIn* __restrict__ y, int64_t y_rows, int64_t hidden, const int32_t* __restrict__ positions,
                   const float* __restrict__ weights, int64_t num_tokens, int32_t top_k, TOut* __restrict__ out,
                   uint32_t* error_flags) {
    extern __shared__ int64_t combine_shared[];
    int64_t* term_offsets = combine_shared;                                    // [top_k] element offsets into y
    float* term_weights = reinterpret_cast<float*>(term_offsets + top_k);     // [top_k]
    __shared__ int32_t num_terms;

    for (int64_t token = blockIdx.x; token < num_tokens; token += gridDim.x) {
        // Gather the token's contributing terms, compacted in ascending k (warp 0).
        if (threadIdx.x < kWarpSize) {
            const uint32_t lanes_below = (1u << threadIdx.x) - 1u;
            int32_t terms = 0;
            for (int32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
                const int32_t k = k0 + int32_t(threadIdx.x);
                int32_t row = EPLB_DISPATCH_PADDING;
                float weight = 1.0f;
                if (k < top_k) {
                    const int64_t pair = token * top_k + k;
                    row = __ldg(positions + pair);
                    if (row < EPLB_DISPATCH_PADDING || row >= y_rows) {
                        flag_bad_index(error_flags);
                        row = EPLB_DISPATCH_PADDING;
                    }
                    if (weights != nullptr) weight = __ldg(weights + pair);
                }
                const uint32_t valid = __ballot_sync(kFullMask, row >= 0);
                if (row >= 0) {
                    const int32_t term = terms + __popc(valid & lanes_below);
                    term_offsets[term] = int64_t(row) * hidden;
                    term_weights[term] = weight;
                }
                terms += __popc(valid);
            }
            if (threadIdx.x == 0) num_terms = terms;
        }
        __syncthreads();
        const int32_t terms = num_terms;
        TOut* target = out + token * hidden;
        if constexpr (kVector) {
            for (int64_t c = int64_t(threadIdx.x) * kChunk; c < hidden; c += int64_t(kRowThreads) * kChunk) {
                float acc[kChunk] = {};
                int32_t t = 0;
                for (; t + kCombineTerms <= terms; t += kCombineTerms) {
                    // Load
                    float values[kCombineTerms][kChunk];
#pragma unroll
                    for (int u = 0; u < kCombineTerms; ++u) load_chunk(y + term_offsets[t + u] + c, values[u]);
                    // Reduce, in ascending k
#pragma unroll
                    for (int u = 0; u < kCombineTerms; ++u)
#pragma unroll
                        for (int i = 0; i < kChunk; ++i) acc[i] = weighted_add(acc[i], term_weights[t + u], values[u][i]);
                }
                for (; t < terms; ++t) {
                    float values[kChunk];
                    load_chunk(y + term_offsets[t] + c, values);
#pragma unroll
                    for (int i = 0; i < kChunk; ++i) acc[i] = weighted_add(acc[i], term_weights[t], values[i]);
                }
                // Store
                store_chunk(target + c, acc);
            }
        } else {
            for (int64_t h = threadIdx.x; h < hidden; h += kRowThreads) {
                float acc = 0.0f;
                for (int32_t t = 0; t < terms; ++t) acc = weighted_add(acc, term_weights[t], to_float(y[term_offsets[t] + h]));
                target[h] = from_float<TOut>(acc);
            }
        }
        __syncthreads();  // this token's terms are consumed before the next token's overwrite them
    }
}

template <typename TIn, typename TOut>
cudaError_t launch_combine(const void* y, int64_t y_rows, int64_t hidden, const int32_t* positions,
                           const float* weights, int64_t num_tokens, int32_t top_k, void* out, uint32_t* error_flags,
                           int sm_count, cudaStream_t stream) {
    const bool vector = hidden % kChunk == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const size_t shared_bytes = size_t(top_k) * (sizeof(int64_t) + sizeof(float));
    const int grid = row_grid(num_tokens, sm_count);
    const auto* input = static_cast<const TIn*>(y);
    auto* output = static_cast<TOut*>(out);
    if (vector)
        combine_kernel<TIn, TOut, true><<<grid, kRowThreads, shared_bytes, stream>>>(
            input, y_rows, hidden, positions, weights, num_tokens, top_k, output, error_flags);
    else
        combine_kernel<TIn, TOut, false><<<grid, kRowThreads, shared_bytes, stream>>>(
            input, y_rows, hidden, positions, weights, num_tokens, top_k, output, error_flags);
    return cudaGetLastError();
}

template <typename TIn>
cudaError_t launch_combine_to(eplb_dtype_t out_dtype, const void* y, int64_t y_rows, int64_t hidden,
                              const int32_t* positions, const float* weights, int64_t num_tokens, int32_t top_k,
                              void* out, uint32_t* error_flags, int sm_count, cudaStream_t stream) {
    if (out_dtype == EPLB_DTYPE_BF16)
        return launch_combine<TIn, uint16_t>(y, y_rows, hidden, positions, weights, num_tokens, top_k, out, error_flags,
                                             sm_count, stream);
    return launch_combine<TIn, float>(y, y_rows, hidden, positions, weights, num_tokens, top_k, out, error_flags,
                                      sm_count, stream);
}

}  // namespace

cudaError_t align(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t first_slot,
                  int32_t num_local_experts, int32_t block_size, int64_t capacity, int32_t* expert_counts,
                  int32_t* expert_offsets, int32_t* sorted_pair_ids, int32_t* block_experts, int32_t* pair_positions,
                  uint32_t* error_flags, cudaStream_t stream) {
    return launch_stable_bucket(physical_ids, num_tokens * top_k, LocalExpertOf{first_slot, num_local_experts},
                                num_local_experts, block_size, capacity, expert_counts, expert_offsets, sorted_pair_ids,
                                block_experts, pair_positions, error_flags, stream);
}

cudaError_t bucket_by_rank(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t num_physical,
                           int32_t num_ranks, int32_t* rank_counts, int32_t* rank_offsets, int32_t* send_pair_ids,
                           int32_t* pair_positions, uint32_t* error_flags, cudaStream_t stream) {
    const int64_t num_pairs = num_tokens * top_k;
    return launch_stable_bucket(physical_ids, num_pairs, RankOf{num_physical, num_physical / num_ranks}, num_ranks, 1,
                                num_pairs, rank_counts, rank_offsets, send_pair_ids, nullptr, pair_positions,
                                error_flags, stream);
}

cudaError_t permute(eplb_dtype_t dtype, const void* x, int64_t num_tokens, int64_t hidden, int32_t top_k,
                    const int32_t* row_pair_ids, const int32_t* num_rows, int64_t capacity, void* out,
                    uint32_t* error_flags, int sm_count, cudaStream_t stream) {
    const int64_t element_bytes = dtype == EPLB_DTYPE_BF16 ? 2 : 4;
    const int64_t row_bytes = hidden * element_bytes;
    const int64_t num_pairs = num_tokens * top_k;
    const bool vector = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(out) % 16 == 0;
    if (vector)
        return launch_permute<uint4>(x, row_bytes / 16, num_pairs, top_k, row_pair_ids, num_rows, capacity, out,
                                     error_flags, sm_count, stream);
    if (element_bytes == 2)
        return launch_permute<uint16_t>(x, hidden, num_pairs, top_k, row_pair_ids, num_rows, capacity, out, error_flags,
                                        sm_count, stream);
    return launch_permute<uint32_t>(x, hidden, num_pairs, top_k, row_pair_ids, num_rows, capacity, out, error_flags,
                                    sm_count, stream);
}

cudaError_t combine(eplb_dtype_t y_dtype, const void* y, int64_t y_rows, int64_t hidden, const int32_t* pair_positions,
                    const float* weights, int64_t num_tokens, int32_t top_k, eplb_dtype_t out_dtype, void* out,
                    uint32_t* error_flags, int sm_count, cudaStream_t stream) {
    if (num_tokens == 0) return cudaSuccess;
    if (y_dtype == EPLB_DTYPE_BF16)
        return launch_combine_to<uint16_t>(out_dtype, y, y_rows, hidden, pair_positions, weights, num_tokens, top_k, out,
                                           error_flags, sm_count, stream);
    return launch_combine_to<float>(out_dtype, y, y_rows, hidden, pair_positions, weights, num_tokens, top_k, out,
                                    error_flags, sm_count, stream);
}

}  // namespace eplb::cuda
