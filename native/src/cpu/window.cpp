#include "cpu/window.hpp"

#include <cstring>

namespace eplb::cpu {

void load_window_push(int32_t* pass_counters, int32_t* window, int64_t* window_sums, int64_t count, int32_t slot) {
    int32_t* row = window + int64_t(slot) * count;
    for (int64_t i = 0; i < count; ++i) {
        const int32_t value = pass_counters[i];
        window_sums[i] += int64_t(value) - int64_t(row[i]);
        row[i] = value;
        pass_counters[i] = 0;
    }
}

void load_window_discard(int32_t* pass_counters, int64_t count) {
    std::memset(pass_counters, 0, size_t(count) * sizeof(int32_t));
}

}  // namespace eplb::cpu
