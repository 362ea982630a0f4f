#include "cpu/dispatch.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/bf16.hpp"
#include "common/dispatch.hpp"

namespace eplb::cpu {

namespace {

// A stable counting sort of the pairs by bucket (local expert or rank), each bucket padded to a
// multiple of block_size: count, scan, then place the pairs in ascending pair order.
template <class BucketOf>
void stable_bucket(const int32_t* ids, int64_t num_pairs, BucketOf bucket_of, int32_t num_buckets, int32_t block_size,
                   int64_t capacity, int32_t* counts, int32_t* offsets, int32_t* sorted, int32_t* blocks,
                   int32_t* positions) {
    bool bad = false;  // bad slots were rejected by the ABI layer; they take no row here either
    // Count
    std::fill(counts, counts + num_buckets, 0);
    for (int64_t pair = 0; pair < num_pairs; ++pair) {
        const int32_t bucket = bucket_of(ids[pair], &bad);
        if (bucket != kNoBucket) ++counts[bucket];
    }
    // Scan
    offsets[0] = 0;
    for (int32_t b = 0; b < num_buckets; ++b) offsets[b + 1] = offsets[b] + round_up(counts[b], block_size);
    // Place
    std::fill(sorted, sorted + capacity, EPLB_DISPATCH_PADDING);
    std::vector<int32_t> cursor(offsets, offsets + num_buckets);
    for (int64_t pair = 0; pair < num_pairs; ++pair) {
        const int32_t bucket = bucket_of(ids[pair], &bad);
        if (bucket == kNoBucket) {
            positions[pair] = EPLB_DISPATCH_PADDING;
            continue;
        }
        const int32_t row = cursor[bucket]++;
        sorted[row] = int32_t(pair);
        positions[pair] = row;
    }
    if (blocks == nullptr) return;
    const int64_t num_blocks = capacity / block_size;
    const int32_t total = offsets[num_buckets];
    int32_t bucket = 0;
    for (int64_t block = 0; block < num_blocks; ++block) {
        const int64_t row = block * block_size;
        if (row >= total) {
            blocks[block] = EPLB_DISPATCH_PADDING;
            continue;
        }
        while (offsets[bucket + 1] <= row) ++bucket;
        blocks[block] = bucket;
    }
}

template <typename TIn, typename TOut>
void combine_typed(const TIn* y, int64_t hidden, const int32_t* positions, const float* weights, int64_t num_tokens,
                   int32_t top_k, TOut* out) {
    std::vector<float> acc(static_cast<size_t>(hidden));
    for (int64_t token = 0; token < num_tokens; ++token) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        // Ascending k, one rounding per product and per sum: the order the CUDA kernel keeps per element.
        for (int32_t k = 0; k < top_k; ++k) {
            const int64_t pair = token * top_k + k;
            const int32_t row = positions[pair];
            if (row < 0) continue;
            const float weight = weights ? weights[pair] : 1.0f;
            const TIn* source = y + int64_t(row) * hidden;
            for (int64_t h = 0; h < hidden; ++h) acc[size_t(h)] = weighted_add(acc[size_t(h)], weight, to_float(source[h]));
        }
        TOut* target = out + token * hidden;
        for (int64_t h = 0; h < hidden; ++h) target[h] = from_float<TOut>(acc[size_t(h)]);
    }
}

template <typename TIn>
void combine_to(eplb_dtype_t out_dtype, const TIn* y, int64_t hidden, const int32_t* positions, const float* weights,
                int64_t num_tokens, int32_t top_k, void* out) {
    if (out_dtype == EPLB_DTYPE_BF16)
        combine_typed(y, hidden, positions, weights, num_tokens, top_k, static_cast<uint16_t*>(out));
    else
        combine_typed(y, hidden, positions, weights, num_tokens, top_k, static_cast<float*>(out));
}

}  // namespace

void align(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t first_slot,
           int32_t num_local_experts, int32_t block_size, int64_t capacity, int32_t* expert_counts,
           int32_t* expert_offsets, int32_t* sorted_pair_ids, int32_t* block_experts, int32_t* pair_positions) {
    stable_bucket(physical_ids, num_tokens * top_k, LocalExpertOf{first_slot, num_local_experts}, num_local_experts,
                  block_size, capacity, expert_counts, expert_offsets, sorted_pair_ids, block_experts, pair_positions);
}

void bucket_by_rank(const int32_t* physical_ids, int64_t num_tokens, int32_t top_k, int32_t num_physical,
                    int32_t num_ranks, int32_t* rank_counts, int32_t* rank_offsets, int32_t* send_pair_ids,
                    int32_t* pair_positions) {
    const int64_t num_pairs = num_tokens * top_k;
    stable_bucket(physical_ids, num_pairs, RankOf{num_physical, num_physical / num_ranks}, num_ranks, 1, num_pairs,
                  rank_counts, rank_offsets, send_pair_ids, nullptr, pair_positions);
}

void permute(const void* x, int64_t hidden, size_t element_size, int32_t top_k, const int32_t* row_pair_ids,
             int64_t num_rows, void* out) {
    const size_t row_bytes = size_t(hidden) * element_size;
    const auto* source = static_cast<const unsigned char*>(x);
    auto* target = static_cast<unsigned char*>(out);
    for (int64_t row = 0; row < num_rows; ++row) {
        const int32_t pair = row_pair_ids[row];
        if (pair < 0) continue;  // padding: not written
        std::memcpy(target + size_t(row) * row_bytes, source + size_t(pair / top_k) * row_bytes, row_bytes);
    }
}

void combine(eplb_dtype_t y_dtype, const void* y, int64_t hidden, const int32_t* pair_positions, const float* weights,
             int64_t num_tokens, int32_t top_k, eplb_dtype_t out_dtype, void* out) {
    if (y_dtype == EPLB_DTYPE_BF16)
        combine_to(out_dtype, static_cast<const uint16_t*>(y), hidden, pair_positions, weights, num_tokens, top_k, out);
    else
        combine_to(out_dtype, static_cast<const float*>(y), hidden, pair_positions, weights, num_tokens, top_k, out);
}

}  // namespace eplb::cpu
