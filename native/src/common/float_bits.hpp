// The bits of a float and back, the same on host and device (the selection keys of the routing
// kernels and the bf16 conversions are built on them).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/hostdevice.hpp"

namespace eplb {

EPLB_HD uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(value);
#else
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
#endif
}

EPLB_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
#endif
}

}  // namespace eplb
