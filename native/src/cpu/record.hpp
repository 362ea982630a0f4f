// Load recording and error flags of the CPU reference, with the CUDA kernels' semantics: counts
// reach the shared counters through atomic adds (several threads may route one layer into the same
// counters at once) that saturate at INT32_MAX (common/load_counter.hpp), and the error word is
// updated with atomic or.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "common/load_counter.hpp"
#include "eplb/eplb_core.h"

namespace eplb::cpu {

// Sets bits in a stream's error word (nullptr: none).
inline void raise_error_flags(uint32_t* error_flags, uint32_t bits) {
    if (error_flags != nullptr) std::atomic_ref<uint32_t>(*error_flags).fetch_or(bits, std::memory_order_relaxed);
}

// *counter += amount (amount >= 1), atomically, saturating at INT32_MAX.
inline void record_load(int32_t* counter, int64_t amount, uint32_t* error_flags) {
    std::atomic_ref<int32_t> value(*counter);
    if (amount >= INT32_MAX) {
        value.store(INT32_MAX, std::memory_order_relaxed);
        raise_error_flags(error_flags, EPLB_DEVICE_ERROR_COUNTER_OVERFLOW);
        return;
    }
    const int32_t before = value.fetch_add(int32_t(amount), std::memory_order_relaxed);
    if (counter_add_overflowed(before, int32_t(amount))) {
        value.store(INT32_MAX, std::memory_order_relaxed);
        raise_error_flags(error_flags, EPLB_DEVICE_ERROR_COUNTER_OVERFLOW);
    }
}

// The loads of one call: counted in a per-thread histogram, then added to the shared counters
// once per touched slot when the call ends (the CUDA kernels' per-block histograms, in one thread).
// An atomic add per (token, k) would cost about three times the whole mapping op.
class LoadRecorder {
public:
    // counters == nullptr records nothing.
    LoadRecorder(int32_t* counters, int32_t num_physical, uint32_t* error_flags)
        : counters_(counters), error_flags_(error_flags) {
        if (counters_ == nullptr) return;
        Scratch& scratch = this_thread();
        if (scratch.counts.size() < size_t(num_physical)) scratch.counts.resize(size_t(num_physical), 0);
        counts_ = scratch.counts.data();
        touched_ = &scratch.touched;
        touched_->clear();
    }
    ~LoadRecorder() { flush(); }
    LoadRecorder(const LoadRecorder&) = delete;
    LoadRecorder& operator=(const LoadRecorder&) = delete;

    bool recording() const { return counters_ != nullptr; }

    // One routed (token, k) on slot (in [0, num_physical)).
    void add(int32_t slot) {
        if (counts_[slot]++ == 0) touched_->push_back(slot);
    }

    // Adds the counts to the shared counters and leaves the histogram zeroed for the next call.
    void flush() {
        if (counters_ == nullptr) return;
        for (const int32_t slot : *touched_) {
            record_load(&counters_[slot], counts_[slot], error_flags_);
            counts_[slot] = 0;
        }
        touched_->clear();
        counters_ = nullptr;
    }

private:
    struct Scratch {
        std::vector<int64_t> counts;  // all zero between calls
        std::vector<int32_t> touched;
    };
    static Scratch& this_thread() {
        thread_local Scratch scratch;
        return scratch;
    }

    int32_t* counters_;
    uint32_t* error_flags_;
    int64_t* counts_ = nullptr;
    std::vector<int32_t>* touched_ = nullptr;
};

}  // namespace eplb::cpu
