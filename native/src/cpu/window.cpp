#include "cpu/window.hpp"

#include <cstring>

#include "cpu/record.hpp"

namespace eplb::cpu {

void load_window_push(int32_t* pass_counters, int32_t* window, int64_t* window_sums, int64_t count, int32_t slot,
                      uint32_t* error_flags) {
    int32_t* row = window + int64_t(slot) * count;
    bool overflowed = false;
    for (int64_t i = 0; i < count; ++i) {
        overflowed |= pass_counters[i] < 0;
        const int32_t value = saturated_pass_count(pass_counters[i]);
        window_sums[i] += int64_t(value) - int64_t(row[i]);
        row[i] = value;
        pass_counters[i] = 0;
    }
    if (overflowed) raise_error_flags(error_flags, EPLB_DEVICE_ERROR_COUNTER_OVERFLOW);
}

void load_window_discard(int32_t* pass_counters, int64_t count) {
    std::memset(pass_counters, 0, size_t(count) * sizeof(int32_t));
}

}  // namespace eplb::cpu
