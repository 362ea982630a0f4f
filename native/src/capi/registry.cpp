#include "capi/registry.hpp"

#include <mutex>

#include "common/error.hpp"

namespace eplb::capi {

namespace {

// Wraps may overlap, so a lookup looks at this many ranges that start at or before the pointer.
// Disjoint ranges (every eplb buffer, and wraps of distinct tensors) need only the first.
constexpr int kMaxProbes = 8;

uint64_t handle_value(const void* handle) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(handle)); }

}  // namespace

uint64_t Registry::next_handle(Kind kind) {
    // 2^60 serials: a process creating a billion handles a second runs for 36 years.
    ++serial_;
    return (serial_ << kKindBits) | kind;
}

eplb_buffer* Registry::add_buffer(std::shared_ptr<eplb_buffer> buffer, const MemoryRange& range) {
    std::unique_lock lock(mutex_);
    const uint64_t value = next_handle(kBuffer);
    auto position = ranges_.emplace(range.begin, std::make_pair(value, range));
    try {
        buffers_.emplace(value, BufferEntry{std::move(buffer), range.begin});
    } catch (...) {
        ranges_.erase(position);
        throw;
    }
    return reinterpret_cast<eplb_buffer*>(static_cast<uintptr_t>(value));
}

eplb_stream* Registry::add_stream(std::shared_ptr<eplb_stream> stream) {
    std::unique_lock lock(mutex_);
    const uint64_t value = next_handle(kStream);
    streams_.emplace(value, std::move(stream));
    return reinterpret_cast<eplb_stream*>(static_cast<uintptr_t>(value));
}

void Registry::throw_stale(uint64_t value, Kind wanted, const char* name) const {
    const char* wanted_name = wanted == kBuffer ? "buffer" : "stream";
    const uint64_t kind = value & ((uint64_t(1) << kKindBits) - 1);
    const uint64_t serial = value >> kKindBits;
    const bool ours = (kind == kBuffer || kind == kStream) && serial >= 1 && serial <= serial_;
    if (!ours)
        invalid(name, " (0x", std::hex, value, std::dec, ") is not an eplb ", wanted_name,
                " handle: it was never returned by libeplb (a forged or corrupted value)");
    if (kind != wanted)
        invalid(name, " (0x", std::hex, value, std::dec, ") is an eplb ", kind == kBuffer ? "buffer" : "stream",
                " handle, not a ", wanted_name, " handle");
    invalid(name, " (0x", std::hex, value, std::dec, ") is an eplb ", wanted_name,
            " handle that was already destroyed (a second destroy, or use after destroy)");
}

std::shared_ptr<eplb_buffer> Registry::buffer(const eplb_buffer* handle, const char* name) const {
    const uint64_t value = handle_value(handle);
    std::shared_lock lock(mutex_);
    const auto found = buffers_.find(value);
    if (found == buffers_.end()) throw_stale(value, kBuffer, name);
    return found->second.buffer;
}

std::shared_ptr<eplb_stream> Registry::stream(const eplb_stream* handle, const char* name) const {
    const uint64_t value = handle_value(handle);
    std::shared_lock lock(mutex_);
    const auto found = streams_.find(value);
    if (found == streams_.end()) throw_stale(value, kStream, name);
    return found->second;
}

std::shared_ptr<eplb_buffer> Registry::remove_buffer(const eplb_buffer* handle, const char* name) {
    const uint64_t value = handle_value(handle);
    std::unique_lock lock(mutex_);
    const auto found = buffers_.find(value);
    if (found == buffers_.end()) throw_stale(value, kBuffer, name);
    std::shared_ptr<eplb_buffer> buffer = std::move(found->second.buffer);
    const auto [first, last] = ranges_.equal_range(found->second.begin);
    for (auto it = first; it != last; ++it) {
        if (it->second.first == value) {
            ranges_.erase(it);
            break;
        }
    }
    buffers_.erase(found);
    return buffer;
}

std::shared_ptr<eplb_stream> Registry::remove_stream(const eplb_stream* handle, const char* name) {
    const uint64_t value = handle_value(handle);
    std::unique_lock lock(mutex_);
    const auto found = streams_.find(value);
    if (found == streams_.end()) throw_stale(value, kStream, name);
    std::shared_ptr<eplb_stream> stream = std::move(found->second);
    streams_.erase(found);
    return stream;
}

const MemoryRange* Registry::find_range(uintptr_t ptr, uint64_t bytes, bool* contains) const {
    *contains = false;
    const MemoryRange* partial = nullptr;
    auto it = ranges_.upper_bound(ptr);  // the first range that starts after ptr
    for (int probe = 0; probe < kMaxProbes && it != ranges_.begin(); ++probe) {
        --it;
        const MemoryRange& range = it->second.second;
        const uint64_t offset = uint64_t(ptr - range.begin);
        if (offset >= range.size) continue;  // ptr is not inside this range
        if (bytes <= range.size && offset <= range.size - bytes) {
            *contains = true;
            return &range;
        }
        if (partial == nullptr) partial = &range;
    }
    return partial;
}

void Registry::check_pointer(const StreamPlace& stream, const void* ptr, uint64_t bytes, uint64_t alignment,
                             const char* name, PointerQuery query) const {
    if (ptr == nullptr) invalid(name, " must not be NULL");
    const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
    if (alignment > 1 && address % alignment != 0)
        invalid(name, " (", ptr, ") is not aligned to its element size of ", alignment, " bytes");
    {
        std::shared_lock lock(mutex_);
        bool contains = false;
        const MemoryRange* range = find_range(address, bytes, &contains);
        if (range != nullptr) {
            const bool same_backend = range->backend == stream.backend;
            const bool same_place = same_backend && (stream.backend == EPLB_BACKEND_CPU || range->device == stream.device);
            if (contains && same_place) return;
            if (range->owned) {
                // The library allocated this memory, so its extent and residency are facts.
                const void* begin = reinterpret_cast<const void*>(range->begin);
                if (!contains)
                    invalid(name, " (", ptr, ") + ", bytes, " bytes runs past the end of its eplb buffer (", begin,
                            ", ", range->size, " bytes)");
                if (range->backend == EPLB_BACKEND_CUDA && stream.backend == EPLB_BACKEND_CPU)
                    invalid(name, " (", ptr, ") is CUDA device memory (an eplb buffer of device ", range->device,
                            ") but the stream is a CPU stream; pass host memory");
                if (range->backend == EPLB_BACKEND_CUDA)
                    invalid(name, " (", ptr, ") lives on CUDA device ", range->device, " but the stream is on device ",
                            stream.device);
                // A CPU eplb buffer on a CUDA stream: the caller may have pinned and mapped it
                // (cudaHostRegister), which only the driver knows.
            }
        }
    }
    check_unknown_pointer(stream, ptr, name, query);
}

void check_unknown_pointer(const StreamPlace& stream, const void* ptr, const char* name, PointerQuery query) {
    if (query == nullptr) return;
    const PointerAttributes attributes = query(ptr);
    using Type = PointerAttributes::Type;
    if (stream.backend == EPLB_BACKEND_CUDA) {
        if (!attributes.ok)
            invalid(name, " (", ptr, ") is not memory the CUDA device can address: ", attributes.error);
        const bool device_visible = attributes.type == Type::Device || attributes.type == Type::Managed ||
                                    (attributes.type == Type::Host && attributes.device_pointer != nullptr);
        if (!device_visible)
            invalid(name, " (", ptr, ") is host memory but the stream is a CUDA stream; pass device memory "
                    "(an eplb buffer of the CUDA backend)");
        if (attributes.type == Type::Device && attributes.device != stream.device)
            invalid(name, " (", ptr, ") lives on CUDA device ", attributes.device, " but the stream is on device ",
                    stream.device);
    } else if (attributes.ok && attributes.type == Type::Device) {
        invalid(name, " (", ptr, ") is CUDA device memory but the stream is a CPU stream; pass host memory");
    }
}

size_t Registry::live_buffers() const {
    std::shared_lock lock(mutex_);
    return buffers_.size();
}

size_t Registry::live_streams() const {
    std::shared_lock lock(mutex_);
    return streams_.size();
}

Registry& registry() {
    static Registry* const instance = new Registry();
    return *instance;
}

}  // namespace eplb::capi
