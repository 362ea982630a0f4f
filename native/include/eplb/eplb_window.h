/*
 * eplb_window.h - the expert-load window (docs/design.md §3.2): per-pass int32 counters pushed into a ring of
 * the last W passes, with 64-bit running sums, on the device, without host synchronisation.
 * Included by eplb.h; see the conventions there.
 */
#ifndef EPLB_EPLB_WINDOW_H
#define EPLB_EPLB_WINDOW_H

#include "eplb/eplb_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Pushes one pass of counters into the window ring, for every i in [0, count):
 *   sums[i] += pass[i] - window[slot][i];  window[slot][i] = pass[i];  pass[i] = 0
 * so sums always hold the total of the passes in the ring (64-bit: real totals exceed 2^31), and
 * the pass counters start the next pass from zero. A negative pass counter (one that wrapped past
 * INT32_MAX outside libeplb's saturating counters) is recorded as INT32_MAX and sets
 * EPLB_DEVICE_ERROR_COUNTER_OVERFLOW on the stream, so a window that started at zero never holds a
 * negative load or sum.
 * pass_counters [count] int32, read and zeroed.   window [window_size][count] int32, row slot replaced.
 * window_sums   [count] int64, updated.           slot in [0, window_size).
 * All three are memory of the stream's backend (device pointers on CUDA), owned by the caller.
 * Queued on the stream (no host synchronisation on CUDA). count may be 0 (a stage with no MoE layer). */
EPLB_API eplb_status_t eplb_load_window_push(eplb_stream_t *stream, int32_t *pass_counters, int32_t *window,
                                             int64_t *window_sums, int64_t count, int32_t window_size, int32_t slot);

/* Zeroes count pass counters without recording them (a dummy pass of an idle data-parallel rank). */
EPLB_API eplb_status_t eplb_load_window_discard(eplb_stream_t *stream, int32_t *pass_counters, int64_t count);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_EPLB_WINDOW_H */
