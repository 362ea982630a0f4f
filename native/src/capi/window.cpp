// ABI entries of the expert-load window: validation, then CPU or CUDA dispatch.
#include "capi/validate.hpp"
#include "cpu/window.hpp"

#if EPLB_WITH_CUDA
#include "cuda/window.cuh"
#endif

using namespace eplb;
using namespace eplb::capi;

extern "C" {

EPLB_API eplb_status_t eplb_load_window_push(eplb_stream_t* stream, int32_t* pass_counters, int32_t* window,
                                             int64_t* window_sums, int64_t count, int32_t window_size, int32_t slot) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_in_range(count, 0, INT64_MAX / 8, "count");
    check_in_range(window_size, 1, INT32_MAX, "window_size");
    check_in_range(slot, 0, int64_t(window_size) - 1, "slot");
    if (count > INT64_MAX / window_size) invalid("window_size * count overflows (", window_size, " x ", count, ")");
    if (count == 0) return EPLB_STATUS_OK;
    check_elements(s, pass_counters, count, "pass_counters");
    check_elements(s, window, count * window_size, "window");
    check_elements(s, window_sums, count, "window_sums");
    if (s.backend == EPLB_BACKEND_CPU) {
        cpu::load_window_push(pass_counters, window, window_sums, count, slot, s.device_error_flags);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::load_window_push(pass_counters, window, window_sums, count, slot, s.device_error_flags,
                                               cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_load_window_discard(eplb_stream_t* stream, int32_t* pass_counters, int64_t count) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_in_range(count, 0, INT64_MAX / 8, "count");
    if (count == 0) return EPLB_STATUS_OK;
    check_elements(s, pass_counters, count, "pass_counters");
    if (s.backend == EPLB_BACKEND_CPU) {
        cpu::load_window_discard(pass_counters, count);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::load_window_discard(pass_counters, count, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

}  // extern "C"
