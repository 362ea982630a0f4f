// ABI entry of the logical -> physical mapping: validation, then CPU or CUDA dispatch.
#include "capi/validate.hpp"
#include "cpu/mapping.hpp"

#if EPLB_WITH_CUDA
#include "cuda/mapping.cuh"
#endif

using namespace eplb;
using namespace eplb::capi;

extern "C" EPLB_API eplb_status_t eplb_map_logical_to_physical(eplb_stream_t* stream, const int32_t* topk_ids,
                                                               int64_t num_tokens, int32_t top_k,
                                                               const eplb_expert_map_t* map,
                                                               const int32_t* num_unpadded, int32_t* physical_ids) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_in_range(num_tokens, 0, INT32_MAX, "num_tokens");
    check_in_range(top_k, 1, 1024, "top_k");
    check_expert_map(s, map);
    if (num_tokens > 0) {
        check_elements(s, topk_ids, num_tokens * top_k, "topk_ids");
        check_elements(s, physical_ids, num_tokens * top_k, "physical_ids");
    }
    if (num_unpadded != nullptr) check_elements(s, num_unpadded, 1, "num_unpadded");
    if (num_tokens == 0) return EPLB_STATUS_OK;

    if (s.backend == EPLB_BACKEND_CPU) {
        cpu::map_logical_to_physical(topk_ids, num_tokens, top_k, *map, num_unpadded, physical_ids, s.device_error_flags);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::map_logical_to_physical(topk_ids, num_tokens, top_k, *map, num_unpadded, physical_ids,
                                                      s.device_error_flags, s.sm_count, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}
