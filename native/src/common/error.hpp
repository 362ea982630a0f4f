// Errors inside libeplb: C++ exceptions carrying an eplb_status_t, turned into a status plus a
// thread-local message at every export by EPLB_API_BEGIN/EPLB_API_END (TorchSharp's CATCH idea).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "eplb/eplb.h"

namespace eplb {

class Error : public std::runtime_error {
public:
    Error(eplb_status_t status, const std::string& message) : std::runtime_error(message), status_(status) {}
    eplb_status_t status() const noexcept { return status_; }

private:
    eplb_status_t status_;
};

namespace detail {
template <typename... Parts>
std::string concat(Parts&&... parts) {
    std::ostringstream out;
    (out << ... << std::forward<Parts>(parts));
    return out.str();
}
}  // namespace detail

// Throws Error(status, concatenation of parts).
template <typename... Parts>
[[noreturn]] void fail(eplb_status_t status, Parts&&... parts) {
    throw Error(status, detail::concat(std::forward<Parts>(parts)...));
}

// Throws EPLB_STATUS_INVALID_ARGUMENT with the concatenated message.
template <typename... Parts>
[[noreturn]] void invalid(Parts&&... parts) {
    fail(EPLB_STATUS_INVALID_ARGUMENT, std::forward<Parts>(parts)...);
}

// Thread-local last error message (eplb_last_error_message).
void set_last_error(const char* message) noexcept;
const char* last_error() noexcept;

// Process-wide record of the last CUDA error the library saw (reported by eplb_get_runtime_info).
void record_cuda_error(int code, const char* text) noexcept;
int last_cuda_error(std::string* text) noexcept;

}  // namespace eplb

// Every export is wrapped in these: the body returns EPLB_STATUS_OK (or another status) and any
// exception becomes a status plus a message. Nothing escapes into the caller's frames.
#define EPLB_API_BEGIN try {
#define EPLB_API_END                                                                     \
    }                                                                                    \
    catch (const ::eplb::Error& e) {                                                     \
        ::eplb::set_last_error(e.what());                                                \
        return e.status();                                                               \
    }                                                                                    \
    catch (const std::bad_alloc&) {                                                      \
        ::eplb::set_last_error("out of host memory");                                    \
        return EPLB_STATUS_OUT_OF_MEMORY;                                                \
    }                                                                                    \
    catch (const std::exception& e) {                                                    \
        ::eplb::set_last_error(e.what());                                                \
        return EPLB_STATUS_INTERNAL;                                                     \
    }                                                                                    \
    catch (...) {                                                                        \
        ::eplb::set_last_error("unknown C++ exception inside libeplb");                  \
        return EPLB_STATUS_INTERNAL;                                                     \
    }

// Argument checks used by the ABI layer; each names the argument and the value.
#define EPLB_CHECK_NOT_NULL(ptr)                                        \
    do {                                                                \
        if ((ptr) == nullptr) ::eplb::invalid(#ptr " must not be NULL"); \
    } while (0)
