// ABI entries of the dispatch ops (docs/design.md §6): validation of every size and pointer (and, on the CPU
// backend, of the index contents) before anything is written, then CPU or CUDA dispatch.
#include <cstdint>
#include <initializer_list>

#include "capi/validate.hpp"
#include "common/dispatch.hpp"
#include "cpu/dispatch.hpp"

#if EPLB_WITH_CUDA
#include "cuda/dispatch.cuh"
#endif

using namespace eplb;
using namespace eplb::capi;

namespace {

constexpr int64_t kMaxTopK = 1024;
constexpr int64_t kMaxHidden = int64_t(1) << 20;
constexpr int64_t kMaxBlockSize = int64_t(1) << 16;

// A byte range of one argument, for the overlap checks.
struct Span {
    const void* data;
    int64_t bytes;
    const char* name;
};

// Throws when two non-empty ranges share a byte: an output aliasing an input or another output
// would make the result depend on the order of the writes.
void check_disjoint(std::initializer_list<Span> spans) {
    for (auto a = spans.begin(); a != spans.end(); ++a) {
        for (auto b = a + 1; b != spans.end(); ++b) {
            if (a->data == nullptr || b->data == nullptr || a->bytes <= 0 || b->bytes <= 0) continue;
            const auto a0 = reinterpret_cast<uintptr_t>(a->data), b0 = reinterpret_cast<uintptr_t>(b->data);
            if (a0 < b0 + uint64_t(b->bytes) && b0 < a0 + uint64_t(a->bytes))
                invalid(a->name, " and ", b->name, " overlap (", a->data, " + ", a->bytes, " bytes and ", b->data, " + ",
                        b->bytes, " bytes)");
        }
    }
}

// Checks a pointer that the call reads or writes count elements of element_bytes through (aligned to
// element_bytes); NULL is fine when count is 0.
void check_array(const eplb_stream_t& stream, const void* ptr, int64_t count, int64_t element_bytes, const char* name) {
    if (count > 0) check_pointer(stream, ptr, uint64_t(count) * uint64_t(element_bytes), uint64_t(element_bytes), name);
}

void check_dtype(int dtype, const char* name) {
    if (dtype != EPLB_DTYPE_F32 && dtype != EPLB_DTYPE_BF16)
        invalid(name, " must be EPLB_DTYPE_F32 (0) or EPLB_DTYPE_BF16 (1) (got ", dtype, ")");
}

int64_t element_size(eplb_dtype_t dtype) { return dtype == EPLB_DTYPE_BF16 ? 2 : 4; }

void check_aligned(const void* ptr, int64_t alignment, const char* name) {
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % uint64_t(alignment) != 0)
        invalid(name, " (", ptr, ") is not aligned to its element size of ", alignment, " bytes");
}

// The (token, k) pair count shared by every op: pair ids are int32.
int64_t checked_pairs(int64_t num_tokens, int32_t top_k) {
    check_in_range(num_tokens, 0, INT32_MAX, "num_tokens");
    check_in_range(top_k, 1, kMaxTopK, "top_k");
    const int64_t pairs = num_tokens * top_k;
    if (pairs > INT32_MAX)
        invalid("num_tokens * top_k = ", num_tokens, " * ", top_k, " = ", pairs, " exceeds INT32_MAX (pair ids are int32)");
    return pairs;
}

int64_t checked_capacity(int64_t num_pairs, int32_t num_buckets, int32_t block_size) {
    const int64_t capacity = align_capacity(num_pairs, num_buckets, block_size);
    if (capacity > INT32_MAX)
        invalid("the worst-case aligned row count ", capacity, " (num_pairs ", num_pairs, ", num_local_experts ",
                num_buckets, ", block_size ", block_size, ") exceeds INT32_MAX (rows are int32)");
    return capacity;
}

}  // namespace

extern "C" EPLB_API eplb_status_t eplb_dispatch_align_capacity(int64_t num_pairs, int32_t num_local_experts,
                                                               int32_t block_size, int64_t* out_capacity) {
    EPLB_API_BEGIN
    EPLB_CHECK_NOT_NULL(out_capacity);
    check_in_range(num_pairs, 0, INT32_MAX, "num_pairs");
    check_in_range(num_local_experts, 1, EPLB_DISPATCH_MAX_BUCKETS, "num_local_experts");
    check_in_range(block_size, 1, kMaxBlockSize, "block_size");
    *out_capacity = checked_capacity(num_pairs, num_local_experts, block_size);
    return EPLB_STATUS_OK;
    EPLB_API_END
}

extern "C" EPLB_API eplb_status_t eplb_dispatch_align(eplb_stream_t* stream, const int32_t* physical_ids,
                                                      int64_t num_tokens, int32_t top_k, int32_t first_slot,
                                                      int32_t num_local_experts, int32_t block_size, int64_t capacity,
                                                      int32_t* expert_counts, int32_t* expert_offsets,
                                                      int32_t* sorted_pair_ids, int32_t* block_experts,
                                                      int32_t* pair_positions) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    const int64_t num_pairs = checked_pairs(num_tokens, top_k);
    check_in_range(num_local_experts, 1, EPLB_DISPATCH_MAX_BUCKETS, "num_local_experts");
    check_in_range(first_slot, 0, int64_t(INT32_MAX) - num_local_experts, "first_slot");
    check_in_range(block_size, 1, kMaxBlockSize, "block_size");
    const int64_t needed = checked_capacity(num_pairs, num_local_experts, block_size);
    if (capacity < needed || capacity > INT32_MAX)
        invalid("capacity must be in [", needed, ", INT32_MAX] (the worst case of ", num_pairs, " pairs over ",
                num_local_experts, " experts padded to ", block_size, "; see eplb_dispatch_align_capacity) (got ",
                capacity, ")");
    const int64_t num_blocks = capacity / block_size;
    check_array(s, physical_ids, num_pairs, 4, "physical_ids");
    check_elements(s, expert_counts, num_local_experts, "expert_counts");
    check_elements(s, expert_offsets, int64_t(num_local_experts) + 1, "expert_offsets");
    check_array(s, sorted_pair_ids, capacity, 4, "sorted_pair_ids");
    check_array(s, block_experts, num_blocks, 4, "block_experts");
    check_array(s, pair_positions, num_pairs, 4, "pair_positions");
    check_disjoint({{physical_ids, num_pairs * 4, "physical_ids"},
                    {expert_counts, int64_t(num_local_experts) * 4, "expert_counts"},
                    {expert_offsets, (int64_t(num_local_experts) + 1) * 4, "expert_offsets"},
                    {sorted_pair_ids, capacity * 4, "sorted_pair_ids"},
                    {block_experts, num_blocks * 4, "block_experts"},
                    {pair_positions, num_pairs * 4, "pair_positions"}});

    if (s.backend == EPLB_BACKEND_CPU) {
        cpu::align(physical_ids, num_tokens, top_k, first_slot, num_local_experts, block_size, capacity, expert_counts,
                   expert_offsets, sorted_pair_ids, block_experts, pair_positions);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::align(physical_ids, num_tokens, top_k, first_slot, num_local_experts, block_size, capacity,
                                    expert_counts, expert_offsets, sorted_pair_ids, block_experts, pair_positions,
                                    s.device_error_flags, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

extern "C" EPLB_API eplb_status_t eplb_dispatch_bucket_by_rank(eplb_stream_t* stream, const int32_t* physical_ids,
                                                               int64_t num_tokens, int32_t top_k, int32_t num_physical,
                                                               int32_t num_ranks, int32_t* rank_counts,
                                                               int32_t* rank_offsets, int32_t* send_pair_ids,
                                                               int32_t* pair_positions) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    const int64_t num_pairs = checked_pairs(num_tokens, top_k);
    check_in_range(num_physical, 1, INT32_MAX, "num_physical");
    check_in_range(num_ranks, 1, EPLB_DISPATCH_MAX_BUCKETS, "num_ranks");
    if (num_physical % num_ranks != 0)
        invalid("num_physical (", num_physical, ") must be a multiple of num_ranks (", num_ranks, ")");
    check_array(s, physical_ids, num_pairs, 4, "physical_ids");
    check_elements(s, rank_counts, num_ranks, "rank_counts");
    check_elements(s, rank_offsets, int64_t(num_ranks) + 1, "rank_offsets");
    check_array(s, send_pair_ids, num_pairs, 4, "send_pair_ids");
    check_array(s, pair_positions, num_pairs, 4, "pair_positions");
    check_disjoint({{physical_ids, num_pairs * 4, "physical_ids"},
                    {rank_counts, int64_t(num_ranks) * 4, "rank_counts"},
                    {rank_offsets, (int64_t(num_ranks) + 1) * 4, "rank_offsets"},
                    {send_pair_ids, num_pairs * 4, "send_pair_ids"},
                    {pair_positions, num_pairs * 4, "pair_positions"}});

    if (s.backend == EPLB_BACKEND_CPU) {
        for (int64_t pair = 0; pair < num_pairs; ++pair) {
            const int32_t slot = physical_ids[pair];
            if (slot < -1 || slot >= num_physical)
                invalid("physical_ids[", pair / top_k, "][", pair % top_k, "] = ", slot,
                        " is outside [0, num_physical = ", num_physical, ") and not -1");
        }
        cpu::bucket_by_rank(physical_ids, num_tokens, top_k, num_physical, num_ranks, rank_counts, rank_offsets,
                            send_pair_ids, pair_positions);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::bucket_by_rank(physical_ids, num_tokens, top_k, num_physical, num_ranks, rank_counts,
                                             rank_offsets, send_pair_ids, pair_positions, s.device_error_flags,
                                             cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

extern "C" EPLB_API eplb_status_t eplb_dispatch_permute(eplb_stream_t* stream, eplb_dtype_t dtype, const void* x,
                                                        int64_t num_tokens, int64_t hidden, int32_t top_k,
                                                        const int32_t* row_pair_ids, const int32_t* num_rows,
                                                        int64_t capacity, void* out) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_dtype(dtype, "dtype");
    const int64_t num_pairs = checked_pairs(num_tokens, top_k);
    check_in_range(hidden, 1, kMaxHidden, "hidden");
    check_in_range(capacity, 0, INT32_MAX, "capacity");
    const int64_t element = element_size(dtype);
    check_aligned(x, element, "x");
    check_aligned(out, element, "out");
    check_array(s, x, num_tokens * hidden, element, "x");
    check_array(s, row_pair_ids, capacity, 4, "row_pair_ids");
    check_elements(s, num_rows, 1, "num_rows");
    check_array(s, out, capacity * hidden, element, "out");
    check_disjoint({{x, num_tokens * hidden * element, "x"},
                    {row_pair_ids, capacity * 4, "row_pair_ids"},
                    {num_rows, 4, "num_rows"},
                    {out, capacity * hidden * element, "out"}});

    if (s.backend == EPLB_BACKEND_CPU) {
        const int32_t rows = *num_rows;
        if (rows < 0 || rows > capacity) invalid("*num_rows must be in [0, capacity = ", capacity, "] (got ", rows, ")");
        for (int32_t row = 0; row < rows; ++row) {
            const int32_t pair = row_pair_ids[row];
            if (pair < EPLB_DISPATCH_PADDING || pair >= num_pairs)
                invalid("row_pair_ids[", row, "] = ", pair, " is outside [0, num_tokens * top_k = ", num_pairs,
                        ") and not EPLB_DISPATCH_PADDING");
        }
        cpu::permute(x, hidden, size_t(element), top_k, row_pair_ids, rows, out);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::permute(dtype, x, num_tokens, hidden, top_k, row_pair_ids, num_rows, capacity, out,
                                      s.device_error_flags, s.sm_count, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}

extern "C" EPLB_API eplb_status_t eplb_dispatch_combine(eplb_stream_t* stream, eplb_dtype_t y_dtype, const void* y,
                                                        int64_t y_rows, int64_t hidden, const int32_t* pair_positions,
                                                        const float* weights, int64_t num_tokens, int32_t top_k,
                                                        eplb_dtype_t out_dtype, void* out) {
    EPLB_API_BEGIN
    const StreamRef held = checked_stream(stream);
    eplb_stream_t& s = *held;
    check_dtype(y_dtype, "y_dtype");
    check_dtype(out_dtype, "out_dtype");
    const int64_t num_pairs = checked_pairs(num_tokens, top_k);
    check_in_range(y_rows, 0, INT32_MAX, "y_rows");
    check_in_range(hidden, 1, kMaxHidden, "hidden");
    const int64_t in_element = element_size(y_dtype);
    const int64_t out_element = element_size(out_dtype);
    check_aligned(y, in_element, "y");
    check_aligned(out, out_element, "out");
    check_aligned(weights, 4, "weights");
    check_array(s, y, y_rows * hidden, in_element, "y");
    check_array(s, pair_positions, num_pairs, 4, "pair_positions");
    if (weights != nullptr) check_array(s, weights, num_pairs, 4, "weights");
    check_array(s, out, num_tokens * hidden, out_element, "out");
    check_disjoint({{y, y_rows * hidden * in_element, "y"},
                    {pair_positions, num_pairs * 4, "pair_positions"},
                    {weights, weights ? num_pairs * 4 : 0, "weights"},
                    {out, num_tokens * hidden * out_element, "out"}});

    if (s.backend == EPLB_BACKEND_CPU) {
        for (int64_t pair = 0; pair < num_pairs; ++pair) {
            const int32_t row = pair_positions[pair];
            if (row < EPLB_DISPATCH_PADDING || row >= y_rows)
                invalid("pair_positions[", pair / top_k, "][", pair % top_k, "] = ", row, " is outside [0, y_rows = ",
                        y_rows, ") and not EPLB_DISPATCH_PADDING");
        }
        cpu::combine(y_dtype, y, hidden, pair_positions, weights, num_tokens, top_k, out_dtype, out);
    } else {
#if EPLB_WITH_CUDA
        DeviceGuard guard(s.device);
        EPLB_CUDA_CHECK(cuda::combine(y_dtype, y, y_rows, hidden, pair_positions, weights, num_tokens, top_k, out_dtype,
                                      out, s.device_error_flags, s.sm_count, cuda_stream_of(s)));
#endif
    }
    return EPLB_STATUS_OK;
    EPLB_API_END
}
