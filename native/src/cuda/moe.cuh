// CUDA MoE expert computation (docs/design.md §7): the cooperative fused kernel and the unfused kernels.
// Mirrors cpu/moe.hpp; device pointers throughout, the problem is read on the host at launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/moe.hpp"

namespace eplb::cuda {

// What the device offers the fused kernel of one tile height.
struct MegaMoeOccupancy {
    bool cooperative_launch = false;  // cudaDevAttrCooperativeLaunch
    int sm_count = 0;
    size_t shared_bytes = 0;      // dynamic shared memory of one block
    size_t max_shared_bytes = 0;  // the most one block may opt in to
    int blocks_per_sm = 0;        // from cudaOccupancyMaxActiveBlocksPerMultiprocessor; 0 = does not fit
    int max_blocks = 0;           // blocks_per_sm * sm_count: the largest co-resident grid
};

// Fills *out for the fused kernel with tile height block_m (32 or 128) and num_local_experts on the
// current device.
cudaError_t mega_moe_occupancy(int block_m, int32_t num_local_experts, MegaMoeOccupancy* out);

// Queues the fused kernel as one cooperative launch of grid_blocks blocks (<= max_blocks of
// mega_moe_occupancy; a larger grid returns cudaErrorCooperativeLaunchTooLarge). Blocks that fail
// to meet at a grid barrier within the timeout set EPLB_DEVICE_ERROR_GRID_BARRIER_TIMEOUT in
// *error_flags (a device word) and exit.
cudaError_t mega_moe(const MoeProblem& problem, int block_m, int grid_blocks, uint32_t* error_flags, cudaStream_t stream);

// Queues the unfused path: eplb_dispatch_align (block size 1) and permute, grouped GEMM1 + SwiGLU,
// grouped GEMM2, eplb_dispatch_combine. Bad ids found by the dispatch kernels set
// EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX in *error_flags.
cudaError_t moe_unfused(const MoeProblem& problem, int block_m, int sm_count, uint32_t* error_flags,
                        cudaStream_t stream);

}  // namespace eplb::cuda
