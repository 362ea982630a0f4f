// The objects behind the opaque handles of eplb.h, and the checks the ABI layer shares.
// Only src/capi includes this file: kernels see raw pointers and streams only.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/error.hpp"
#include "eplb/eplb.h"
#include "eplb_build_config.h"

#if EPLB_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

// The objects behind the handles. The handle values the ABI hands out are serial numbers that
// capi/registry.hpp maps to these objects; nothing outside src/capi sees either.
struct eplb_buffer {
    eplb_backend_t backend = EPLB_BACKEND_CPU;
    int32_t device = -1;
    void* data = nullptr;
    uint64_t size_bytes = 0;
    // False for eplb_buffer_wrap: destroy then frees the handle only, never the memory.
    bool owns_memory = true;
};

struct eplb_stream {
    eplb_backend_t backend = EPLB_BACKEND_CPU;
    int32_t device = -1;
    // cudaStream_t of a CUDA stream (nullptr is the legacy default stream).
    void* cuda_stream = nullptr;
    bool owns_cuda_stream = false;
    // The word of EPLB_DEVICE_ERROR_* bits the kernels set: one device word on CUDA (zeroed at
    // creation), &host_error_flags on CPU. Updated with atomic or (several threads may share a stream).
    uint32_t* device_error_flags = nullptr;
    uint32_t host_error_flags = 0;
    int32_t sm_count = 0;
};

namespace eplb::capi {

// Human-readable backend name for messages.
const char* backend_name(eplb_backend_t backend) noexcept;

// Throws EPLB_STATUS_INVALID_ARGUMENT unless backend is a known value.
void check_backend_value(int backend);

// Throws NOT_COMPILED / NO_DEVICE when the backend cannot run here.
void require_backend(eplb_backend_t backend);

using StreamRef = std::shared_ptr<eplb_stream>;
using BufferRef = std::shared_ptr<eplb_buffer>;

// The live stream behind a handle: non-null and neither destroyed nor forged (the message names
// "stream"). Hold the returned reference for the whole call.
StreamRef checked_stream(eplb_stream_t* stream);

// As checked_stream, but NULL gives an empty reference (the functions where NULL means "default").
StreamRef optional_stream(eplb_stream_t* stream, const char* name);

// The live buffer behind a handle, non-null; the message names the argument.
BufferRef checked_buffer(const eplb_buffer_t* buffer, const char* name);

// Checks that [ptr, ptr + bytes) is usable by work on the stream's backend and that ptr is aligned
// to alignment: non-null, and resident where the backend can read it (a device or mapped pointer
// for CUDA; not device memory for CPU). Memory of a live eplb buffer (created or wrapped) is
// vouched for by the registry without a driver call; see capi/registry.hpp.
void check_pointer(const eplb_stream_t& stream, const void* ptr, uint64_t bytes, uint64_t alignment, const char* name);

// check_pointer for count elements of T (natural alignment).
template <typename T>
void check_elements(const eplb_stream_t& stream, const T* ptr, int64_t count, const char* name) {
    if (count < 0 || uint64_t(count) > UINT64_MAX / sizeof(T))
        invalid(name, ": ", count, " elements of ", sizeof(T), " bytes do not fit the address space");
    check_pointer(stream, ptr, uint64_t(count) * sizeof(T), alignof(T), name);
}

#if EPLB_WITH_CUDA
// Throws an Error for a failed CUDA call (OUT_OF_MEMORY, NO_DEVICE or CUDA_ERROR), recording it.
void throw_cuda(cudaError_t error, const char* what);

// Sets the current device for the scope and restores the previous one.
class DeviceGuard {
public:
    explicit DeviceGuard(int32_t device);
    ~DeviceGuard();
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

private:
    int previous_ = -1;
    bool changed_ = false;
};

inline cudaStream_t cuda_stream_of(const eplb_stream_t& stream) { return static_cast<cudaStream_t>(stream.cuda_stream); }

// Marks that this library has initialised CUDA in this process (enables host-pointer checks).
void note_cuda_initialised() noexcept;
#endif

}  // namespace eplb::capi

#if EPLB_WITH_CUDA
// Checks a CUDA runtime call made by the ABI layer; throws an eplb::Error on failure.
#define EPLB_CUDA_CHECK(expr)                                                      \
    do {                                                                           \
        const cudaError_t eplb_status_ = (expr);                                   \
        if (eplb_status_ != cudaSuccess) ::eplb::capi::throw_cuda(eplb_status_, #expr); \
    } while (0)
#endif
