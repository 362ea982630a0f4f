// ABI entry of the MoE expert computation (eplb_moe.h): validation, workspace layout, then the CPU
// reference or the CUDA kernels (fused cooperative or unfused).
#include <cmath>

#include "capi/validate.hpp"
#include "common/moe.hpp"
#include "cpu/moe.hpp"
#include "eplb/eplb_moe.h"

#if EPLB_WITH_CUDA
#include "cuda/moe.cuh"
#endif

using namespace eplb;
using namespace eplb::capi;

namespace {

// Bounds that keep every index of the kernels inside its integer type with room to spare.
constexpr int64_t kMaxDimension = 1 << 16;

void check_shape(const eplb_moe_shape_t* shape) {
    if (shape == nullptr) invalid("shape must not be NULL");
    check_in_range(shape->hidden, 64, kMaxDimension, "shape->hidden");
    if (shape->hidden % 64 != 0) invalid("shape->hidden must be a multiple of 64 (got ", shape->hidden, ")");
    check_in_range(shape->intermediate, 64, kMaxDimension, "shape->intermediate");
    if (shape->intermediate % 64 != 0)
        invalid("shape->intermediate must be a multiple of 64 (got ", shape->intermediate, ")");
    check_in_range(shape->top_k, 1, EPLB_MOE_MAX_TOP_K, "shape->top_k");
    check_in_range(shape->num_experts, 1, INT32_MAX, "shape->num_experts");
    check_in_range(shape->num_local_experts, 1, EPLB_MOE_MAX_LOCAL_EXPERTS, "shape->num_local_experts");
    check_in_range(shape->first_local_expert, 0, INT32_MAX, "shape->first_local_expert");
    if (int64_t(shape->first_local_expert) + shape->num_local_experts > shape->num_experts)
        invalid("the local experts [", shape->first_local_expert, ", ",
                int64_t(shape->first_local_expert) + shape->num_local_experts, ") do not lie inside [0, num_experts = ",
                shape->num_experts, ")");
    if (!std::isfinite(shape->swiglu_limit) || shape->swiglu_limit < 0.0f)
        invalid("shape->swiglu_limit must be finite and >= 0 (0 = no clamp) (got ", shape->swiglu_limit, ")");
    if (shape->block_m != 0 && shape->block_m != kMoeSmallBlockM && shape->block_m != kMoeLargeBlockM)
        invalid("shape->block_m must be 0 (automatic), ", kMoeSmallBlockM, " or ", kMoeLargeBlockM, " (got ",
                shape->block_m, ")");
}

// Pairs index int32 tables (sorted rows, positions), so T * K must stay below 2^31.
void check_tokens(int64_t num_tokens, const eplb_moe_shape_t& shape, const char* name) {
    check_in_range(num_tokens, 0, INT32_MAX / shape.top_k, name);
}

void check_aligned(const void* pointer, uint64_t alignment, const char* name) {
    if (reinterpret_cast<uintptr_t>(pointer) % alignment != 0)
        invalid(name, " (", pointer, ") must be ", alignment, "-byte aligned");
}

MoeWorkspaceLayout layout_of(const eplb_moe_shape_t& shape, int64_t num_tokens) {
    return MoeWorkspaceLayout::make(num_tokens, shape.top_k, shape.hidden, shape.intermediate, shape.num_local_experts);
}

// Checks everything a call reads or writes; returns the problem on raw pointers.
MoeProblem checked_problem(const eplb_stream_t& stream, const eplb_moe_shape_t* shape, int64_t num_tokens,
                           const eplb_moe_tensors_t* tensors) {
    check_shape(shape);
    check_tokens(num_tokens, *shape, "num_tokens");
    if (tensors == nullptr) invalid("tensors must not be NULL");
    const eplb_moe_tensors_t& t = *tensors;
    // The CUDA kernels move 16-byte vectors; the CPU reference needs natural alignment only.
    const bool cuda = stream.backend == EPLB_BACKEND_CUDA;
    const uint64_t vector = cuda ? 16 : sizeof(uint16_t);
    const int64_t w1_elements = int64_t(shape->num_local_experts) * 2 * shape->intermediate * shape->hidden;
    const int64_t w2_elements = int64_t(shape->num_local_experts) * shape->hidden * shape->intermediate;
    check_aligned(t.w1, vector, "tensors->w1");
    check_aligned(t.w2, vector, "tensors->w2");
    check_elements(stream, t.w1, w1_elements, "tensors->w1");
    check_elements(stream, t.w2, w2_elements, "tensors->w2");
    const MoeWorkspaceLayout layout = layout_of(*shape, num_tokens);
    if (num_tokens > 0) {
        const int64_t pairs = num_tokens * shape->top_k;
        check_aligned(t.x, vector, "tensors->x");
        check_aligned(t.output, vector, "tensors->output");
        check_elements(stream, t.x, num_tokens * shape->hidden, "tensors->x");
        check_elements(stream, t.topk_ids, pairs, "tensors->topk_ids");
        check_elements(stream, t.topk_weights, pairs, "tensors->topk_weights");
        check_elements(stream, t.output, num_tokens * shape->hidden, "tensors->output");
        if (t.workspace == nullptr) invalid("tensors->workspace must not be NULL");
        check_aligned(t.workspace, cuda ? MoeWorkspaceLayout::kAlignment : sizeof(int32_t), "tensors->workspace");
        if (t.workspace_bytes < layout.total)
            invalid("tensors->workspace_bytes = ", t.workspace_bytes, " is too small: ", num_tokens,
                    " tokens need eplb_moe_workspace_size = ", layout.total, " bytes");
        check_pointer(stream, t.workspace, layout.total, 1, "tensors->workspace");
    }
    MoeProblem p;
    p.x = t.x;
    p.topk_ids = t.topk_ids;
    p.topk_weights = t.topk_weights;
    p.w1 = t.w1;
    p.w2 = t.w2;
    p.output = t.output;
    p.num_tokens = num_tokens;
    p.hidden = shape->hidden;
    p.intermediate = shape->intermediate;
    p.top_k = shape->top_k;
    p.num_local_experts = shape->num_local_experts;
    p.first_local_expert = shape->first_local_expert;
    p.swiglu_limit = shape->swiglu_limit;
    if (num_tokens > 0) {
        char* base = static_cast<char*>(t.workspace);
        p.control = reinterpret_cast<uint32_t*>(base + layout.control);
        p.expert_offsets = reinterpret_cast<int32_t*>(base + layout.expert_offsets);
        p.expert_counts = reinterpret_cast<int32_t*>(base + layout.expert_counts);
        p.ready = reinterpret_cast<int32_t*>(base + layout.ready);
        p.positions = reinterpret_cast<int32_t*>(base + layout.positions);
        p.sorted = reinterpret_cast<int32_t*>(base + layout.sorted);
        p.intermediate_rows = reinterpret_cast<uint16_t*>(base + layout.intermediate);
        p.expert_out = reinterpret_cast<uint16_t*>(base + layout.expert_out);
    }
    return p;
}

int block_m_of(const eplb_moe_shape_t& shape, int64_t num_tokens) {
    return moe_pick_block_m(shape.block_m, num_tokens, shape.top_k, shape.num_experts);
}

#if EPLB_WITH_CUDA
// The CUDA tile height and the fused kernel's occupancy with it. An automatic 128 falls back to 32
// on devices whose blocks cannot hold the larger tile's shared memory (sm_86 and sm_89 grant
// 99 KiB per block, the 128-row tile needs about 104 KiB).
int cuda_block_m(const eplb_moe_shape_t& shape, int64_t num_tokens, cuda::MegaMoeOccupancy* occupancy) {
    int block_m = block_m_of(shape, num_tokens);
    EPLB_CUDA_CHECK(cuda::mega_moe_occupancy(block_m, shape.num_local_experts, occupancy));
    if (shape.block_m == 0 && block_m == kMoeLargeBlockM && occupancy->blocks_per_sm == 0) {
        block_m = kMoeSmallBlockM;
        EPLB_CUDA_CHECK(cuda::mega_moe_occupancy(block_m, shape.num_local_experts, occupancy));
    }
    return block_m;
}

// Throws COOPERATIVE_LAUNCH_UNAVAILABLE saying why the fused kernel cannot launch, if it cannot.
void check_cooperative(const eplb_stream_t& stream, int block_m, int32_t num_local_experts,
                       const cuda::MegaMoeOccupancy& occupancy) {
    if (!occupancy.cooperative_launch)
        fail(EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE, "CUDA device ", stream.device,
             " does not support cooperative launches; run eplb_moe_unfused instead");
    if (occupancy.blocks_per_sm == 0)
        fail(EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE, "one block of the fused kernel (tile height ", block_m, ", ",
             num_local_experts, " local experts) needs ", occupancy.shared_bytes,
             " bytes of shared memory and cannot fit on an SM of CUDA device ", stream.device, " (at most ",
             occupancy.max_shared_bytes, " per block)");
}
#endif

}  // namespace

extern "C" {

EPLB_API eplb_status_t eplb_moe_workspace_size(const eplb_moe_shape_t* shape, int64_t max_tokens, uint64_t* out_bytes) {
    EPLB_API_BEGIN
    check_shape(shape);
    check_tokens(max_tokens, *shape, "max_tokens");
    EPLB_CHECK_NOT_NULL(out_bytes);
    *out_bytes = layout_of(*shape, max_tokens).total;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_mega_moe_max_grid(eplb_stream_t* stream, const eplb_moe_shape_t* shape, int64_t num_tokens,
                                              int32_t* out_blocks, int32_t* out_block_m) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_shape(shape);
    check_tokens(num_tokens, *shape, "num_tokens");
    EPLB_CHECK_NOT_NULL(out_blocks);
    int block_m = block_m_of(*shape, num_tokens);
    int32_t blocks = 1;
#if EPLB_WITH_CUDA
    if (s.backend == EPLB_BACKEND_CUDA) {
        DeviceGuard guard(s.device);
        cuda::MegaMoeOccupancy occupancy;
        block_m = cuda_block_m(*shape, num_tokens, &occupancy);
        check_cooperative(s, block_m, shape->num_local_experts, occupancy);
        blocks = occupancy.max_blocks;
    }
#else
    (void)s;
#endif
    *out_blocks = blocks;
    if (out_block_m != nullptr) *out_block_m = block_m;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_mega_moe(eplb_stream_t* stream, const eplb_moe_shape_t* shape, int64_t num_tokens,
                                     const eplb_moe_tensors_t* tensors, int32_t grid_blocks) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    const MoeProblem problem = checked_problem(s, shape, num_tokens, tensors);
    check_in_range(grid_blocks, 0, INT32_MAX, "grid_blocks");
    if (s.backend == EPLB_BACKEND_CPU) {
        if (num_tokens > 0) cpu::mega_moe(problem);
        return EPLB_STATUS_OK;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(s.device);
    cuda::MegaMoeOccupancy occupancy;
    const int block_m = cuda_block_m(*shape, num_tokens, &occupancy);
    check_cooperative(s, block_m, shape->num_local_experts, occupancy);
    const int grid = grid_blocks > 0 ? grid_blocks : occupancy.max_blocks;
    if (grid > occupancy.max_blocks)
        fail(EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE, "a grid of ", grid, " blocks cannot co-reside on CUDA device ",
             s.device, ": at most ", occupancy.max_blocks, " (", occupancy.blocks_per_sm, " per SM x ",
             occupancy.sm_count, " SMs with ", occupancy.shared_bytes, " bytes of shared memory per block)");
    if (num_tokens == 0) return EPLB_STATUS_OK;
    const cudaError_t error = cuda::mega_moe(problem, block_m, grid, s.device_error_flags, cuda_stream_of(s));
    if (error == cudaErrorCooperativeLaunchTooLarge || error == cudaErrorNotSupported) {
        cudaGetLastError();
        fail(EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE, "cudaLaunchCooperativeKernel refused a grid of ", grid,
             " blocks: ", cudaGetErrorString(error), "; run eplb_moe_unfused instead");
    }
    EPLB_CUDA_CHECK(error);
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_moe_unfused(eplb_stream_t* stream, const eplb_moe_shape_t* shape, int64_t num_tokens,
                                        const eplb_moe_tensors_t* tensors) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    const MoeProblem problem = checked_problem(s, shape, num_tokens, tensors);
    if (num_tokens == 0) return EPLB_STATUS_OK;
    if (s.backend == EPLB_BACKEND_CPU) {
        cpu::moe_unfused(problem);
        return EPLB_STATUS_OK;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(s.device);
    cuda::MegaMoeOccupancy occupancy;
    const int block_m = cuda_block_m(*shape, num_tokens, &occupancy);
    if (occupancy.blocks_per_sm == 0)
        fail(EPLB_STATUS_UNSUPPORTED, "the tile height ", block_m, " needs ", occupancy.shared_bytes,
             " bytes of shared memory per block; CUDA device ", s.device, " grants ", occupancy.max_shared_bytes,
             " (use block_m = 0 or ", kMoeSmallBlockM, ")");
    EPLB_CUDA_CHECK(cuda::moe_unfused(problem, block_m, s.sm_count, s.device_error_flags, cuda_stream_of(s)));
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

}  // extern "C"
