// EPLB_HD marks functions shared by the CPU reference and the CUDA kernels, so both compute the
// same bits from the same source line.
#pragma once

#if defined(__CUDACC__)
#define EPLB_HD __host__ __device__ __forceinline__
#else
#define EPLB_HD inline
#endif
