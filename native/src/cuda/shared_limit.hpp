// The dynamic shared-memory limit of a kernel (cudaFuncAttributeMaxDynamicSharedMemorySize), decided
// on the host in plain C++ so a CPU test can check the rule (tests/test_moe_tile.cpp).
//
// The limit belongs to the kernel (on each device), not to a launch: a launch asking for more
// dynamic shared memory than the kernel's current limit fails. A kernel whose shared memory depends
// on the problem (Mega MoE: on the number of local experts) must therefore never have its limit
// lowered below what a later launch asks for; setting it to each launch's own size breaks the first
// larger launch after a smaller one. The rule: when a launch needs more than the limit holds, raise
// it at once to the most any launch of that kernel can ask for (capped by what the device allows
// per block), and never lower it. One set per kernel and device in practice, none on the hot path.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace eplb::cuda {

// The limit to set before a launch that needs `needed` bytes, on a kernel whose limit is `current`
// (0: not set yet), whose launches never need more than `largest`, on a device that grants at most
// `device_max` bytes per block. Returns 0 when `current` already covers the launch. A launch that
// needs more than the device grants cannot run: the answer is then `needed` itself, so the set
// fails with CUDA's own error instead of the launch failing later.
inline size_t shared_limit_to_set(size_t needed, size_t current, size_t largest, size_t device_max) {
    if (needed <= current) return 0;
    if (needed > device_max) return needed;
    const size_t cap = largest < device_max ? largest : device_max;
    return cap > needed ? cap : needed;
}

// The limits this process has set, per (device, kernel). ensure() calls set(limit) only when the
// rule asks for a new limit, and remembers it only when set returns Error{} (cudaSuccess is 0).
template <class Kernel>
class SharedLimits {
public:
    template <class Set>
    auto ensure(int device, Kernel kernel, size_t needed, size_t largest, size_t device_max, Set&& set)
        -> decltype(set(size_t())) {
        using Error = decltype(set(size_t()));
        std::lock_guard<std::mutex> lock(mutex_);
        size_t& current = limits_[std::make_pair(device, kernel)];
        const size_t limit = shared_limit_to_set(needed, current, largest, device_max);
        if (limit == 0) return Error{};
        const Error error = set(limit);
        if (error == Error{}) current = limit;
        return error;
    }

    // The limit last set for (device, kernel), 0 when none.
    size_t current(int device, Kernel kernel) const {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto found = limits_.find(std::make_pair(device, kernel));
        return found == limits_.end() ? 0 : found->second;
    }

private:
    mutable std::mutex mutex_;
    std::map<std::pair<int, Kernel>, size_t> limits_;
};

}  // namespace eplb::cuda
