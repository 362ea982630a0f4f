// The registry of live handles and known memory (issue 13 §3, issue 11 "Speed that needs no GPU").
//
// Handles: eplb_buffer_t* and eplb_stream_t* values are serial numbers, not addresses, and a
// serial is never reused, so a destroyed, forged or mistyped handle is a lookup miss that the ABI
// turns into EPLB_STATUS_INVALID_ARGUMENT naming it, never a dereference. A lookup returns a
// shared_ptr, so a handle destroyed on another thread mid-call leaves the object itself alive.
//
// Memory: every eplb buffer (created or wrapped) registers its address range, validated once when
// it became known. check_pointer then vouches for a pointer plus the bytes a call touches by a
// lookup when they lie inside one known range of the stream's backend and device, and asks the
// driver (PointerQuery, i.e. cudaPointerGetAttributes) only for memory it does not know. Nothing
// here enqueues work, so the checks stay legal during CUDA graph capture.
//
// This file has no CUDA dependency: the driver query is passed in, so the tests run the very same
// checks against a stub that counts calls.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <string>
#include <unordered_map>

#include "eplb/eplb_core.h"

struct eplb_buffer;
struct eplb_stream;

namespace eplb::capi {

// What the driver says about one address (cudaPointerGetAttributes, reduced to what the checks use).
struct PointerAttributes {
    enum class Type { Unregistered, Host, Device, Managed };
    // False when the query itself failed; error then says why.
    bool ok = false;
    std::string error;
    Type type = Type::Unregistered;
    int32_t device = -1;
    // Host memory: the device address of a pinned, mapped allocation (nullptr when not mapped).
    const void* device_pointer = nullptr;
};

// Asks the driver about ptr. Called only for memory the registry does not know.
using PointerQuery = PointerAttributes (*)(const void* ptr);

// The facts of a stream that the memory checks need.
struct StreamPlace {
    eplb_backend_t backend = EPLB_BACKEND_CPU;
    int32_t device = -1;
};

// One registered address range [begin, begin + size).
struct MemoryRange {
    uintptr_t begin = 0;
    uint64_t size = 0;
    eplb_backend_t backend = EPLB_BACKEND_CPU;
    int32_t device = -1;
    // True for memory the library allocated (its exact extent is known), false for wrapped memory.
    bool owned = false;
};

class Registry {
public:
    // Registers a new buffer and its memory range; returns its handle.
    eplb_buffer* add_buffer(std::shared_ptr<eplb_buffer> buffer, const MemoryRange& range);
    // Registers a new stream; returns its handle.
    eplb_stream* add_stream(std::shared_ptr<eplb_stream> stream);

    // The live object behind a handle; throws EPLB_STATUS_INVALID_ARGUMENT naming the argument
    // (name) and saying whether the handle was destroyed, is of the other kind, or never existed.
    std::shared_ptr<eplb_buffer> buffer(const eplb_buffer* handle, const char* name) const;
    std::shared_ptr<eplb_stream> stream(const eplb_stream* handle, const char* name) const;

    // Unregisters a handle (and a buffer's memory range) and returns its object, for destroy. The
    // same errors as the lookups: a second destroy fails instead of freeing twice.
    std::shared_ptr<eplb_buffer> remove_buffer(const eplb_buffer* handle, const char* name);
    std::shared_ptr<eplb_stream> remove_stream(const eplb_stream* handle, const char* name);

    // Checks that [ptr, ptr + bytes) is memory that work on the stream may use, and that ptr is
    // aligned to alignment (a power of two). Throws EPLB_STATUS_INVALID_ARGUMENT naming the argument.
    //   - Inside one known range of the stream's backend (and device): accepted, no query.
    //   - Inside library-owned memory of the other backend, or running past the end of an eplb
    //     buffer the library allocated: refused, no query.
    //   - Anything else (unknown memory, wrapped memory on another device or backend, a range that
    //     runs past a wrapped region): the driver is asked, as before the registry existed. query
    //     may be nullptr (no CUDA here, or not initialised): CPU streams then accept unknown memory.
    void check_pointer(const StreamPlace& stream, const void* ptr, uint64_t bytes, uint64_t alignment,
                       const char* name, PointerQuery query) const;

    // Live handles and ranges (tests).
    size_t live_buffers() const;
    size_t live_streams() const;

private:
    enum Kind : uint64_t { kBuffer = 1, kStream = 2 };
    static constexpr uint64_t kKindBits = 4;

    uint64_t next_handle(Kind kind);
    [[noreturn]] void throw_stale(uint64_t value, Kind wanted, const char* name) const;
    // The known range that holds [ptr, ptr + bytes), else the range ptr lies in (for the overrun
    // message), else nullptr. Caller holds the lock.
    const MemoryRange* find_range(uintptr_t ptr, uint64_t bytes, bool* contains) const;

    mutable std::shared_mutex mutex_;
    uint64_t serial_ = 0;
    struct BufferEntry {
        std::shared_ptr<eplb_buffer> buffer;
        uintptr_t begin;  // key of its range in ranges_
    };
    std::unordered_map<uint64_t, BufferEntry> buffers_;
    std::unordered_map<uint64_t, std::shared_ptr<eplb_stream>> streams_;
    // Ranges by start address; wraps may overlap each other (or an eplb buffer), so several may share
    // a start and a lookup looks at a few predecessors.
    std::multimap<uintptr_t, std::pair<uint64_t, MemoryRange>> ranges_;  // start -> (handle, range)
};

// The process-wide registry (never destroyed, so late finalizers can still call destroy).
Registry& registry();

// Full check of an unknown pointer through the driver query (the path before the registry existed).
void check_unknown_pointer(const StreamPlace& stream, const void* ptr, const char* name, PointerQuery query);

}  // namespace eplb::capi
