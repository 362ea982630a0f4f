/*
 * eplb.h - the C ABI of libeplb: expert-parallel load balancing for Mixture-of-Experts inference.
 *
 * Conventions (the same for every header under eplb/):
 *   - One prefix (eplb_), fixed-width types only, opaque handles.
 *   - Every function returns eplb_status_t. On failure nothing is written to outputs, and
 *     eplb_last_error_message() describes the failure on the calling thread.
 *   - Memory is either host memory owned by the caller, or memory behind an eplb_buffer_t: owned by
 *     the library (eplb_buffer_create) or the caller's, wrapped without a copy (eplb_buffer_wrap).
 *     Kernels take raw pointers; on the CUDA backend those are device pointers (for example
 *     eplb_buffer_info_t.data of a CUDA buffer, or a framework tensor's data pointer). Pointers into
 *     a live buffer are checked by a registry lookup; others are asked of the driver on every call.
 *   - Handles are checked on every call: a destroyed or foreign handle is an invalid argument.
 *   - Work is issued on an eplb_stream_t, which names the backend. CPU streams execute at once, on
 *     the calling thread. CUDA streams are asynchronous; eplb_stream_synchronize waits.
 *   - No function aborts the process; C++ exceptions never cross this boundary.
 */
#ifndef EPLB_EPLB_H
#define EPLB_EPLB_H

/* The umbrella header: the core (eplb_core.h) and every capability. Each capability header includes
 * only what it uses (eplb_core.h, eplb_mapping.h for the EPLB tables, eplb_dispatch.h for dtypes), so
 * any of them can also be included on its own, in any order. */
#include "eplb/eplb_core.h"
#include "eplb/eplb_mapping.h"
#include "eplb/eplb_window.h"
#include "eplb/eplb_dispatch.h"
#include "eplb/eplb_routing.h"
#include "eplb/eplb_moe.h"

#endif /* EPLB_EPLB_H */
