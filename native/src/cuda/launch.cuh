// Shared helpers for the CUDA kernels: nothing here knows about handles or statuses.
#pragma once

#include <cuda_runtime_api.h>

// Returns the error of a CUDA call from the enclosing function (which returns cudaError_t).
#define EPLB_CUDA_RETURN_IF_ERROR(expr)            \
    do {                                           \
        const cudaError_t eplb_err_ = (expr);      \
        if (eplb_err_ != cudaSuccess) return eplb_err_; \
    } while (0)
