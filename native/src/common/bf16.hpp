// bfloat16 <-> float, shared by the CPU reference and the CUDA kernels so both produce the same
// bits. bf16 is stored as its raw 16 bits (uint16_t): the upper half of the fp32 pattern.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/float_bits.hpp"
#include "common/hostdevice.hpp"

namespace eplb {

EPLB_HD float bf16_to_float(uint16_t bits) { return float_from_bits(uint32_t(bits) << 16); }

// Round to nearest, ties to even (what torch and __float2bfloat16_rn do for finite values):
// add 0x7FFF plus the lowest kept bit, then truncate. Overflow rounds to infinity as it should.
// NaN keeps its sign and becomes the quiet NaN 0x7FC0, so no payload can round into infinity.
EPLB_HD uint16_t float_to_bf16(float value) {
    const uint32_t bits = float_bits(value);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t(((bits >> 16) & 0x8000u) | 0x7FC0u);
    const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
    return uint16_t((bits + rounding) >> 16);
}

// Element access by storage type: float is itself, uint16_t is bf16.
EPLB_HD float to_float(float value) { return value; }
EPLB_HD float to_float(uint16_t bits) { return bf16_to_float(bits); }

template <typename T>
EPLB_HD T from_float(float value);

template <>
EPLB_HD float from_float<float>(float value) {
    return value;
}

template <>
EPLB_HD uint16_t from_float<uint16_t>(float value) {
    return float_to_bf16(value);
}

}  // namespace eplb
