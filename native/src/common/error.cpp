#include "common/error.hpp"

#include <atomic>
#include <mutex>

namespace eplb {

namespace {
thread_local std::string t_last_error;

std::mutex g_cuda_error_mutex;
int g_last_cuda_error = 0;
std::string g_last_cuda_error_text;
}  // namespace

void set_last_error(const char* message) noexcept {
    try {
        t_last_error = message ? message : "";
    } catch (...) {
        // Out of memory while recording an error: keep the previous message.
    }
}

const char* last_error() noexcept { return t_last_error.c_str(); }

void record_cuda_error(int code, const char* text) noexcept {
    try {
        std::lock_guard<std::mutex> lock(g_cuda_error_mutex);
        g_last_cuda_error = code;
        g_last_cuda_error_text = text ? text : "";
    } catch (...) {
    }
}

int last_cuda_error(std::string* text) noexcept {
    try {
        std::lock_guard<std::mutex> lock(g_cuda_error_mutex);
        if (text) *text = g_last_cuda_error_text;
        return g_last_cuda_error;
    } catch (...) {
        return g_last_cuda_error;
    }
}

}  // namespace eplb
