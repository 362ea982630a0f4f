/*
 * eplb_core.h - the core of libeplb's C ABI: versions, statuses, errors, runtime info, buffers and
 * streams. Every capability header includes it; applications include the umbrella eplb.h.
 * The conventions are stated in eplb.h.
 */
#ifndef EPLB_EPLB_CORE_H
#define EPLB_EPLB_CORE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define EPLB_API __declspec(dllexport)
#else
#define EPLB_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this ABI. Bumped on every incompatible change; the managed layer refuses a library
 * whose eplb_abi_version() differs from the value it was generated against. */
#define EPLB_ABI_VERSION 2

/* Bits of the device error word a stream carries (see eplb_stream_check_device_errors). */
#define EPLB_DEVICE_ERROR_BAD_TABLE 1
#define EPLB_DEVICE_ERROR_BAD_TOKEN_ID 2
#define EPLB_DEVICE_ERROR_BAD_EXPERT_ID 4
#define EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX 8
/* A cooperative kernel's blocks did not all meet at a grid barrier in time (eplb_mega_moe). */
#define EPLB_DEVICE_ERROR_GRID_BARRIER_TIMEOUT 16
/* A per-pass load counter (eplb_expert_map_t.counters) reached INT32_MAX. It saturates there, never
 * wrapping to a negative load; the slot's count for the pass is then a lower bound. A negative pass
 * counter handed to eplb_load_window_push is recorded as INT32_MAX and sets this bit too. Set on
 * CPU and CUDA streams alike. */
#define EPLB_DEVICE_ERROR_COUNTER_OVERFLOW 32

/* Result of every call. */
typedef enum eplb_status {
    EPLB_STATUS_OK = 0,
    /* An argument is null, out of range or inconsistent; the message names it. */
    EPLB_STATUS_INVALID_ARGUMENT = 1,
    /* Host or device memory could not be allocated. */
    EPLB_STATUS_OUT_OF_MEMORY = 2,
    /* The backend asked for was not compiled into this library (built without CUDA). */
    EPLB_STATUS_NOT_COMPILED = 3,
    /* CUDA is compiled in, but there is no usable device or driver. */
    EPLB_STATUS_NO_DEVICE = 4,
    /* A CUDA runtime call failed; the message holds the CUDA error name and text. */
    EPLB_STATUS_CUDA_ERROR = 5,
    /* A kernel found bad input on the device (a bit in the stream's device error word). */
    EPLB_STATUS_DEVICE_INPUT_ERROR = 6,
    /* A cooperative launch is not possible here (unsupported, or the grid cannot co-reside). */
    EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE = 7,
    /* The operation is valid but not supported in this configuration. */
    EPLB_STATUS_UNSUPPORTED = 8,
    /* A bug in libeplb; the message says where. */
    EPLB_STATUS_INTERNAL = 9
} eplb_status_t;

/* Where work runs and memory lives. */
typedef enum eplb_backend {
    EPLB_BACKEND_CPU = 0,
    EPLB_BACKEND_CUDA = 1
} eplb_backend_t;

/* What the library was built with and what the machine has. Filled by eplb_get_runtime_info. */
typedef struct eplb_runtime_info {
    uint32_t abi_version;
    /* 1 when the CUDA backend is compiled in. */
    int32_t cuda_compiled;
    /* CUDA runtime version the library was built with (e.g. 11080), 0 without CUDA. */
    int32_t cuda_runtime_version;
    /* Version of the installed driver, 0 when there is none. */
    int32_t cuda_driver_version;
    /* Number of CUDA devices visible, 0 when none (or no driver). */
    int32_t device_count;
    /* Ordinal of the current device, -1 when none. */
    int32_t device;
    int32_t compute_capability_major;
    int32_t compute_capability_minor;
    /* Streaming multiprocessors of the current device. */
    int32_t sm_count;
    /* 1 when the current device supports cooperative launches. */
    int32_t cooperative_launch;
    /* Global memory of the current device in bytes. */
    int64_t total_memory_bytes;
    /* The last CUDA error the library saw (cudaError_t value), 0 when none. */
    int32_t last_cuda_error;
    int32_t reserved0;
    /* Name of the current device, empty when none. NUL-terminated. */
    char device_name[128];
    /* Text of last_cuda_error, or why no device is usable. NUL-terminated. */
    char last_cuda_error_string[128];
    /* The CUDA architectures compiled in, e.g. "80;90;90a". NUL-terminated. */
    char cuda_archs[64];
} eplb_runtime_info_t;

/* A range of host memory (CPU backend) or device memory (CUDA backend): allocated and owned by the
 * library (eplb_buffer_create), or the caller's memory wrapped without a copy (eplb_buffer_wrap).
 *
 * Handles (eplb_buffer_t, eplb_stream_t) are opaque values, not addresses, and the library never
 * hands out the same value twice. Every function checks the handles it is given: a destroyed
 * handle (a second destroy included), one of the other kind, or a value the library never
 * returned fails with EPLB_STATUS_INVALID_ARGUMENT naming the argument. Destroying a handle while
 * another thread still uses it in a call is the caller's error. */
typedef struct eplb_buffer eplb_buffer_t;

/* An execution stream of one backend. */
typedef struct eplb_stream eplb_stream_t;

/* Where a buffer lives. Filled by eplb_buffer_get_info. */
typedef struct eplb_buffer_info {
    /* Address of the first byte: a host pointer (CPU) or a device pointer (CUDA). */
    void *data;
    uint64_t size_bytes;
    eplb_backend_t backend;
    /* CUDA device ordinal, -1 for host memory. */
    int32_t device;
} eplb_buffer_info_t;

/* Returns EPLB_ABI_VERSION as compiled into the library. Never fails. */
EPLB_API uint32_t eplb_abi_version(void);

/* Returns the library version as "major.minor.patch". Static storage; never NULL. */
EPLB_API const char *eplb_version_string(void);

/* Returns a static, human-readable name for a status ("invalid argument", ...). Never NULL. */
EPLB_API const char *eplb_status_string(eplb_status_t status);

/* Returns the message of the last failed call on this thread, or "" when none failed.
 * The pointer stays valid until the next failing call on the same thread. */
EPLB_API const char *eplb_last_error_message(void);

/* Fills *info (caller-owned) with the build and device facts. Works on a machine with no GPU and
 * no driver: device_count is then 0 and last_cuda_error_string says why. */
EPLB_API eplb_status_t eplb_get_runtime_info(eplb_runtime_info_t *info);

/* Returns EPLB_STATUS_OK when the backend can run here, EPLB_STATUS_NOT_COMPILED when it was not
 * built, EPLB_STATUS_NO_DEVICE when CUDA is built but no device is usable. */
EPLB_API eplb_status_t eplb_backend_available(eplb_backend_t backend);

/* Allocates size_bytes (may be 0) on the backend's memory, uninitialised, 256-byte aligned.
 * *out_buffer receives a buffer the caller releases with eplb_buffer_destroy. */
EPLB_API eplb_status_t eplb_buffer_create(eplb_backend_t backend, uint64_t size_bytes, eplb_buffer_t **out_buffer);

/* Wraps memory the caller owns, without copying it, as a buffer of the backend: every function that
 * takes a buffer accepts it, and every kernel accepts pointers into it as into a created buffer.
 * Typical use: a framework tensor's data pointer (weights that EPLB moves in place).
 *   backend     EPLB_BACKEND_CPU: host memory, device must be -1.
 *               EPLB_BACKEND_CUDA: memory kernels on CUDA device `device` can use at this address:
 *               device memory of that device, managed memory, or pinned host memory mapped at the
 *               same address (cudaHostAlloc with cudaHostAllocMapped).
 *   data        the first byte, not NULL; any alignment (each kernel checks the alignment it needs
 *               of the pointers it is given: natural alignment of the element type, 16 bytes for
 *               Mega MoE tensors on CUDA, the pattern size for eplb_buffer_fill).
 *   size_bytes  the bytes from data that the buffer covers (may be 0).
 * Validated once, here: on CUDA the first and the last byte are asked of the driver
 * (cudaPointerGetAttributes); later calls find pointers into [data, data + size_bytes) in the
 * library's registry instead of asking the driver again (graph capture stays legal either way).
 * Ownership: the memory stays the caller's. It must stay allocated until eplb_buffer_destroy
 * (the library cannot detect memory freed under a live wrap); destroy frees the handle only, never
 * the memory. *out_buffer receives the buffer; nothing is written on failure. */
EPLB_API eplb_status_t eplb_buffer_wrap(eplb_backend_t backend, int32_t device, void *data, uint64_t size_bytes,
                                        eplb_buffer_t **out_buffer);

/* Releases a buffer: frees the memory of one from eplb_buffer_create, only the handle of one from
 * eplb_buffer_wrap. NULL is accepted and does nothing; a destroyed handle fails (see eplb_buffer_t).
 * The caller makes sure no queued work still uses it (synchronize the streams that used it first). */
EPLB_API eplb_status_t eplb_buffer_destroy(eplb_buffer_t *buffer);

/* Fills *info (caller-owned) with the buffer's address, size and backend. */
EPLB_API eplb_status_t eplb_buffer_get_info(const eplb_buffer_t *buffer, eplb_buffer_info_t *info);

/* Copies bytes from caller-owned host memory into the buffer at dst_offset. Ordered on stream
 * (NULL = the backend's default stream) and complete when the call returns. */
EPLB_API eplb_status_t eplb_buffer_write(eplb_buffer_t *dst, uint64_t dst_offset, const void *src_host,
                                         uint64_t bytes, eplb_stream_t *stream);

/* Copies bytes from the buffer at src_offset into caller-owned host memory. Ordered after the work
 * queued on stream (NULL = the backend's default stream) and complete when the call returns. */
EPLB_API eplb_status_t eplb_buffer_read(const eplb_buffer_t *src, uint64_t src_offset, void *dst_host,
                                        uint64_t bytes, eplb_stream_t *stream);

/* Copies bytes between two buffers of any backends (device to device, host to device, ...),
 * queued on stream; the ranges may not overlap. Asynchronous on CUDA streams; with stream NULL the
 * copy is complete when the call returns. */
EPLB_API eplb_status_t eplb_buffer_copy(eplb_buffer_t *dst, uint64_t dst_offset, const eplb_buffer_t *src,
                                        uint64_t src_offset, uint64_t bytes, eplb_stream_t *stream);

/* Writes count copies of a pattern of pattern_size bytes (1, 2, 4 or 8) starting at byte offset,
 * queued on stream; the address data + offset must be a multiple of pattern_size. Used to zero
 * counters and to poison outputs in tests. */
EPLB_API eplb_status_t eplb_buffer_fill(eplb_buffer_t *dst, uint64_t offset, uint64_t count, const void *pattern,
                                        uint32_t pattern_size, eplb_stream_t *stream);

/* Creates a stream of the backend: a CUDA stream (non-blocking) on the current device, or a CPU
 * stream that runs work at once. Released with eplb_stream_destroy. */
EPLB_API eplb_status_t eplb_stream_create(eplb_backend_t backend, eplb_stream_t **out_stream);

/* Wraps an existing cudaStream_t (e.g. a framework's current stream, for CUDA graph capture)
 * without taking ownership; 0 wraps the legacy default stream. Released with eplb_stream_destroy,
 * which leaves the CUDA stream alive. */
EPLB_API eplb_status_t eplb_stream_wrap_cuda(void *cuda_stream, eplb_stream_t **out_stream);

/* Releases a stream (waiting for its work first). NULL is accepted and does nothing; a destroyed
 * handle fails (see eplb_buffer_t). */
EPLB_API eplb_status_t eplb_stream_destroy(eplb_stream_t *stream);

/* Returns the cudaStream_t behind a CUDA stream in *out_cuda_stream (for libraries such as NCCL that
 * take the stream itself); NULL for CPU streams. The stream keeps ownership. */
EPLB_API eplb_status_t eplb_stream_get_cuda_stream(const eplb_stream_t *stream, void **out_cuda_stream);

/* Returns the stream's backend in *out_backend. */
EPLB_API eplb_status_t eplb_stream_get_backend(const eplb_stream_t *stream, eplb_backend_t *out_backend);

/* Waits until all work queued on the stream has finished. Reports asynchronous CUDA errors. */
EPLB_API eplb_status_t eplb_stream_synchronize(eplb_stream_t *stream);

/* Waits for the stream, then reads and clears its device error word (EPLB_DEVICE_ERROR_* bits set
 * by kernels that met bad input). *out_flags (may be NULL) receives the bits. Returns
 * EPLB_STATUS_DEVICE_INPUT_ERROR naming the bits when any was set. CPU streams carry a host word
 * that only EPLB_DEVICE_ERROR_COUNTER_OVERFLOW sets: their operations report bad input through their
 * own status, before anything is written. */
EPLB_API eplb_status_t eplb_stream_check_device_errors(eplb_stream_t *stream, uint32_t *out_flags);

#ifdef __cplusplus
}
#endif

#endif /* EPLB_EPLB_CORE_H */
