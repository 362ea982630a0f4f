// The core of the C ABI: versions, statuses, runtime info, buffers and streams.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>

#include "capi/handles.hpp"
#include "capi/registry.hpp"

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

std::atomic<bool> g_cuda_initialised{false};

// cudaPointerGetAttributes, reduced to what the checks use; clears the error it may leave.
PointerAttributes query_cuda_pointer(const void* ptr) {
    cudaPointerAttributes attributes{};
    const cudaError_t error = cudaPointerGetAttributes(&attributes, ptr);
    PointerAttributes result;
    if (error != cudaSuccess) {
        cudaGetLastError();
        result.error = cudaGetErrorString(error);
        return result;
    }
    result.ok = true;
    switch (attributes.type) {
        case cudaMemoryTypeHost: result.type = PointerAttributes::Type::Host; break;
        case cudaMemoryTypeDevice: result.type = PointerAttributes::Type::Device; break;
        case cudaMemoryTypeManaged: result.type = PointerAttributes::Type::Managed; break;
        default: result.type = PointerAttributes::Type::Unregistered; break;
    }
    result.device = attributes.device;
    result.device_pointer = attributes.devicePointer;
    return result;
}

// Checks one address of memory being wrapped for the CUDA backend on device: memory kernels on
// that device can use at this very address.
void check_wrapped_cuda_address(const void* ptr, const char* what, int32_t device) {
    const PointerAttributes attributes = query_cuda_pointer(ptr);
    if (!attributes.ok) invalid(what, " (", ptr, ") is not memory the CUDA device can address: ", attributes.error);
    switch (attributes.type) {
        case PointerAttributes::Type::Device:
            if (attributes.device != device)
                invalid(what, " (", ptr, ") lives on CUDA device ", attributes.device, ", not on device ", device);
            return;
        case PointerAttributes::Type::Managed:
            return;
        case PointerAttributes::Type::Host:
            if (attributes.device_pointer != ptr)
                invalid(what, " (", ptr, ") is pinned host memory that the device does not see at the same address ",
                        "(its device address is ", attributes.device_pointer, "); wrap the device address, or ",
                        "pinned memory allocated with cudaHostAlloc(..., cudaHostAllocMapped)");
            return;
        case PointerAttributes::Type::Unregistered:
            break;
    }
    invalid(what, " (", ptr, ") is host memory that CUDA does not know (not pinned); wrap it with EPLB_BACKEND_CPU, ",
            "or pass device memory");
}
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

StreamRef checked_stream(eplb_stream_t* stream) {
    if (stream == nullptr) invalid("stream must not be NULL (create one with eplb_stream_create)");
    return registry().stream(stream, "stream");
}

StreamRef optional_stream(eplb_stream_t* stream, const char* name) {
    if (stream == nullptr) return nullptr;
    return registry().stream(stream, name);
}

BufferRef checked_buffer(const eplb_buffer_t* buffer, const char* name) {
    if (buffer == nullptr) invalid(name, " must not be NULL");
    return registry().buffer(buffer, name);
}

void check_pointer(const eplb_stream_t& stream, const void* ptr, uint64_t bytes, uint64_t alignment, const char* name) {
    PointerQuery query = nullptr;
#if EPLB_WITH_CUDA
    // CPU streams ask only once this library has a CUDA context: asking earlier would create one
    // just to check.
    if (stream.backend == EPLB_BACKEND_CUDA || g_cuda_initialised.load(std::memory_order_relaxed))
        query = &query_cuda_pointer;
#endif
    registry().check_pointer(StreamPlace{stream.backend, stream.device}, ptr, bytes, alignment, name, query);
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

void note_cuda_initialised() noexcept { g_cuda_initialised.store(true, std::memory_order_relaxed); }
#endif

namespace {

// Frees a buffer's memory when the library owns it (never for wrapped memory).
void release_memory(const eplb_buffer& buffer) {
    if (!buffer.owns_memory || buffer.data == nullptr) return;
    if (buffer.backend == EPLB_BACKEND_CPU) {
        std::free(buffer.data);
        return;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(buffer.device);
    EPLB_CUDA_CHECK(cudaFree(buffer.data));
#endif
}

// Frees a stream's CUDA resources after waiting for its work; throws the wait's error last.
void release_stream(eplb_stream& stream) {
#if EPLB_WITH_CUDA
    if (stream.backend != EPLB_BACKEND_CUDA) return;
    DeviceGuard guard(stream.device);
    const cudaStream_t cuda = cuda_stream_of(stream);
    const cudaError_t sync = cudaStreamSynchronize(cuda);
    if (stream.device_error_flags) cudaFree(stream.device_error_flags);
    stream.device_error_flags = nullptr;
    if (stream.owns_cuda_stream) cudaStreamDestroy(cuda);
    stream.owns_cuda_stream = false;
    if (sync != cudaSuccess) throw_cuda(sync, "cudaStreamSynchronize (stream destroy)");
#else
    (void)stream;
#endif
}

// Registers a new buffer; frees owned memory when registration itself fails.
eplb_buffer_t* register_buffer(const BufferRef& buffer) {
    const MemoryRange range{reinterpret_cast<uintptr_t>(buffer->data), buffer->size_bytes, buffer->backend,
                            buffer->device, buffer->owns_memory};
    try {
        return registry().add_buffer(buffer, range);
    } catch (...) {
        try {
            release_memory(*buffer);
        } catch (...) {
        }
        throw;
    }
}

// Registers a new stream; releases its CUDA resources when registration itself fails.
eplb_stream_t* register_stream(const StreamRef& stream) {
    try {
        return registry().add_stream(stream);
    } catch (...) {
        try {
            release_stream(*stream);
        } catch (...) {
        }
        throw;
    }
}

}  // namespace

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
    auto buffer = std::make_shared<eplb_buffer>();
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
    *out_buffer = register_buffer(buffer);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_wrap(eplb_backend_t backend, int32_t device, void* data, uint64_t size_bytes,
                                        eplb_buffer_t** out_buffer) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(out_buffer);
    check_backend_value(backend);
    if (data == nullptr) invalid("data must not be NULL (there is nothing to wrap)");
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
    if (size_bytes > UINTPTR_MAX - begin)
        invalid("data (", data, ") + size_bytes (", size_bytes, ") runs past the end of the address space");
    if (backend == EPLB_BACKEND_CPU) {
        if (device != -1) invalid("device must be -1 for host memory (EPLB_BACKEND_CPU) (got ", device, ")");
#if EPLB_WITH_CUDA
        // Only once this library has a CUDA context (asking earlier would create one just to check).
        if (g_cuda_initialised.load(std::memory_order_relaxed)) {
            const PointerAttributes attributes = query_cuda_pointer(data);
            if (attributes.ok && attributes.type == PointerAttributes::Type::Device)
                invalid("data (", data, ") is CUDA device memory of device ", attributes.device,
                        "; wrap it with EPLB_BACKEND_CUDA");
        }
#endif
    } else {
        require_backend(backend);
#if EPLB_WITH_CUDA
        const int32_t devices = cuda_availability().device_count;
        if (device < 0 || device >= devices)
            invalid("device must be a CUDA device ordinal in [0, ", devices, ") (got ", device, ")");
        note_cuda_initialised();
        // Both ends, so a size that runs past the allocation into unmapped memory is caught here.
        check_wrapped_cuda_address(data, "data", device);
        if (size_bytes > 1)
            check_wrapped_cuda_address(static_cast<const char*>(data) + (size_bytes - 1), "the last byte of data", device);
#endif
    }
    auto buffer = std::make_shared<eplb_buffer>();
    buffer->backend = backend;
    buffer->device = backend == EPLB_BACKEND_CPU ? -1 : device;
    buffer->data = data;
    buffer->size_bytes = size_bytes;
    buffer->owns_memory = false;
    *out_buffer = register_buffer(buffer);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_destroy(eplb_buffer_t* buffer) {
    EPLB_API_BEGIN
    if (buffer == nullptr) return EPLB_STATUS_OK;
    const BufferRef owned = registry().remove_buffer(buffer, "buffer");
    release_memory(*owned);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_get_info(const eplb_buffer_t* buffer, eplb_buffer_info_t* info) {
    EPLB_API_BEGIN
    const BufferRef b = checked_buffer(buffer, "buffer");
    EPLB_CHECK_NOT_NULL(info);
    info->data = b->data;
    info->size_bytes = b->size_bytes;
    info->backend = b->backend;
    info->device = b->device;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_buffer_write(eplb_buffer_t* dst, uint64_t dst_offset, const void* src_host, uint64_t bytes,
                                         eplb_stream_t* stream) {
    EPLB_API_BEGIN
    const BufferRef d = checked_buffer(dst, "dst");
    const StreamRef s = optional_stream(stream, "stream");
    if (bytes > 0) EPLB_CHECK_NOT_NULL(src_host);
    check_range(*d, dst_offset, bytes, "dst");
    if (bytes == 0) return EPLB_STATUS_OK;
    char* target = static_cast<char*>(d->data) + dst_offset;
    if (d->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (s && s->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
#endif
        std::memcpy(target, src_host, bytes);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(d->device);
        if (s && s->backend == EPLB_BACKEND_CUDA) {
            EPLB_CUDA_CHECK(cudaMemcpyAsync(target, src_host, bytes, cudaMemcpyHostToDevice, cuda_stream_of(*s)));
            EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
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
    const BufferRef b = checked_buffer(src, "src");
    const StreamRef s = optional_stream(stream, "stream");
    if (bytes > 0) EPLB_CHECK_NOT_NULL(dst_host);
    check_range(*b, src_offset, bytes, "src");
    if (bytes == 0) return EPLB_STATUS_OK;
    const char* source = static_cast<const char*>(b->data) + src_offset;
    if (b->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (s && s->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
#endif
        std::memcpy(dst_host, source, bytes);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(b->device);
        if (s && s->backend == EPLB_BACKEND_CUDA) {
            EPLB_CUDA_CHECK(cudaMemcpyAsync(dst_host, source, bytes, cudaMemcpyDeviceToHost, cuda_stream_of(*s)));
            EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
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
    const BufferRef d = checked_buffer(dst, "dst");
    const BufferRef b = checked_buffer(src, "src");
    const StreamRef s = optional_stream(stream, "stream");
    check_range(*d, dst_offset, bytes, "dst");
    check_range(*b, src_offset, bytes, "src");
    if (bytes == 0) return EPLB_STATUS_OK;
    char* target = static_cast<char*>(d->data) + dst_offset;
    const char* source = static_cast<const char*>(b->data) + src_offset;
    // By address, not by handle: two wraps (or a wrap and a buffer) may share memory.
    const uintptr_t t0 = reinterpret_cast<uintptr_t>(target), s0 = reinterpret_cast<uintptr_t>(source);
    if (t0 < s0 + bytes && s0 < t0 + bytes) invalid("eplb_buffer_copy: source and destination ranges overlap");
    if (d->backend == EPLB_BACKEND_CPU && b->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (s && s->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
#endif
        std::memcpy(target, source, bytes);
        return EPLB_STATUS_OK;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(d->backend == EPLB_BACKEND_CUDA ? d->device : b->device);
    if (s && s->backend == EPLB_BACKEND_CUDA) {
        EPLB_CUDA_CHECK(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDefault, cuda_stream_of(*s)));
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
    const BufferRef d = checked_buffer(dst, "dst");
    const StreamRef s = optional_stream(stream, "stream");
    EPLB_CHECK_NOT_NULL(pattern);
    if (pattern_size != 1 && pattern_size != 2 && pattern_size != 4 && pattern_size != 8)
        invalid("pattern_size must be 1, 2, 4 or 8 (got ", pattern_size, ")");
    // The address, not the offset: a wrapped buffer need not start aligned.
    if ((reinterpret_cast<uintptr_t>(d->data) + offset) % pattern_size != 0)
        invalid("offset ", offset, " does not make dst (", d->data, " + ", offset, ") a multiple of pattern_size ",
                pattern_size);
    if (count > (UINT64_MAX / pattern_size)) invalid("count ", count, " overflows");
    check_range(*d, offset, count * pattern_size, "dst");
    if (count == 0) return EPLB_STATUS_OK;
    uint64_t value = 0;
    std::memcpy(&value, pattern, pattern_size);
    char* target = static_cast<char*>(d->data) + offset;
    if (d->backend == EPLB_BACKEND_CPU) {
#if EPLB_WITH_CUDA
        if (s && s->backend == EPLB_BACKEND_CUDA) EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
#endif
        for (uint64_t i = 0; i < count; ++i) std::memcpy(target + i * pattern_size, &value, pattern_size);
        return EPLB_STATUS_OK;
    }
#if EPLB_WITH_CUDA
    DeviceGuard guard(d->device);
    const cudaStream_t cuda = (s && s->backend == EPLB_BACKEND_CUDA) ? cuda_stream_of(*s) : nullptr;
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
    auto stream = std::make_shared<eplb_stream>();
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
        cudaError_t zero = cudaMemsetAsync(flags, 0, sizeof(uint32_t), cuda);
        if (zero == cudaSuccess) zero = cudaStreamSynchronize(cuda);
        if (zero != cudaSuccess) {
            cudaFree(flags);
            cudaStreamDestroy(cuda);
            throw_cuda(zero, "cudaMemsetAsync(device error word)");
        }
#endif
    }
    *out_stream = register_stream(stream);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_wrap_cuda(void* cuda_stream, eplb_stream_t** out_stream) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(out_stream);
    require_backend(EPLB_BACKEND_CUDA);
#if EPLB_WITH_CUDA
    auto stream = std::make_shared<eplb_stream>();
    stream->backend = EPLB_BACKEND_CUDA;
    EPLB_CUDA_CHECK(cudaGetDevice(&stream->device));
    note_cuda_initialised();
    EPLB_CUDA_CHECK(cudaDeviceGetAttribute(&stream->sm_count, cudaDevAttrMultiProcessorCount, stream->device));
    stream->cuda_stream = cuda_stream;
    stream->owns_cuda_stream = false;
    void* flags = nullptr;
    EPLB_CUDA_CHECK(cudaMalloc(&flags, sizeof(uint32_t)));
    stream->device_error_flags = static_cast<uint32_t*>(flags);
    const cudaError_t zero = cudaMemset(flags, 0, sizeof(uint32_t));
    if (zero != cudaSuccess) {
        cudaFree(flags);
        throw_cuda(zero, "cudaMemset(device error word)");
    }
    *out_stream = register_stream(stream);
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_destroy(eplb_stream_t* stream) {
    EPLB_API_BEGIN
    if (stream == nullptr) return EPLB_STATUS_OK;
    const StreamRef owned = registry().remove_stream(stream, "stream");
    release_stream(*owned);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_get_cuda_stream(const eplb_stream_t* stream, void** out_cuda_stream) {
    EPLB_API_BEGIN
    const StreamRef s = checked_stream(const_cast<eplb_stream_t*>(stream));
    EPLB_CHECK_NOT_NULL(out_cuda_stream);
    *out_cuda_stream = s->backend == EPLB_BACKEND_CUDA ? s->cuda_stream : nullptr;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_get_backend(const eplb_stream_t* stream, eplb_backend_t* out_backend) {
    EPLB_API_BEGIN
    const StreamRef s = checked_stream(const_cast<eplb_stream_t*>(stream));
    EPLB_CHECK_NOT_NULL(out_backend);
    *out_backend = s->backend;
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_synchronize(eplb_stream_t* stream) {
    EPLB_API_BEGIN
    const StreamRef s = checked_stream(stream);
#if EPLB_WITH_CUDA
    if (s->backend == EPLB_BACKEND_CUDA) {
        DeviceGuard guard(s->device);
        EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(*s)));
    }
#endif
    return EPLB_STATUS_OK;
    EPLB_API_END
}

EPLB_API eplb_status_t eplb_stream_check_device_errors(eplb_stream_t* stream, uint32_t* out_flags) {
    EPLB_API_BEGIN
    const StreamRef s = checked_stream(stream);
    uint32_t flags = 0;
    if (s->backend == EPLB_BACKEND_CPU) {
        flags = std::atomic_ref<uint32_t>(s->host_error_flags).exchange(0u);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s->device);
        const cudaStream_t cuda = cuda_stream_of(*s);
        EPLB_CUDA_CHECK(cudaMemcpyAsync(&flags, s->device_error_flags, sizeof(flags), cudaMemcpyDeviceToHost, cuda));
        EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda));
        if (flags != 0) {
            EPLB_CUDA_CHECK(cudaMemsetAsync(s->device_error_flags, 0, sizeof(uint32_t), cuda));
            EPLB_CUDA_CHECK(cudaStreamSynchronize(cuda));
        }
#endif
    }
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
