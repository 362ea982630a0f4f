// Float arithmetic, scores and selection keys of the routing kernels (docs/design.md §4.1, 4.2), shared by the
// CPU reference and the CUDA kernels so both compute the same bits from the same source lines.
//
// Why not expf/log1pf: glibc and CUDA's libdevice round them differently (CUDA's expf is within
// 2 ulp, not correctly rounded), and a one-ulp difference in s + bias flips the top-k whenever two
// experts are that close, which over 16K tokens x 256 experts happens. So the scores use only
// operations IEEE 754 defines exactly (add, mul, fma, div, sqrt, floor, round-to-nearest), each
// written as an explicit call: on the device the _rn intrinsics, which nvcc never contracts or
// approximates; on the host one operation per expression (ISO C++ mode does not contract across
// them, and std::fma is the correctly rounded fused operation).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/float_bits.hpp"
#include "common/hostdevice.hpp"
#include "eplb/eplb_routing.h"

namespace eplb::routing {

EPLB_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

EPLB_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

EPLB_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// a * b + c with one rounding.
EPLB_HD float ffma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

EPLB_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

EPLB_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return std::sqrt(a);
#endif
}

EPLB_HD float ffloor(float a) {
#if defined(__CUDA_ARCH__)
    return floorf(a);
#else
    return std::floor(a);
#endif
}

EPLB_HD bool is_nan(float value) { return value != value; }

// Smallest x whose e^x is a normal float: -126 ln 2 = -87.33654..., rounded up so that the reduced
// argument below is never negative at k = -126 and no subnormal result can appear.
constexpr float kExpMinArgument = -87.3365f;

// e^x for x <= 0; 0 for x < kExpMinArgument (and -inf). Cody-Waite reduction x = k ln2 + r,
// |r| <= ln2/2, and the degree-7 polynomial of Cephes expf (S. L. Moshier, Cephes Math Library):
// e^r = 1 + r + r^2 P(r), within 1 ulp of e^x. Flushing below the normal range keeps every result
// independent of the FTZ/DAZ modes of the host and the device.
EPLB_HD float exp_nonpositive(float x) {
    if (!(x >= kExpMinArgument)) return 0.0f;
    const float k = ffloor(fadd(fmul(x, 1.44269504088896341f), 0.5f));
    float r = ffma(k, -0.693359375f, x);  // k * C1 is exact: C1 has 9 significant bits, |k| <= 126
    r = ffma(k, 2.12194440e-4f, r);
    const float z = fmul(r, r);
    float p = 1.9875691500e-4f;
    p = ffma(p, r, 1.3981999507e-3f);
    p = ffma(p, r, 8.3334519073e-3f);
    p = ffma(p, r, 4.1665795894e-2f);
    p = ffma(p, r, 1.6666665459e-1f);
    p = ffma(p, r, 5.0000001201e-1f);
    const float y = fadd(ffma(p, z, r), 1.0f);
    const float two_to_k = float_from_bits(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);  // k in [-126, 0]
    return fmul(y, two_to_k);
}

// log(1 + y) for y in [0, 1]: log(1 + f) = f - f^2/2 + f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]
// (Cephes logf's polynomial). Below sqrt(2) - 1 the argument is y itself, exact, so tiny y keep
// full relative accuracy (softplus of very negative logits); above it 1 + y = 2 (1 + f) with
// f = (y - 1) / 2 and ln 2 = 0.693359375 - 2.12194440e-4 added in two parts.
EPLB_HD float log1p_unit(float y) {
    const bool upper = y >= 0.41421356f;
    const float f = upper ? fmul(fsub(y, 1.0f), 0.5f) : y;
    const float z = fmul(f, f);
    float p = 7.0376836292e-2f;
    p = ffma(p, f, -1.1514610310e-1f);
    p = ffma(p, f, 1.1676998740e-1f);
    p = ffma(p, f, -1.2420140846e-1f);
    p = ffma(p, f, 1.4249322787e-1f);
    p = ffma(p, f, -1.6668057665e-1f);
    p = ffma(p, f, 2.0000714765e-1f);
    p = ffma(p, f, -2.4999993993e-1f);
    p = ffma(p, f, 3.3333331174e-1f);
    float t = fmul(fmul(p, f), z);
    if (upper) t = fadd(t, -2.12194440e-4f);
    t = ffma(-0.5f, z, t);
    float result = fadd(f, t);
    if (upper) result = fadd(result, 0.693359375f);
    return result;
}

// +-inf -> +-FLT_MAX; x must not be NaN.
EPLB_HD float clamp_logit(float x) { return fminf(fmaxf(x, -FLT_MAX), FLT_MAX); }

// 1 / (1 + e^-x) through e^-|x| <= 1, so nothing overflows. x finite.
EPLB_HD float sigmoid(float x) {
    const float e = exp_nonpositive(-fabsf(x));
    const float d = fadd(1.0f, e);
    return x >= 0.0f ? fdiv(1.0f, d) : fdiv(e, d);
}

// sqrt(softplus(x)), softplus computed stably as max(x, 0) + log1p(exp(-|x|)) (docs/design.md §4.1). x finite;
// the result lies in [0, 1.85e19], so sums of up to EPLB_ROUTING_MAX_TOP_K of them stay finite.
EPLB_HD float sqrt_softplus(float x) {
    const float e = exp_nonpositive(-fabsf(x));
    return fsqrt(fadd(fmaxf(x, 0.0f), log1p_unit(e)));
}

// The unbiased score s of a logit: 0 for NaN (a NaN logit never carries weight).
template <int kScore>
EPLB_HD float score(float logit) {
    if (is_nan(logit)) return 0.0f;
    const float x = clamp_logit(logit);
    if (kScore == EPLB_ROUTING_SCORE_SIGMOID) return sigmoid(x);
    return sqrt_softplus(x);
}

// Selection keys are floats mapped to uint32 so that unsigned order is float order: one integer
// compare (and one warp-wide max) per step, ties resolved on the id alone. NaN must be replaced
// before; -0 is folded into +0 so "equal value" means equal key. Every real key is >= the key of
// -inf (0x007FFFFF); kNoKey marks experts that are taken or outside the kept groups.
constexpr uint32_t kNoKey = 0;

EPLB_HD uint32_t order_key(float value) {
    const uint32_t bits = float_bits(fadd(value, 0.0f));
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

EPLB_HD float key_value(uint32_t key) { return float_from_bits((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key); }

// -inf for NaN; everything else unchanged.
EPLB_HD float nan_to_neg_inf(float value) { return is_nan(value) ? -INFINITY : value; }

// Key of a sigmoid/sqrtsoftplus expert: s + bias, -inf when the logit or the sum is NaN.
EPLB_HD uint32_t biased_key(float logit, float s, float bias) {
    if (is_nan(logit)) return order_key(-INFINITY);
    return order_key(nan_to_neg_inf(fadd(s, bias)));
}

// Key of a softmax expert: the clamped logit, -inf for NaN.
EPLB_HD uint32_t logit_key(float logit) { return order_key(is_nan(logit) ? -INFINITY : clamp_logit(logit)); }

// A group's score from its two largest keys (second = kNoKey for a one-expert group).
EPLB_HD uint32_t group_key(uint32_t first, uint32_t second) {
    if (second == kNoKey) return first;
    return order_key(nan_to_neg_inf(fadd(key_value(first), key_value(second))));
}

// e^(x - max) of a softmax entry: x and max are clamped logits or -inf (NaN logits, or no finite
// logit at all), which give 0.
EPLB_HD float softmax_numerator(float x, float max) {
    if (x == -INFINITY || max == -INFINITY) return 0.0f;
    return exp_nonpositive(fsub(x, max));
}

// The floor that keeps an all-underflow row at weight 0 instead of 0 / 0 (docs/design.md §4.1).
constexpr float kRenormalizeEpsilon = 1e-20f;

// Final weight from a selected value: renormalised by sum (the top-k values added in selection order)
// and scaled, per config.
EPLB_HD float finish_weight(float value, float sum, bool renormalize, bool scale, float factor) {
    float weight = renormalize ? fdiv(value, fadd(sum, kRenormalizeEpsilon)) : value;
    return scale ? fmul(weight, factor) : weight;
}

// Experts per warp lane in the routing kernels' layout: lane l holds experts
// [l * per_lane, (l + 1) * per_lane). It fixes the order of the softmax denominator: each lane adds
// its own experts in ascending order, then lanes combine in an xor butterfly (16, 8, 4, 2, 1).
EPLB_HD int32_t experts_per_lane(int32_t num_experts) { return (num_experts + 31) / 32; }

}  // namespace eplb::routing
