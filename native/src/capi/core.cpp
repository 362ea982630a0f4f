// The core of the C ABI: versions, statuses, runtime info, buffers and streams.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <mutex>
#include <new>

#include "capi/handles.hpp"

#if EPLB_WITH_CUDA
#include "cuda/fill.cuh"
#endif

namespace eplb::capi {

namespace {

constexpr uint64_t kHostAlignment = 256;

#if EPLB_WITH_CUDA
struct CudaAvailability {
    cudaError_t error = cudaSuccess;
    int device_count = 0;
};

// Asked once: devices do not come and go under a running process, and cudaGetDeviceCount is the
// call that fails cleanly (cudaErrorInsufficientDriver / cudaErrorNoDevice) without a driver.
const CudaAvailability& cuda_availability() {
    static CudaAvailability availability;
    static std::once_flag once;
    std::call_once(once, [] {
        availability.error = cudaGetDeviceCount(&availability.device_count);
        if (availability.error != cudaSuccess) {
            availability.device_count = 0;
            record_cuda_error(int(availability.error), cudaGetErrorString(availability.error));
            cudaGetLastError();
        } else if (availability.device_count == 0) {
            availability.error = cudaErrorNoDevice;
        }
    });
    return availability;
}

bool g_cuda_initialised = false;
#endif

void copy_text(char* dst, size_t capacity, const char* text) {
    if (capacity == 0) return;
    const size_t length = text ? std::min(std::strlen(text), capacity - 1) : 0;
    if (length > 0) std::memcpy(dst, text, length);
    dst[length] = '\0';
}

void check_range(const eplb_buffer_t& buffer, uint64_t offset, uint64_t bytes, const char* name) {
    if (offset > buffer.size_bytes || bytes > buffer.size_bytes - offset)
        invalid(name, ": range [", offset, ", ", offset, " + ", bytes, ") exceeds the buffer size ", buffer.size_bytes);
}

}  // namespace

const char* backend_name(eplb_backend_t backend) noexcept {
    switch (backend) {
        case EPLB_BACKEND_CPU: return "cpu";
        case EPLB_BACKEND_CUDA: return "cuda";
    }
    return "unknown";
}

void check_backend_value(int backend) {
    if (backend != EPLB_BACKEND_CPU && backend != EPLB_BACKEND_CUDA)
        invalid("backend must be EPLB_BACKEND_CPU (0) or EPLB_BACKEND_CUDA (1) (got ", backend, ")");
}

void require_backend(eplb_backend_t backend) {
    check_backend_value(backend);
    if (backend == EPLB_BACKEND_CPU) return;
#if EPLB_WITH_CUDA
    const CudaAvailability& availability = cuda_availability();
    if (availability.error != cudaSuccess)
        fail(EPLB_STATUS_NO_DEVICE, "no CUDA device: ", cudaGetErrorName(availability.error), ": ",
             cudaGetErrorString(availability.error));
#else
    fail(EPLB_STATUS_NOT_COMPILED, "the CUDA backend is not compiled into this libeplb (built without CUDA); "
                                   "rebuild with nvcc available, or use the CPU backend");
#endif
}

eplb_stream_t& checked_stream(eplb_stream_t* stream) {
    if (stream == nullptr) invalid("stream must not be NULL (create one with eplb_stream_create)");
    return *stream;
}

void check_pointer(const eplb_stream_t& stream, const void* ptr, const char* name) {
    if (ptr == nullptr) invalid(name, " must not be NULL");
#if EPLB_WITH_CUDA
    if (stream.backend == EPLB_BACKEND_CUDA) {
        cudaPointerAttributes attributes{};
        const cudaError_t error = cudaPointerGetAttributes(&attributes, ptr);
        if (error != cudaSuccess) {
            cudaGetLastError();
            invalid(name, " (", ptr, ") is not memory the CUDA device can address: ", cudaGetErrorString(error));
        }
        const bool device_visible = attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged ||
                                    (attributes.type == cudaMemoryTypeHost && attributes.devicePointer != nullptr);
        if (!device_visible)
            invalid(name, " (", ptr, ") is host memory but the stream is a CUDA stream; pass device memory "
                    "(an eplb buffer of the CUDA backend)");
        if (attributes.type == cudaMemoryTypeDevice && attributes.device != stream.device)
            invalid(name, " (", ptr, ") lives on CUDA device ", attributes.device, " but the stream is on device ",
                    stream.device);
    } else if (g_cuda_initialised) {
        // Only once this library has a CUDA context: asking earlier would create one just to check.
        cudaPointerAttributes attributes{};
        if (cudaPointerGetAttributes(&attributes, ptr) == cudaSuccess && attributes.type == cudaMemoryTypeDevice)
            invalid(name, " (", ptr, ") is CUDA device memory but the stream is a CPU stream; pass host memory");
        cudaGetLastError();
    }
#else
    (void)stream;
#endif
}

#if EPLB_WITH_CUDA
void throw_cuda(cudaError_t error, const char* what) {
    const char* text = cudaGetErrorString(error);
    record_cuda_error(int(error), text);
    cudaGetLastError();  // clear non-sticky errors so the next call starts clean
    eplb_status_t status = EPLB_STATUS_CUDA_ERROR;
    if (error == cudaErrorMemoryAllocation) status = EPLB_STATUS_OUT_OF_MEMORY;
    if (error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver) status = EPLB_STATUS_NO_DEVICE;
    fail(status, what, " failed: ", cudaGetErrorName(error), ": ", text);
}

DeviceGuard::DeviceGuard(int32_t device) {
    if (device < 0) return;
    EPLB_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
        EPLB_CUDA_CHECK(cudaSetDevice(device));
        changed_ = true;
    }
}

DeviceGuard::~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
}

void note_cuda_initialised() noexcept { g_cuda_initialised = true; }
#endif

}  // namespace eplb::capi

using namespace eplb;
using namespace eplb::capi;

extern "C" {

EPLB_API uint32_t eplb_abi_version(void) { return EPLB_ABI_VERSION; }

EPLB_API const char* eplb_version_string(void) { return EPLB_VERSION_STRING; }

EPLB_API const char* eplb_status_string(eplb_status_t status) {
    switch (status) {
        case EPLB_STATUS_OK: return "ok";
        case EPLB_STATUS_INVALID_ARGUMENT: return "invalid argument";
        case EPLB_STATUS_OUT_OF_MEMORY: return "out of memory";
        case EPLB_STATUS_NOT_COMPILED: return "backend not compiled";
        case EPLB_STATUS_NO_DEVICE: return "no CUDA device";
        case EPLB_STATUS_CUDA_ERROR: return "CUDA error";
        case EPLB_STATUS_DEVICE_INPUT_ERROR: return "bad input detected on the device";
        case EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE: return "cooperative launch unavailable";
        case EPLB_STATUS_UNSUPPORTED: return "unsupported";
        case EPLB_STATUS_INTERNAL: return "internal error";
    }
    return "unknown status";
}

EPLB_API const char* eplb_last_error_message(void) { return last_error(); }

EPLB_API eplb_status_t eplb_get_runtime_info(eplb_runtime_info_t* info) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(info);
    eplb_runtime_info_t result{};
    result.abi_version = EPLB_ABI_VERSION;
    result.device = -1;
    copy_text(result.cuda_archs, sizeof(result.cuda_archs), EPLB_CUDA_ARCHS_STRING);
#if EPLB_WITH_CUDA
    result.cuda_compiled = 1;
    result.cuda_runtime_version = CUDART_VERSION;  // static cudart: the version built against
    if (cudaDriverGetVersion(&result.cuda_driver_version) != cudaSuccess) result.cuda_driver_version = 0;
    const CudaAvailability& availability = cuda_availability();
    result.device_count = availability.device_count;
    if (availability.error == cudaSuccess) {
        int device = 0;
        EPLB_CUDA_CHECK(cudaGetDevice(&device));
        cudaDeviceProp properties{};
        EPLB_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
        result.device = device;
        result.compute_capability_major = properties.major;
        result.compute_capability_minor = properties.minor;
        result.sm_count = properties.multiProcessorCount;
        result.cooperative_launch = properties.cooperativeLaunch;
        result.total_memory_bytes = int64_t(properties.totalGlobalMem);
        copy_text(result.device_name, sizeof(result.device_name), properties.name);
    }
    std::string cuda_text;
    result.last_cuda_error = last_cuda_error(&cuda_text);
    if (availability.error != cudaSuccess && cuda_text.empty()) cuda_text = cudaGetErrorString(availability.error);
    copy_text(result.last_cuda_error_string, sizeof(result.last_cuda_error_string), cuda_text.c_str());
#else
    copy_text(result.last_cuda_error_string, sizeof(result.last_cuda_error_string), "built without CUDA");
#endif
    *info = result;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_backend_available(eplb_backend_t backend) {
    EPLB_API_BEGIN
    require_backend(backend);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_create(eplb_backend_t backend, uint64_t size_bytes, eplb_buffer_t** out_buffer) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(out_buffer);
    require_backend(backend);
    auto buffer = std::make_unique<eplb_buffer>();
    buffer->backend = backend;
    buffer->size_bytes = size_bytes;
    if (backend == EPLB_BACKEND_CPU) {
        if (size_bytes > (uint64_t(1) << 48)) fail(EPLB_STATUS_OUT_OF_MEMORY, "host allocation of ", size_bytes, " bytes refused");
        const uint64_t rounded = (size_bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
        buffer->data = std::aligned_alloc(kHostAlignment, rounded == 0 ? kHostAlignment : rounded);
        if (buffer->data == nullptr) fail(EPLB_STATUS_OUT_OF_MEMORY, "host allocation of ", size_bytes, " bytes failed");
    } else {
#if EPLB_WITH_CUDA
        EPLB_CUDA_CHECK(cudaGetDevice(&buffer->device));
        note_cuda_initialised();
        EPLB_CUDA_CHECK(cudaMalloc(&buffer->data, size_bytes == 0 ? 1 : size_bytes));
#endif
    }
    *out_buffer = buffer.release();
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_destroy(eplb_buffer_t* buffer) {
    EPLB_API_BEGIN
    if (buffer == nullptr) return EPLB_STATUS_OK;
    std::unique_ptr<eplb_buffer> owned(buffer);
    if (owned->backend == EPLB_BACKEND_CPU) {
        std::free(owned->data);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(owned->device);
        EPLB_CUDA_CHECK(cudaFree(owned->data));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_get_info(const eplb_buffer_t* buffer, eplb_buffer_info_t* info) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(buffer);
    EPLB_CHECK_NOT_NULL(info);
    info->data = buffer->data;
    info->size_bytes = buffer->size_bytes;
    info->backend = buffer->backend;
    info->device = buffer->device;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_write(eplb_buffer_t* dst, uint64_t dst_offset, const void* src_host, uint64_t bytes,
                                         eplb_stream_t* stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(dst);
    if (bytes > 0) EPLB_CHECK_NOT_NULL(src_host);
    check_range(*dst, dst_offset, bytes, "dst");
    if (bytes == 0) return EPLB_STATUS_OK;
    char* target = static_cast<char*>(dst->data) + dst_offset;
    if (dst->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (stream && stream->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*stream)));
#endif
        std::memcpy(target, src_host, bytes);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(dst->device);
        if (stream && stream->backend == EPLB_BACKEND_CUDA) {
            EPLB_CUDA_CHECK(cudaMemcpyAsync(target, src_host, bytes, cudaMemcpyHostToDevice, cuda_stream_of(*stream)));
            EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*stream)));
        } else {
            EPLB_CUDA_CHECK(cudaMemcpy(target, src_host, bytes, cudaMemcpyHostToDevice));
        }
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_read(const eplb_buffer_t* src, uint64_t src_offset, void* dst_host, uint64_t bytes,
                                        eplb_stream_t* stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(src);
    if (bytes > 0) EPLB_CHECK_NOT_NULL(dst_host);
    check_range(*src, src_offset, bytes, "src");
    if (bytes == 0) return EPLB_STATUS_OK;
    const char* source = static_cast<const char*>(src->data) + src_offset;
    if (src->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (stream && stream->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*stream)));
#endif
        std::memcpy(dst_host, source, bytes);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(src->device);
        if (stream && stream->backend == EPLB_BACKEND_CUDA) {
            EPLB_CUDA_CHECK(cudaMemcpyAsync(dst_host, source, bytes, cudaMemcpyDeviceToHost, cuda_stream_of(*stream)));
            EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*stream)));
        } else {
            EPLB_CUDA_CHECK(cudaMemcpy(dst_host, source, bytes, cudaMemcpyDeviceToHost));
        }
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_copy(eplb_buffer_t* dst, uint64_t dst_offset, const eplb_buffer_t* src,
                                        uint64_t src_offset, uint64_t bytes, eplb_stream_t* stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(dst);
    EPLB_CHECK_NOT_NULL(src);
    check_range(*dst, dst_offset, bytes, "dst");
    check_range(*src, src_offset, bytes, "src");
    if (bytes == 0) return EPLB_STATUS_OK;
    char* target = static_cast<char*>(dst->data) + dst_offset;
    const char* source = static_cast<const char*>(src->data) + src_offset;
    if (dst == src && !(dst_offset + bytes <= src_offset || src_offset + bytes <= dst_offset))
        invalid("eplb_buffer_copy: source and destination ranges overlap");
    if (dst->backend == EPLB_BACKEND_CPU && src->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (stream && stream->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*stream)));
#endif
        std::memcpy(target, source, bytes);
        return EPLB_STATUS_OK;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(dst->backend == EPLB_BACKEND_CUDA ? dst->device : src->device);
    if (stream && stream->backend == EPLB_BACKEND_CUDA) {
        EPLB_CUDA_CHECK(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDefault, cuda_stream_of(*stream)));
    } else {
        // No stream: complete on return (cudaMemcpy alone does not wait for device-to-device copies).
        EPLB_CUDA_CHECK(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDefault, nullptr));
        EPLB_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_fill(eplb_buffer_t* dst, uint64_t offset, uint64_t count, const void* pattern,
                                        uint32_t pattern_size, eplb_stream_t* stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(dst);
    EPLB_CHECK_NOT_NULL(pattern);
    if (pattern_size != 1 && pattern_size != 2 && pattern_size != 4 && pattern_size != 8)
        invalid("pattern_size must be 1, 2, 4 or 8 (got ", pattern_size, ")");
    if (offset % pattern_size != 0) invalid("offset ", offset, " is not a multiple of pattern_size ", pattern_size);
    if (count > (UINT64_MAX / pattern_size)) invalid("count ", count, " overflows");
    check_range(*dst, offset, count * pattern_size, "dst");
    if (count == 0) return EPLB_STATUS_OK;
    uint64_t value = 0;
    std::memcpy(&value, pattern, pattern_size);
    char* target = static_cast<char*>(dst->data) + offset;
    if (dst->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (stream && stream->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*stream)));
#endif
        for (uint64_t i = 0; i < count; ++i) std::memcpy(target + i * pattern_size, &value, pattern_size);
        return EPLB_STATUS_OK;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(dst->device);
    const cudaStream_t cuda = (stream && stream->backend == EPLB_BACKEND_CUDA) ? cuda_stream_of(*stream) : nullptr;
    EPLB_CUDA_CHECK(eplb::cuda::fill_pattern(target, count, value, pattern_size, cuda));
    if (cuda == nullptr) EPLB_CUDA_CHECK(cudaStreamSynchronize(nullptr));
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_create(eplb_backend_t backend, eplb_stream_t** out_stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(out_stream);
    require_backend(backend);
    auto stream = std::make_unique<eplb_stream>();
    stream->backend = backend;
    stream->device_error_flags = &stream->host_error_flags;
    if (backend == EPLB_BACKEND_CUDA) {
#if EPLB_WITH_CUDA
        stream->device_error_flags = nullptr;
        EPLB_CUDA_CHECK(cudaGetDevice(&stream->device));
        note_cuda_initialised();
        EPLB_CUDA_CHECK(cudaDeviceGetAttribute(&stream->sm_count, cudaDevAttrMultiProcessorCount, stream->device));
        cudaStream_t cuda = nullptr;
        EPLB_CUDA_CHECK(cudaStreamCreateWithFlags(&cuda, cudaStreamNonBlocking));
        stream->cuda_stream = cuda;
        stream->owns_cuda_stream = true;
        void* flags = nullptr;
        const cudaError_t error = cudaMalloc(&flags, sizeof(uint32_t));
        if (error != cudaSuccess) {
            cudaStreamDestroy(cuda);
            throw_cuda(error, "cudaMalloc(device error word)");
        }
        stream->device_error_flags = static_cast<uint32_t*>(flags);
        EPLB_CUDA_CHECK(cudaMemsetAsync(flags, 0, sizeof(uint32_t), cuda));
        EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda));
#endif
    }
    *out_stream = stream.release();
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_wrap_cuda(void* cuda_stream, eplb_stream_t** out_stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(out_stream);
    require_backend(EPLB_BACKEND_CUDA);
#if EPLB_WITH_CUDA
    auto stream = std::make_unique<eplb_stream>();
    stream->backend = EPLB_BACKEND_CUDA;
    EPLB_CUDA_CHECK(cudaGetDevice(&stream->device));
    note_cuda_initialised();
    EPLB_CUDA_CHECK(cudaDeviceGetAttribute(&stream->sm_count, cudaDevAttrMultiProcessorCount, stream->device));
    stream->cuda_stream = cuda_stream;
    stream->owns_cuda_stream = false;
    void* flags = nullptr;
    EPLB_CUDA_CHECK(cudaMalloc(&flags, sizeof(uint32_t)));
    stream->device_error_flags = static_cast<uint32_t*>(flags);
    EPLB_CUDA_CHECK(cudaMemset(flags, 0, sizeof(uint32_t)));
    *out_stream = stream.release();
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_destroy(eplb_stream_t* stream) {
    EPLB_API_BEGIN
    if (stream == nullptr) return EPLB_STATUS_OK;
    std::unique_ptr<eplb_stream> owned(stream);
#if EPLB_WITH_CUDA
    if (owned->backend == EPLB_BACKEND_CUDA) {
        DeviceGuard guard(owned->device);
        const cudaStream_t cuda = cuda_stream_of(*owned);
        const cudaError_t sync = cudaStreamSynchronize(cuda);
        if (owned->device_error_flags) cudaFree(owned->device_error_flags);
        if (owned->owns_cuda_stream) cudaStreamDestroy(cuda);
        if (sync != cudaSuccess) throw_cuda(sync, "cudaStreamSynchronize (stream destroy)");
    }
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_get_cuda_stream(const eplb_stream_t* stream, void** out_cuda_stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(stream);
    EPLB_CHECK_NOT_NULL(out_cuda_stream);
    *out_cuda_stream = stream->backend == EPLB_BACKEND_CUDA ? stream->cuda_stream : nullptr;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_get_backend(const eplb_stream_t* stream, eplb_backend_t* out_backend) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(stream);
    EPLB_CHECK_NOT_NULL(out_backend);
    *out_backend = stream->backend;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_synchronize(eplb_stream_t* stream) {
    EPLB_API_BEGIN
    eplb_stream_t& checked = checked_stream(stream);
#if EPLB_WITH_CUDA
    if (checked.backend == EPLB_BACKEND_CUDA) {
        DeviceGuard guard(checked.device);
        EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(checked)));
    }
#else
    (void)checked;
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_check_device_errors(eplb_stream_t* stream, uint32_t* out_flags) {
    EPLB_API_BEGIN
    eplb_stream_t& checked = checked_stream(stream);
    uint32_t flags = 0;
    if (checked.backend == EPLB_BACKEND_CPU) flags = std::atomic_ref<uint32_t>(checked.host_error_flags).exchange(0u);
#if EPLB_WITH_CUDA
    if (checked.backend == EPLB_BACKEND_CUDA) {
        DeviceGuard guard(checked.device);
        const cudaStream_t cuda = cuda_stream_of(checked);
        EPLB_CUDA_CHECK(cudaMemcpyAsync(&flags, checked.device_error_flags, sizeof(flags), cudaMemcpyDeviceToHost, cuda));
        EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda));
        if (flags != 0) {
            EPLB_CUDA_CHECK(cudaMemsetAsync(checked.device_error_flags, 0, sizeof(uint32_t), cuda));
            EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda));
        }
    }
#else
    (void)checked;
#endif
    if (out_flags) *out_flags = flags;
    if (flags != 0) {
        std::string names;
        if (flags & EPLB_DEVICE_ERROR_BAD_TABLE) names += " bad-table (a logcnt or log2phy entry out of range)";
        if (flags & EPLB_DEVICE_ERROR_BAD_TOKEN_ID) names += " bad-token-id (a token id outside the vocabulary)";
        if (flags & EPLB_DEVICE_ERROR_BAD_EXPERT_ID) names += " bad-expert-id (a table expert id outside [0, N))";
        if (flags & EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX)
            names += " bad-dispatch-index (a slot, pair id, row count or row position outside its range)";
        if (flags & EPLB_DEVICE_ERROR_GRID_BARRIER_TIMEOUT)
            names += " grid-barrier-timeout (a cooperative kernel's blocks did not meet; its output is undefined)";
        if (flags & EPLB_DEVICE_ERROR_COUNTER_OVERFLOW)
            names += " counter-overflow (a load counter reached INT32_MAX and stays there; push or discard the pass "
                     "counters more often)";
        fail(EPLB_STATUS_DEVICE_INPUT_ERROR, "a kernel reported bad input on the device (flags 0x", std::hex, flags,
             std::dec, "):", names);
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

}  // extern "C"
