#include "cuda/mapping.cuh"

#include <algorithm>

#include "common/replica.hpp"
#include "cuda/launch.cuh"
#include "cuda/record.cuh"

namespace eplb::cuda {

namespace {

constexpr int kThreads = 256;
// Counters of up to this many slots are accumulated in shared memory first (32 KiB), so a block
// issues one global atomic per touched slot instead of one per (token, k).
constexpr int kMaxSharedCounters = 8192;

template <bool kSharedHistogram>
__global__ void __launch_bounds__(kThreads)
    map_kernel(const int32_t* __restrict__ topk_ids, int64_t num_elements, int32_t top_k, eplb_expert_map_t map,
               const int32_t* __restrict__ num_unpadded, int32_t* physical_ids, uint32_t* error_flags) {
    extern __shared__ int32_t shared_counters[];
    __shared__ int record_shared;
    const int64_t num_tokens = num_elements / top_k;
    int64_t unpadded = num_tokens;
    if (num_unpadded != nullptr) unpadded = max(int64_t(0), min(num_tokens, int64_t(*num_unpadded)));
    // The flag is read once per block: it guards __syncthreads below, and another stream may flip
    // it while the kernel runs, so every thread of the block must see the same value.
    if (threadIdx.x == 0) record_shared = map.record_flag != nullptr && *map.record_flag != 0 && map.counters != nullptr;
    __syncthreads();
    const bool record = record_shared != 0;

    if (kSharedHistogram && record) {
        for (int i = threadIdx.x; i < map.num_physical; i += blockDim.x) shared_counters[i] = 0;
        __syncthreads();
    }

    bool bad_table = false;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < num_elements; index += stride) {
        // Route -> map -> mask padding -> record.
        const int64_t row = index / top_k;
        const int32_t k = int32_t(index - row * top_k);
        int32_t physical = -1;
        if (row < unpadded) physical = map_one(map, topk_ids[index], row, k, top_k, &bad_table);
        physical_ids[index] = physical;
        if (record && physical >= 0) {
            if (kSharedHistogram)
                atomicAdd(&shared_counters[physical], 1);
            else
                record_load(&map.counters[physical], 1, error_flags);
        }
    }
    if (bad_table) atomicOr(error_flags, uint32_t(EPLB_DEVICE_ERROR_BAD_TABLE));

    if (kSharedHistogram && record) {
        __syncthreads();
        for (int i = threadIdx.x; i < map.num_physical; i += blockDim.x) {
            const int32_t count = shared_counters[i];
            if (count != 0) record_load(&map.counters[i], count, error_flags);
        }
    }
}

}  // namespace

cudaError_t map_logical_to_physical(const int32_t* topk_ids, int64_t num_tokens, int32_t top_k,
                                    const eplb_expert_map_t& map, const int32_t* num_unpadded, int32_t* physical_ids,
                                    uint32_t* error_flags, int sm_count, cudaStream_t stream) {
    const int64_t num_elements = num_tokens * top_k;
    if (num_elements == 0) return cudaSuccess;
    // Enough blocks to fill the machine, few enough that each block's histogram flush is amortised
    // over many elements (about 4 elements per thread before the grid is the whole GPU).
    const int64_t wanted = (num_elements + kThreads * 4 - 1) / (kThreads * 4);
    const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(std::max(sm_count, 1)) * 4)));
    const bool shared = map.num_physical <= kMaxSharedCounters && map.counters != nullptr && map.record_flag != nullptr;
    if (shared) {
        const size_t shared_bytes = size_t(map.num_physical) * sizeof(int32_t);
        map_kernel<true><<<blocks, kThreads, shared_bytes, stream>>>(topk_ids, num_elements, top_k, map, num_unpadded,
                                                                    physical_ids, error_flags);
    } else {
        map_kernel<false><<<blocks, kThreads, 0, stream>>>(topk_ids, num_elements, top_k, map, num_unpadded,
                                                          physical_ids, error_flags);
    }
    return cudaGetLastError();
}

}  // namespace eplb::cuda
