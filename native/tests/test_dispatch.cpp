// Tests of the dispatch ops (eplb_dispatch.h) through the public ABI: hand-checked goldens, a full
// characterisation of the aligned layout on random and real-load-shaped inputs, the permute ->
// expert -> combine round trip (one rank and EP over simulated ranks), bad input, and CUDA == CPU
// bit for bit with poisoned outputs (skipped without a device).
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>

#include "test_util.hpp"

using namespace eplb::test;

namespace {

constexpr int32_t kPad = EPLB_DISPATCH_PADDING;
constexpr int32_t kPoison = int32_t(0xDEADBEEF);
constexpr uint16_t kPoison16 = 0xBEEF;

// ---- bf16 written independently of the library: pick the nearer of the two neighbours, ties to the
// even one (compared in double, so no bit tricks shared with common/bf16.hpp).
float bf16_value(uint16_t bits) {
    const uint32_t word = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &word, 4);
    return value;
}

uint16_t to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    if (std::isnan(value)) return uint16_t(((bits >> 16) & 0x8000) | 0x7FC0);
    const uint16_t down = uint16_t(bits >> 16);  // truncated: the neighbour towards zero
    if ((bits & 0xFFFF) == 0) return down;
    const uint16_t up = uint16_t(down + 1);  // the neighbour away from zero (may be infinity)
    // Past the largest finite bf16 the next value would be 2^128: the overflow threshold of IEEE.
    const double d_up = std::isinf(bf16_value(up)) ? std::copysign(std::ldexp(1.0, 128), double(value)) : bf16_value(up);
    const double below = std::fabs(double(value) - double(bf16_value(down)));
    const double above = std::fabs(double(value) - d_up);
    if (below != above) return below < above ? down : up;
    return (down & 1) == 0 ? down : up;
}

int32_t round_up_to(int32_t value, int32_t multiple) { return (value + multiple - 1) / multiple * multiple; }

int64_t capacity_of(int64_t pairs, int32_t experts, int32_t block) {
    int64_t capacity = 0;
    EPLB_EXPECT_OK(eplb_dispatch_align_capacity(pairs, experts, block, &capacity));
    return capacity;
}

// A host vector poisoned (so unwritten elements show) and copied to a buffer of the backend.
template <typename T>
std::vector<T> poisoned(size_t count, T poison) {
    return std::vector<T>(std::max<size_t>(count, 1), poison);
}

struct Aligned {
    std::vector<int32_t> counts, offsets, sorted, blocks, positions;
};

Aligned run_align(eplb_backend_t backend, const std::vector<int32_t>& ids, int64_t tokens, int32_t top_k, int32_t first,
                  int32_t experts, int32_t block, int64_t capacity = -1) {
    if (capacity < 0) capacity = capacity_of(tokens * top_k, experts, block);
    Stream stream(backend);
    Buffer<int32_t> d_ids(backend, ids.empty() ? std::vector<int32_t>{0} : ids);
    Buffer<int32_t> counts(backend, poisoned<int32_t>(size_t(experts), kPoison));
    Buffer<int32_t> offsets(backend, poisoned<int32_t>(size_t(experts) + 1, kPoison));
    Buffer<int32_t> sorted(backend, poisoned<int32_t>(size_t(capacity), kPoison));
    Buffer<int32_t> blocks(backend, poisoned<int32_t>(size_t(capacity / block), kPoison));
    Buffer<int32_t> positions(backend, poisoned<int32_t>(ids.size(), kPoison));
    EPLB_EXPECT_OK(eplb_dispatch_align(stream.get(), d_ids.data(), tokens, top_k, first, experts, block, capacity,
                                       counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    Aligned result{counts.read(), offsets.read(), sorted.read(), blocks.read(), positions.read()};
    result.sorted.resize(size_t(capacity));
    result.blocks.resize(size_t(capacity / block));
    result.positions.resize(ids.size());
    return result;
}

// Everything eplb_dispatch_align promises, checked element by element against the definition.
void expect_valid_alignment(const Aligned& a, const std::vector<int32_t>& ids, int32_t first, int32_t experts,
                            int32_t block) {
    const int64_t pairs = int64_t(ids.size());
    auto expert_of = [&](int32_t slot) { return slot >= first && slot < first + experts ? slot - first : -1; };
    std::vector<int32_t> want_counts(size_t(experts), 0);
    for (int32_t slot : ids)
        if (expert_of(slot) >= 0) ++want_counts[size_t(expert_of(slot))];
    EPLB_EXPECT(a.counts == want_counts);
    EPLB_EXPECT_EQ(a.offsets[0], 0);
    for (int32_t e = 0; e < experts; ++e) EPLB_EXPECT_EQ(a.offsets[e + 1] - a.offsets[e], round_up_to(want_counts[e], block));
    const int32_t total = a.offsets[size_t(experts)];
    for (int32_t e = 0; e < experts; ++e) {
        int32_t previous = -1;
        for (int32_t row = a.offsets[e]; row < a.offsets[e + 1]; ++row) {
            const int32_t pair = a.sorted[size_t(row)];
            if (row < a.offsets[e] + want_counts[e]) {
                EPLB_EXPECT(pair > previous);  // ascending (token, k) inside an expert
                EPLB_EXPECT_EQ(expert_of(ids[size_t(pair)]), e);
                EPLB_EXPECT_EQ(a.positions[size_t(pair)], row);
                previous = pair;
            } else {
                EPLB_EXPECT_EQ(pair, kPad);
            }
        }
    }
    for (size_t row = size_t(total); row < a.sorted.size(); ++row) EPLB_EXPECT_EQ(a.sorted[row], kPad);
    for (int64_t pair = 0; pair < pairs; ++pair) {
        const int32_t row = a.positions[size_t(pair)];
        if (expert_of(ids[size_t(pair)]) < 0) {
            EPLB_EXPECT_EQ(row, kPad);
        } else {
            EPLB_EXPECT(row >= 0 && row < total);
            EPLB_EXPECT_EQ(a.sorted[size_t(row)], int32_t(pair));
        }
    }
    for (size_t b = 0; b < a.blocks.size(); ++b) {
        const int64_t row = int64_t(b) * block;
        if (row >= total) {
            EPLB_EXPECT_EQ(a.blocks[b], kPad);
            continue;
        }
        const int32_t e = a.blocks[b];
        EPLB_EXPECT(e >= 0 && e < experts);
        EPLB_EXPECT(a.offsets[size_t(e)] <= row && row < a.offsets[size_t(e) + 1]);
    }
}

struct Buckets {
    std::vector<int32_t> counts, offsets, send, positions;
};

Buckets run_buckets(eplb_backend_t backend, const std::vector<int32_t>& ids, int64_t tokens, int32_t top_k,
                    int32_t num_physical, int32_t ranks) {
    Stream stream(backend);
    Buffer<int32_t> d_ids(backend, ids.empty() ? std::vector<int32_t>{0} : ids);
    Buffer<int32_t> counts(backend, poisoned<int32_t>(size_t(ranks), kPoison));
    Buffer<int32_t> offsets(backend, poisoned<int32_t>(size_t(ranks) + 1, kPoison));
    Buffer<int32_t> send(backend, poisoned<int32_t>(ids.size(), kPoison));
    Buffer<int32_t> positions(backend, poisoned<int32_t>(ids.size(), kPoison));
    EPLB_EXPECT_OK(eplb_dispatch_bucket_by_rank(stream.get(), d_ids.data(), tokens, top_k, num_physical, ranks,
                                                counts.data(), offsets.data(), send.data(), positions.data()));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    Buckets result{counts.read(), offsets.read(), send.read(), positions.read()};
    result.send.resize(ids.size());
    result.positions.resize(ids.size());
    return result;
}

void expect_valid_buckets(const Buckets& b, const std::vector<int32_t>& ids, int32_t num_physical, int32_t ranks) {
    const int32_t per_rank = num_physical / ranks;
    std::vector<int32_t> want(size_t(ranks), 0);
    for (int32_t slot : ids)
        if (slot >= 0) ++want[size_t(slot / per_rank)];
    EPLB_EXPECT(b.counts == want);
    EPLB_EXPECT_EQ(b.offsets[0], 0);
    for (int32_t g = 0; g < ranks; ++g) EPLB_EXPECT_EQ(b.offsets[g + 1] - b.offsets[g], want[g]);
    const int32_t routed = b.offsets[size_t(ranks)];
    for (int32_t g = 0; g < ranks; ++g) {
        for (int32_t row = b.offsets[g]; row < b.offsets[g + 1]; ++row) {
            const int32_t pair = b.send[size_t(row)];
            EPLB_EXPECT(row == b.offsets[g] || pair > b.send[size_t(row) - 1]);
            EPLB_EXPECT_EQ(ids[size_t(pair)] / per_rank, g);
            EPLB_EXPECT_EQ(b.positions[size_t(pair)], row);
        }
    }
    for (size_t row = size_t(routed); row < b.send.size(); ++row) EPLB_EXPECT_EQ(b.send[row], kPad);
    for (size_t pair = 0; pair < ids.size(); ++pair)
        if (ids[pair] < 0) EPLB_EXPECT_EQ(b.positions[pair], kPad);
}

// Permute on a backend: out poisoned, rows [0, num_rows) per row_ids. T is float or uint16_t (bf16).
template <typename T>
std::vector<T> run_permute(eplb_backend_t backend, const std::vector<T>& x, int64_t tokens, int64_t hidden, int32_t top_k,
                           const std::vector<int32_t>& row_ids, int32_t num_rows, T poison) {
    const eplb_dtype_t dtype = sizeof(T) == 2 ? EPLB_DTYPE_BF16 : EPLB_DTYPE_F32;
    const int64_t capacity = int64_t(row_ids.size());
    Stream stream(backend);
    Buffer<T> d_x(backend, x.empty() ? std::vector<T>{T{}} : x);
    Buffer<int32_t> d_ids(backend, row_ids.empty() ? std::vector<int32_t>{0} : row_ids);
    Buffer<int32_t> d_rows(backend, std::vector<int32_t>{num_rows});
    Buffer<T> out(backend, poisoned<T>(size_t(capacity * hidden), poison));
    EPLB_EXPECT_OK(eplb_dispatch_permute(stream.get(), dtype, d_x.data(), tokens, hidden, top_k, d_ids.data(),
                                         d_rows.data(), capacity, out.data()));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    auto result = out.read();
    result.resize(size_t(capacity * hidden));
    return result;
}

template <typename TIn, typename TOut>
std::vector<TOut> run_combine(eplb_backend_t backend, const std::vector<TIn>& y, int64_t y_rows, int64_t hidden,
                              const std::vector<int32_t>& positions, const std::vector<float>& weights, int64_t tokens,
                              int32_t top_k, TOut poison) {
    const eplb_dtype_t in = sizeof(TIn) == 2 ? EPLB_DTYPE_BF16 : EPLB_DTYPE_F32;
    const eplb_dtype_t out_dtype = sizeof(TOut) == 2 ? EPLB_DTYPE_BF16 : EPLB_DTYPE_F32;
    Stream stream(backend);
    Buffer<TIn> d_y(backend, y.empty() ? std::vector<TIn>{TIn{}} : y);
    Buffer<int32_t> d_positions(backend, positions.empty() ? std::vector<int32_t>{0} : positions);
    Buffer<float> d_weights(backend, weights.empty() ? std::vector<float>{0.0f} : weights);
    Buffer<TOut> out(backend, poisoned<TOut>(size_t(tokens * hidden), poison));
    EPLB_EXPECT_OK(eplb_dispatch_combine(stream.get(), in, d_y.data(), y_rows, hidden, d_positions.data(),
                                         weights.empty() ? nullptr : d_weights.data(), tokens, top_k, out_dtype,
                                         out.data()));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    auto result = out.read();
    result.resize(size_t(tokens * hidden));
    return result;
}

// The combine sum written out: ascending k, product and sum rounded separately.
float weighted_sum(const std::vector<std::pair<float, float>>& terms) {
    float acc = 0.0f;
    for (const auto& [w, v] : terms) {
        volatile float product = w * v;  // volatile: no contraction into an FMA here either
        acc = acc + product;
    }
    return acc;
}

std::vector<int32_t> random_slots(size_t count, int32_t lo, int32_t hi) {
    std::vector<int32_t> ids(count);
    for (auto& id : ids) id = lo + int32_t(rng()() % uint64_t(hi - lo + 1));
    return ids;
}

std::vector<float> random_floats(size_t count) {
    std::uniform_real_distribution<float> value(-4.0f, 4.0f);
    std::vector<float> v(count);
    for (auto& f : v) f = value(rng());
    return v;
}

std::vector<uint16_t> random_bf16(size_t count) {
    std::vector<uint16_t> v(count);
    for (auto& b : v) b = to_bf16(std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng()));
    return v;
}

// Routing weights [tokens][top_k] in [0.05, 1], each row normalised to sum 1.
std::vector<float> random_weights(int64_t tokens, int32_t top_k) {
    std::uniform_real_distribution<float> value(0.05f, 1.0f);
    std::vector<float> w(size_t(tokens * top_k));
    for (int64_t t = 0; t < tokens; ++t) {
        float sum = 0.0f;
        for (int32_t k = 0; k < top_k; ++k) sum += (w[size_t(t * top_k + k)] = value(rng()));
        for (int32_t k = 0; k < top_k; ++k) w[size_t(t * top_k + k)] /= sum;
    }
    return w;
}

// Top-8 slot ids drawn from a real load layer over 256 experts (slot = expert, R = 256).
std::vector<int32_t> real_ids(const std::string& file, int layer, int64_t tokens, int32_t top_k = 8) {
    static std::map<std::string, std::vector<std::vector<double>>> cache;
    if (!cache.count(file)) cache[file] = read_load_file(file);
    return sample_topk(cache[file][size_t(layer)], tokens, top_k);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Align: goldens

EPLB_TEST(dispatch_align_capacity) {
    EPLB_EXPECT_EQ(capacity_of(100, 8, 16), 100 + 8 * 15);
    EPLB_EXPECT_EQ(capacity_of(3, 8, 16), 3 + 3 * 15);  // at most 3 experts can have a pair
    EPLB_EXPECT_EQ(capacity_of(0, 8, 16), 0);
    EPLB_EXPECT_EQ(capacity_of(7, 4, 1), 7);
    int64_t capacity = 0;
    EPLB_EXPECT_STATUS(eplb_dispatch_align_capacity(-1, 4, 1, &capacity), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_dispatch_align_capacity(8, 0, 1, &capacity), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_dispatch_align_capacity(8, 4, 0, &capacity), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_dispatch_align_capacity(8, 4, 1, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
}

EPLB_TEST(dispatch_align_golden) {
    // Slots 1..4 are local (experts 0..3); slot 5 is another rank's, -1 is not routed.
    // pairs: 0:3->e2 1:1->e0 2:1->e0 3:-1 4:5 5:3->e2 6:1->e0 7:2->e1
    const std::vector<int32_t> ids = {3, 1, 1, -1, 5, 3, 1, 2};
    const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 4, 2, 1, 4, 4);
    EPLB_EXPECT(a.counts == (std::vector<int32_t>{3, 1, 2, 0}));
    EPLB_EXPECT(a.offsets == (std::vector<int32_t>{0, 4, 8, 12, 12}));
    // capacity 8 + 4 * 3 = 20 rows: e0 = pairs 1,2,6 + pad; e1 = pair 7 + 3 pad; e2 = pairs 0,5 + 2 pad; tail.
    const std::vector<int32_t> sorted = {1, 2, 6, kPad, 7, kPad, kPad, kPad, 0, 5, kPad, kPad,
                                         kPad, kPad, kPad, kPad, kPad, kPad, kPad, kPad};
    EPLB_EXPECT(a.sorted == sorted);
    EPLB_EXPECT(a.blocks == (std::vector<int32_t>{0, 1, 2, kPad, kPad}));
    EPLB_EXPECT(a.positions == (std::vector<int32_t>{8, 0, 1, kPad, kPad, 9, 2, 4}));
}

EPLB_TEST(dispatch_align_single_token) {
    // T = 1, K = 8; local slots 2..5. k: 0:4->e2 1:0 2:9 3:3->e1 4:2->e0 5:-1 6:5->e3 7:6
    const std::vector<int32_t> ids = {4, 0, 9, 3, 2, -1, 5, 6};
    const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 1, 8, 2, 4, 16);
    EPLB_EXPECT(a.counts == (std::vector<int32_t>{1, 1, 1, 1}));
    EPLB_EXPECT(a.offsets == (std::vector<int32_t>{0, 16, 32, 48, 64}));
    EPLB_EXPECT_EQ(a.sorted.size(), size_t(8 + 4 * 15));
    for (size_t row = 0; row < a.sorted.size(); ++row) {
        const int32_t want = row == 0 ? 4 : row == 16 ? 3 : row == 32 ? 0 : row == 48 ? 6 : kPad;
        EPLB_EXPECT_EQ(a.sorted[row], want);
    }
    EPLB_EXPECT(a.blocks == (std::vector<int32_t>{0, 1, 2, 3}));
    EPLB_EXPECT(a.positions == (std::vector<int32_t>{32, kPad, kPad, 16, 0, kPad, 48, kPad}));
}

EPLB_TEST(dispatch_align_all_tokens_on_one_expert) {
    // 37 tokens, k = 0 always slot 5, k = 1 never routed; 8 local experts from slot 0.
    std::vector<int32_t> ids;
    for (int t = 0; t < 37; ++t) ids.insert(ids.end(), {5, -1});
    for (int32_t block : {1, 16, 64, 128}) {
        const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 37, 2, 0, 8, block);
        for (int32_t e = 0; e < 8; ++e) EPLB_EXPECT_EQ(a.counts[e], e == 5 ? 37 : 0);
        const int32_t padded = round_up_to(37, block);  // 37, 48, 64, 128
        for (int32_t e = 0; e <= 8; ++e) EPLB_EXPECT_EQ(a.offsets[e], e <= 5 ? 0 : padded);
        for (int t = 0; t < 37; ++t) {
            EPLB_EXPECT_EQ(a.sorted[t], 2 * t);
            EPLB_EXPECT_EQ(a.positions[2 * t], t);
            EPLB_EXPECT_EQ(a.positions[2 * t + 1], kPad);
        }
        for (size_t row = 37; row < a.sorted.size(); ++row) EPLB_EXPECT_EQ(a.sorted[row], kPad);
        // capacity = 74 + 8 * (block - 1); blocks covering the 37 rows belong to expert 5.
        EPLB_EXPECT_EQ(a.blocks.size(), size_t((74 + 8 * (block - 1)) / block));
        for (size_t b = 0; b < a.blocks.size(); ++b)
            EPLB_EXPECT_EQ(a.blocks[b], int64_t(b) * block < 37 ? 5 : kPad);
    }
}

EPLB_TEST(dispatch_align_no_tokens_on_this_rank) {
    // Every slot belongs to another rank (this rank holds slots 32..63), plus unrouted rows.
    std::vector<int32_t> ids = random_slots(50 * 8, 0, 31);
    for (int k = 0; k < 8; ++k) ids[size_t(3 * 8 + k)] = -1;
    for (int32_t block : {1, 16, 64, 128}) {
        const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 50, 8, 32, 32, block);
        EPLB_EXPECT(std::all_of(a.counts.begin(), a.counts.end(), [](int32_t c) { return c == 0; }));
        EPLB_EXPECT(std::all_of(a.offsets.begin(), a.offsets.end(), [](int32_t c) { return c == 0; }));
        EPLB_EXPECT(std::all_of(a.sorted.begin(), a.sorted.end(), [](int32_t c) { return c == kPad; }));
        EPLB_EXPECT(std::all_of(a.blocks.begin(), a.blocks.end(), [](int32_t c) { return c == kPad; }));
        EPLB_EXPECT(std::all_of(a.positions.begin(), a.positions.end(), [](int32_t c) { return c == kPad; }));
    }
}

EPLB_TEST(dispatch_align_unrouted_rows_and_block_sizes) {
    // Rows 0 and 2 are fully -1 (padding tokens); row 1 routes to experts 1 and 0, row 3 twice to 1.
    const std::vector<int32_t> ids = {-1, -1, -1, 11, 10, -1, -1, -1, -1, 11, 11, -1};
    for (int32_t block : {1, 16, 64, 128}) {
        const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 4, 3, 10, 2, block);
        EPLB_EXPECT(a.counts == (std::vector<int32_t>{1, 3}));
        const int32_t e0 = round_up_to(1, block), e1 = round_up_to(3, block);
        EPLB_EXPECT(a.offsets == (std::vector<int32_t>{0, e0, e0 + e1}));
        EPLB_EXPECT_EQ(a.sorted[0], 4);
        EPLB_EXPECT_EQ(a.sorted[size_t(e0)], 3);
        EPLB_EXPECT_EQ(a.sorted[size_t(e0) + 1], 9);
        EPLB_EXPECT_EQ(a.sorted[size_t(e0) + 2], 10);
        const std::vector<int32_t> positions = {kPad, kPad, kPad, e0, 0, kPad, kPad, kPad, kPad, e0 + 1, e0 + 2, kPad};
        EPLB_EXPECT(a.positions == positions);
        expect_valid_alignment(a, ids, 10, 2, block);
    }
}

EPLB_TEST(dispatch_align_empty_input) {
    const Aligned a = run_align(EPLB_BACKEND_CPU, {}, 0, 8, 0, 4, 16);
    EPLB_EXPECT(a.counts == (std::vector<int32_t>{0, 0, 0, 0}));
    EPLB_EXPECT(a.offsets == (std::vector<int32_t>{0, 0, 0, 0, 0}));
    EPLB_EXPECT(a.sorted.empty());
}

EPLB_TEST(dispatch_align_larger_capacity_is_padded) {
    const std::vector<int32_t> ids = {0, 1, 1, 0};
    const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 2, 2, 0, 2, 2, 40);
    EPLB_EXPECT_EQ(a.sorted.size(), size_t(40));
    EPLB_EXPECT_EQ(a.blocks.size(), size_t(20));
    expect_valid_alignment(a, ids, 0, 2, 2);
}

// ------------------------------------------------------------------------------------------------
// Align: properties on random and real-load-shaped inputs

EPLB_TEST(dispatch_align_random_properties) {
    for (int iteration = 0; iteration < 60; ++iteration) {
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = iteration == 0 ? 1 : int64_t(rng()() % 700);
        const int32_t experts = 1 + int32_t(rng()() % 300);
        const int32_t first = int32_t(rng()() % 64);
        const int32_t blocks[] = {1, 2, 7, 16, 64, 128};
        const int32_t block = blocks[rng()() % 6];
        // Ids cover -1, below, inside and above the local range.
        const auto ids = random_slots(size_t(tokens * top_k), -1, first + experts + 20);
        const Aligned a = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, first, experts, block);
        expect_valid_alignment(a, ids, first, experts, block);
    }
}

EPLB_TEST(dispatch_align_real_load_properties) {
    // 256 experts over 8 simulated ranks of 32 slots; every rank's layout is valid and together the
    // ranks hold every routed pair exactly once.
    for (const std::string file : {"decode_in1000out1000", "prefill_in4096"}) {
        for (int layer : {3, 33, 60}) {
            const auto ids = real_ids(file, layer, 2048);
            int64_t held = 0;
            for (int32_t rank = 0; rank < 8; ++rank) {
                const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 2048, 8, rank * 32, 32, 64);
                expect_valid_alignment(a, ids, rank * 32, 32, 64);
                for (int32_t c : a.counts) held += c;
            }
            EPLB_EXPECT_EQ(held, int64_t(ids.size()));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// EP bucketing

EPLB_TEST(dispatch_bucket_golden) {
    // R = 8 over 4 ranks (2 slots each). pairs: 0:5->r2 1:0->r0 2:-1 3:7->r3 4:4->r2 5:1->r0
    const std::vector<int32_t> ids = {5, 0, -1, 7, 4, 1};
    const Buckets b = run_buckets(EPLB_BACKEND_CPU, ids, 3, 2, 8, 4);
    EPLB_EXPECT(b.counts == (std::vector<int32_t>{2, 0, 2, 1}));
    EPLB_EXPECT(b.offsets == (std::vector<int32_t>{0, 2, 2, 4, 5}));
    EPLB_EXPECT(b.send == (std::vector<int32_t>{1, 5, 0, 4, 3, kPad}));
    EPLB_EXPECT(b.positions == (std::vector<int32_t>{2, 0, kPad, 4, 3, 1}));
}

EPLB_TEST(dispatch_bucket_random_and_real_properties) {
    for (int iteration = 0; iteration < 40; ++iteration) {
        const int32_t ranks = 1 + int32_t(rng()() % 16);
        const int32_t physical = ranks * (1 + int32_t(rng()() % 40));
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = int64_t(rng()() % 500);
        const auto ids = random_slots(size_t(tokens * top_k), -1, physical - 1);
        expect_valid_buckets(run_buckets(EPLB_BACKEND_CPU, ids, tokens, top_k, physical, ranks), ids, physical, ranks);
    }
    const auto ids = real_ids("prefill_in1024", 20, 4096);
    expect_valid_buckets(run_buckets(EPLB_BACKEND_CPU, ids, 4096, 8, 256, 8), ids, 256, 8);
}

// ------------------------------------------------------------------------------------------------
// Permute and combine: goldens

EPLB_TEST(dispatch_permute_golden) {
    // x rows are [10t, 10t + 1, 10t + 2]; top_k 2, so pair p is token p / 2.
    std::vector<float> x;
    for (int t = 0; t < 3; ++t) x.insert(x.end(), {10.0f * t, 10.0f * t + 1, 10.0f * t + 2});
    const std::vector<int32_t> rows = {5, 0, kPad, 3, kPad, kPad};  // 4 live rows, 6 capacity
    const float p = -7.0f;
    const auto out = run_permute<float>(EPLB_BACKEND_CPU, x, 3, 3, 2, rows, 4, p);
    const std::vector<float> want = {20, 21, 22, 0, 1, 2, p, p, p, 10, 11, 12, p, p, p, p, p, p};
    EPLB_EXPECT(out == want);
    // bf16 rows move as raw bits.
    const std::vector<uint16_t> xb = {0x3F80, 0x4000, 0x4040, 0xC080, 0x7F80, 0x0001};  // 1, 2, 3 | -4, inf, denormal
    const auto outb = run_permute<uint16_t>(EPLB_BACKEND_CPU, xb, 2, 3, 1, {1, 0, 1}, 2, kPoison16);
    EPLB_EXPECT(outb == (std::vector<uint16_t>{0xC080, 0x7F80, 0x0001, 0x3F80, 0x4000, 0x4040, kPoison16, kPoison16, kPoison16}));
}

EPLB_TEST(dispatch_combine_golden) {
    // Two tokens, top_k 3, hidden 2. y rows: 0:[1, 2] 1:[4, 8] 2:[0.5, -1] 3:[100, 100].
    const std::vector<float> y = {1, 2, 4, 8, 0.5f, -1, 100, 100};
    const std::vector<int32_t> positions = {1, kPad, 0, 2, 2, kPad};
    const std::vector<float> weights = {0.5f, 9.0f, 0.25f, 1.0f, 2.0f, 9.0f};
    const auto out = run_combine<float, float>(EPLB_BACKEND_CPU, y, 4, 2, positions, weights, 2, 3, -7.0f);
    // token 0: 0.5 * [4, 8] + 0.25 * [1, 2] = [2.25, 4.5]; token 1: 1 * [0.5, -1] + 2 * [0.5, -1] = [1.5, -3]
    EPLB_EXPECT(out == (std::vector<float>{2.25f, 4.5f, 1.5f, -3.0f}));
    // No weights: a plain sum.
    const auto plain = run_combine<float, float>(EPLB_BACKEND_CPU, y, 4, 2, positions, {}, 2, 3, -7.0f);
    EPLB_EXPECT(plain == (std::vector<float>{5.0f, 10.0f, 1.0f, -2.0f}));
    // A token with no local pair gets zeros.
    const auto none = run_combine<float, float>(EPLB_BACKEND_CPU, y, 4, 2, {kPad, kPad, kPad}, {}, 1, 3, -7.0f);
    EPLB_EXPECT(none == (std::vector<float>{0.0f, 0.0f}));
}

EPLB_TEST(dispatch_combine_bf16_rounds_once_to_nearest_even) {
    // bf16 has 8 significant bits: next to 1.0 the spacing is 2^-7.
    // 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7 -> 1.0 (0x3F80);
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even) -> 0x3F82;
    // 1 + 2^-8 + 2^-12 is above the halfway point -> 1 + 2^-7 (0x3F81).
    const float h = std::ldexp(1.0f, -8);
    const std::vector<float> y = {1.0f, 1.0f, 1.0f, h, 3 * h, h + std::ldexp(1.0f, -12)};  // rows [3][2]... as [6][1]
    const std::vector<int32_t> positions = {0, 3, 1, 4, 2, 5};                           // token t: rows t and 3 + t
    const auto out = run_combine<float, uint16_t>(EPLB_BACKEND_CPU, y, 6, 1, positions, {}, 3, 2, kPoison16);
    EPLB_EXPECT(out == (std::vector<uint16_t>{0x3F80, 0x3F82, 0x3F81}));
    // The sum is rounded once: 3 terms of 2^-9 on top of 1 stay in fp32 until the end (1 + 3 * 2^-9
    // rounds up to 1 + 2^-7), where rounding each partial sum to bf16 would keep 1.0.
    const std::vector<uint16_t> yb = {0x3F80, 0x3B00, 0x3B00, 0x3B00};  // 1.0, 2^-9, 2^-9, 2^-9
    const auto once = run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CPU, yb, 4, 1, {0, 1, 2, 3}, {}, 1, 4, kPoison16);
    EPLB_EXPECT_EQ(once[0], uint16_t(0x3F81));
    // fp32 output keeps the exact sum.
    const auto wide = run_combine<uint16_t, float>(EPLB_BACKEND_CPU, yb, 4, 1, {0, 1, 2, 3}, {}, 1, 4, -7.0f);
    EPLB_EXPECT_EQ(wide[0], 1.0f + 3 * std::ldexp(1.0f, -9));
}

EPLB_TEST(dispatch_combine_matches_the_written_out_sum) {
    // Random fp32 and bf16 inputs against the sum of docs/design.md §6 written out in this file.
    for (int iteration = 0; iteration < 20; ++iteration) {
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = 1 + int64_t(rng()() % 60);
        const int64_t hidden = 1 + int64_t(rng()() % 40);
        const int64_t y_rows = 1 + int64_t(rng()() % 80);
        const auto positions = random_slots(size_t(tokens * top_k), -1, int32_t(y_rows) - 1);
        const auto weights = random_weights(tokens, top_k);
        const auto y = random_floats(size_t(y_rows * hidden));
        const auto yb = random_bf16(size_t(y_rows * hidden));
        const auto out = run_combine<float, float>(EPLB_BACKEND_CPU, y, y_rows, hidden, positions, weights, tokens, top_k, -7.0f);
        const auto outb = run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CPU, yb, y_rows, hidden, positions, weights, tokens,
                                                          top_k, kPoison16);
        for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t h = 0; h < hidden; ++h) {
                std::vector<std::pair<float, float>> terms, terms_b;
                for (int32_t k = 0; k < top_k; ++k) {
                    const int32_t row = positions[size_t(t * top_k + k)];
                    if (row < 0) continue;
                    terms.emplace_back(weights[size_t(t * top_k + k)], y[size_t(row * hidden + h)]);
                    terms_b.emplace_back(weights[size_t(t * top_k + k)], bf16_value(yb[size_t(row * hidden + h)]));
                }
                EPLB_EXPECT_EQ(out[size_t(t * hidden + h)], weighted_sum(terms));
                EPLB_EXPECT_EQ(outb[size_t(t * hidden + h)], to_bf16(weighted_sum(terms_b)));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Round trips

// permute -> identity expert -> combine with weights summing to 1 gives X back.
EPLB_TEST(dispatch_round_trip_gives_x_back) {
    for (int iteration = 0; iteration < 12; ++iteration) {
        const int32_t top_k = 1 + int32_t(rng()() % 8);
        const int64_t tokens = 1 + int64_t(rng()() % 200);
        const int64_t hidden = 8 * (1 + int64_t(rng()() % 16)) + (iteration % 2);  // odd sizes too
        const int32_t experts = 1 + int32_t(rng()() % 64);
        const int32_t block = 1 << (rng()() % 7);
        // Every pair routed to a local expert.
        std::vector<int32_t> ids(size_t(tokens * top_k));
        for (int64_t t = 0; t < tokens; ++t)
            for (int32_t k = 0; k < top_k; ++k) ids[size_t(t * top_k + k)] = int32_t((t + k * 7) % std::max(experts, top_k));
        const int32_t local = std::max(experts, top_k);
        const Aligned a = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, 0, local, block);
        const int32_t rows = a.offsets[size_t(local)];
        const auto weights = random_weights(tokens, top_k);

        const auto x = random_floats(size_t(tokens * hidden));
        const auto y = run_permute<float>(EPLB_BACKEND_CPU, x, tokens, hidden, top_k, a.sorted, rows, 0.0f);
        const auto back = run_combine<float, float>(EPLB_BACKEND_CPU, y, int64_t(a.sorted.size()), hidden, a.positions,
                                                    weights, tokens, top_k, -7.0f);
        for (size_t i = 0; i < x.size(); ++i)
            EPLB_EXPECT(std::fabs(back[i] - x[i]) <= 8 * top_k * std::numeric_limits<float>::epsilon() * std::fabs(x[i]));
        // bf16: the fp32 sum lies within a few fp32 ulps of x, far inside half a bf16 ulp: exact.
        const auto xb = random_bf16(size_t(tokens * hidden));
        const auto yb = run_permute<uint16_t>(EPLB_BACKEND_CPU, xb, tokens, hidden, top_k, a.sorted, rows, 0);
        const auto backb = run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CPU, yb, int64_t(a.sorted.size()), hidden,
                                                           a.positions, weights, tokens, top_k, kPoison16);
        EPLB_EXPECT(backb == xb);
    }
}

EPLB_TEST(dispatch_round_trip_is_exact_with_one_term_per_token) {
    // EP-like: one local pair per token with weight 1 (the others on other ranks): bit-exact in fp32.
    const int64_t tokens = 300, hidden = 56;
    const int32_t top_k = 4;
    std::vector<int32_t> ids(size_t(tokens * top_k));
    std::vector<float> weights(ids.size());
    for (int64_t t = 0; t < tokens; ++t) {
        const int32_t chosen = int32_t(rng()() % top_k);
        for (int32_t k = 0; k < top_k; ++k) {
            ids[size_t(t * top_k + k)] = k == chosen ? int32_t(rng()() % 16) : 16 + int32_t(rng()() % 48);
            weights[size_t(t * top_k + k)] = k == chosen ? 1.0f : 0.3f;
        }
    }
    const Aligned a = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, 0, 16, 32);
    const auto x = random_floats(size_t(tokens * hidden));
    const auto y = run_permute<float>(EPLB_BACKEND_CPU, x, tokens, hidden, top_k, a.sorted, a.offsets[16], 0.0f);
    const auto back = run_combine<float, float>(EPLB_BACKEND_CPU, y, int64_t(a.sorted.size()), hidden, a.positions,
                                                weights, tokens, top_k, -7.0f);
    EPLB_EXPECT(back == x);
}

// Expert parallelism over simulated ranks gives the single-rank result bit for bit: bucket -> send
// rows -> (each rank) align, permute, expert, combine with top_k 1 -> return -> combine with weights.
EPLB_TEST(dispatch_ep_round_trip_equals_single_rank) {
    const int32_t ranks = 4, physical = 32, top_k = 6;
    const int64_t tokens = 257, hidden = 24;
    const int32_t per_rank = physical / ranks;
    auto ids = random_slots(size_t(tokens * top_k), -1, physical - 1);
    const auto weights = random_weights(tokens, top_k);
    const auto x = random_floats(size_t(tokens * hidden));
    // The expert of slot s scales by 2^(s % 5 - 2): exact, so both paths see the same bits.
    auto expert = [&](const std::vector<float>& rows, const std::vector<int32_t>& row_slot) {
        std::vector<float> out(rows.size());
        for (size_t r = 0; r < row_slot.size(); ++r)
            for (int64_t h = 0; h < hidden; ++h)
                out[r * hidden + h] = row_slot[r] < 0 ? 0.0f : std::ldexp(rows[r * hidden + h], row_slot[r] % 5 - 2);
        return out;
    };
    auto slots_of_rows = [&](const Aligned& a, const std::vector<int32_t>& slots) {
        std::vector<int32_t> row_slot(a.sorted.size(), -1);
        for (size_t r = 0; r < a.sorted.size(); ++r)
            if (a.sorted[r] >= 0) row_slot[r] = slots[size_t(a.sorted[r])];
        return row_slot;
    };

    // Single rank holding every slot.
    const Aligned whole = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, 0, physical, 4);
    const auto permuted = run_permute<float>(EPLB_BACKEND_CPU, x, tokens, hidden, top_k, whole.sorted, whole.offsets[physical], 0.0f);
    const auto expected = run_combine<float, float>(EPLB_BACKEND_CPU, expert(permuted, slots_of_rows(whole, ids)),
                                                    int64_t(whole.sorted.size()), hidden, whole.positions, weights, tokens,
                                                    top_k, -7.0f);

    // EP: the sender buckets and gathers one row per routed pair.
    const Buckets b = run_buckets(EPLB_BACKEND_CPU, ids, tokens, top_k, physical, ranks);
    const int32_t routed = b.offsets[size_t(ranks)];
    const auto send = run_permute<float>(EPLB_BACKEND_CPU, x, tokens, hidden, top_k, b.send, routed, 0.0f);
    std::vector<float> returned(size_t(tokens * top_k * hidden), 0.0f);
    for (int32_t g = 0; g < ranks; ++g) {
        const int32_t begin = b.offsets[g], count = b.counts[g];
        std::vector<int32_t> recv_slots(static_cast<size_t>(count));
        for (int32_t i = 0; i < count; ++i) recv_slots[size_t(i)] = ids[size_t(b.send[size_t(begin + i)])];
        std::vector<float> recv(send.begin() + int64_t(begin) * hidden, send.begin() + int64_t(begin + count) * hidden);
        const Aligned a = run_align(EPLB_BACKEND_CPU, recv_slots, count, 1, g * per_rank, per_rank, 4);
        const auto rows = run_permute<float>(EPLB_BACKEND_CPU, recv, count, hidden, 1, a.sorted, a.offsets[per_rank], 0.0f);
        const auto expert_out = expert(rows, slots_of_rows(a, recv_slots));
        const auto partial = run_combine<float, float>(EPLB_BACKEND_CPU, expert_out, int64_t(a.sorted.size()), hidden,
                                                       a.positions, {}, count, 1, -7.0f);
        std::copy(partial.begin(), partial.end(), returned.begin() + int64_t(begin) * hidden);
    }
    const auto got = run_combine<float, float>(EPLB_BACKEND_CPU, returned, tokens * top_k, hidden, b.positions, weights,
                                               tokens, top_k, -7.0f);
    EPLB_EXPECT(got == expected);
}

// ------------------------------------------------------------------------------------------------
// Bad input: a status naming the argument, nothing written

EPLB_TEST(dispatch_bad_input_leaves_outputs_untouched) {
    Stream stream(EPLB_BACKEND_CPU);
    std::vector<int32_t> ids = {0, 1, 2, 3, 1, 0};  // 3 tokens, top_k 2
    std::vector<int32_t> counts(4, 7), offsets(5, 7), sorted(64, 7), blocks(64, 7), positions(6, 7);
    auto untouched = [&] {
        for (const auto* v : {&counts, &offsets, &sorted, &blocks, &positions})
            EPLB_EXPECT(std::all_of(v->begin(), v->end(), [](int32_t e) { return e == 7; }));
    };
    auto message_has = [](const char* text) { EPLB_EXPECT(std::string(eplb_last_error_message()).find(text) != std::string::npos); };
    auto align = [&](eplb_stream_t* s, const int32_t* in, int64_t tokens, int32_t top_k, int32_t first, int32_t experts,
                     int32_t block, int64_t capacity, int32_t* c, int32_t* o, int32_t* so, int32_t* bl, int32_t* p) {
        return eplb_dispatch_align(s, in, tokens, top_k, first, experts, block, capacity, c, o, so, bl, p);
    };
    const int64_t cap = capacity_of(6, 4, 4);  // 18
    EPLB_EXPECT_OK(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(),
                         blocks.data(), positions.data()));
    std::fill(counts.begin(), counts.end(), 7), std::fill(offsets.begin(), offsets.end(), 7);
    std::fill(sorted.begin(), sorted.end(), 7), std::fill(blocks.begin(), blocks.end(), 7);
    std::fill(positions.begin(), positions.end(), 7);

    EPLB_EXPECT_STATUS(align(nullptr, ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(align(stream.get(), nullptr, 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("physical_ids");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), -1, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("num_tokens");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 0, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("top_k");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, -1, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("first_slot");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 0, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("num_local_experts");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, EPLB_DISPATCH_MAX_BUCKETS + 1, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 0, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("block_size");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap - 1, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("capacity must be in [18");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, nullptr, offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), nullptr, sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), nullptr, blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), nullptr, positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("block_experts");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    // Outputs that overlap each other or the input.
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), counts.data() + 2, sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("overlap");
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), 3, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), ids.data()), EPLB_STATUS_INVALID_ARGUMENT);
    // num_tokens * top_k beyond int32.
    EPLB_EXPECT_STATUS(align(stream.get(), ids.data(), INT32_MAX, 2, 0, 4, 4, cap, counts.data(), offsets.data(), sorted.data(), blocks.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("INT32_MAX");
    untouched();

    // Bucketing: a slot outside [-1, R) is named; R not a multiple of the rank count.
    std::vector<int32_t> bad_ids = {0, 1, 9, 3, -2, 0};
    EPLB_EXPECT_STATUS(eplb_dispatch_bucket_by_rank(stream.get(), bad_ids.data(), 3, 2, 8, 4, counts.data(), offsets.data(), sorted.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("physical_ids[1][0] = 9");
    bad_ids[2] = 1;
    EPLB_EXPECT_STATUS(eplb_dispatch_bucket_by_rank(stream.get(), bad_ids.data(), 3, 2, 8, 4, counts.data(), offsets.data(), sorted.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("physical_ids[2][0] = -2");
    EPLB_EXPECT_STATUS(eplb_dispatch_bucket_by_rank(stream.get(), ids.data(), 3, 2, 9, 4, counts.data(), offsets.data(), sorted.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("multiple of num_ranks");
    EPLB_EXPECT_STATUS(eplb_dispatch_bucket_by_rank(stream.get(), ids.data(), 3, 2, 8, 0, counts.data(), offsets.data(), sorted.data(), positions.data()), EPLB_STATUS_INVALID_ARGUMENT);
    untouched();

    // Permute: bad dtype, *num_rows beyond capacity, a row id beyond the pairs, misaligned and overlapping rows.
    std::vector<float> x(3 * 4, 1.0f), out(8 * 4, 7.0f);
    std::vector<int32_t> rows = {0, 5, kPad, 1, 2, 3, 4, 5};
    int32_t num_rows = 8;
    auto out_untouched = [&] { EPLB_EXPECT(std::all_of(out.begin(), out.end(), [](float v) { return v == 7.0f; })); };
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), eplb_dtype_t(5), x.data(), 3, 4, 2, rows.data(), &num_rows, 8, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("dtype");
    num_rows = 9;
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, x.data(), 3, 4, 2, rows.data(), &num_rows, 8, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("*num_rows");
    num_rows = 8;
    rows[6] = 6;  // 3 tokens * top_k 2 = pairs 0..5
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, x.data(), 3, 4, 2, rows.data(), &num_rows, 8, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("row_pair_ids[6] = 6");
    rows[6] = 4;
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, x.data(), 3, 4, 2, rows.data(), &num_rows, 8, reinterpret_cast<char*>(out.data()) + 1), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("aligned");
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, out.data() + 4, 3, 4, 2, rows.data(), &num_rows, 8, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("overlap");
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, x.data(), 3, 0, 2, rows.data(), &num_rows, 8, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("hidden");
    EPLB_EXPECT_STATUS(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, x.data(), 3, 4, 2, rows.data(), nullptr, 8, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    out_untouched();

    // Combine: a position beyond y_rows, a bad output dtype, weights overlapping the output.
    std::vector<float> y(5 * 4, 1.0f), weights(6, 0.5f);
    std::vector<int32_t> pos = {0, 4, kPad, 1, 2, 3};
    std::fill(out.begin(), out.end(), 7.0f);
    EPLB_EXPECT_OK(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, y.data(), 5, 4, pos.data(), weights.data(), 3, 2, EPLB_DTYPE_F32, x.data()));
    pos[1] = 5;
    EPLB_EXPECT_STATUS(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, y.data(), 5, 4, pos.data(), weights.data(), 3, 2, EPLB_DTYPE_F32, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("pair_positions[0][1] = 5");
    pos[1] = -3;
    EPLB_EXPECT_STATUS(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, y.data(), 5, 4, pos.data(), weights.data(), 3, 2, EPLB_DTYPE_F32, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    pos[1] = 4;
    EPLB_EXPECT_STATUS(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, y.data(), 5, 4, pos.data(), weights.data(), 3, 2, eplb_dtype_t(2), out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("out_dtype");
    EPLB_EXPECT_STATUS(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, y.data(), 5, 4, pos.data(), out.data() + 2, 3, 2, EPLB_DTYPE_F32, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("overlap");
    EPLB_EXPECT_STATUS(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, y.data(), 5, 4, nullptr, weights.data(), 3, 2, EPLB_DTYPE_F32, out.data()), EPLB_STATUS_INVALID_ARGUMENT);
    message_has("pair_positions");
    out_untouched();
}

// ------------------------------------------------------------------------------------------------
// CUDA == CPU bit for bit (poisoned outputs on both sides)

EPLB_TEST(dispatch_cuda_align_matches_cpu) {
    require_cuda();
    for (int iteration = 0; iteration < 40; ++iteration) {
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = iteration == 0 ? 1 : iteration == 1 ? 0 : int64_t(rng()() % 20000);
        const int32_t experts = iteration == 2 ? EPLB_DISPATCH_MAX_BUCKETS : 1 + int32_t(rng()() % 600);
        const int32_t first = int32_t(rng()() % 64);
        const int32_t block = int32_t(1) << (rng()() % 8);
        const auto ids = random_slots(size_t(tokens * top_k), -1, first + experts + 40);
        const Aligned cpu = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, first, experts, block);
        const Aligned gpu = run_align(EPLB_BACKEND_CUDA, ids, tokens, top_k, first, experts, block);
        EPLB_EXPECT(gpu.counts == cpu.counts);
        EPLB_EXPECT(gpu.offsets == cpu.offsets);
        EPLB_EXPECT(gpu.sorted == cpu.sorted);
        EPLB_EXPECT(gpu.blocks == cpu.blocks);
        EPLB_EXPECT(gpu.positions == cpu.positions);
    }
    // Real loads: DeepSeek-V3 shapes, 16384 tokens, one rank of 8 and a single rank of all 256.
    for (const std::string file : {"decode_in1000out1000", "prefill_in4096"}) {
        const auto ids = real_ids(file, 40, 16384);
        for (auto [first, experts] : {std::pair{0, 256}, std::pair{96, 32}}) {
            for (int32_t block : {1, 64, 128}) {
                const Aligned cpu = run_align(EPLB_BACKEND_CPU, ids, 16384, 8, first, experts, block);
                const Aligned gpu = run_align(EPLB_BACKEND_CUDA, ids, 16384, 8, first, experts, block);
                EPLB_EXPECT(gpu.sorted == cpu.sorted && gpu.positions == cpu.positions && gpu.blocks == cpu.blocks &&
                            gpu.offsets == cpu.offsets && gpu.counts == cpu.counts);
            }
        }
    }
}

EPLB_TEST(dispatch_cuda_align_one_and_several_blocks_match_cpu) {
    require_cuda();
    // EPLB_ALIGN_SPLIT_PAIRS moves the switch to several blocks: 0 puts every batch that can be split
    // on the several-block path, a huge value keeps everything in one block; both equal the CPU.
    struct Restore {
        ~Restore() { unsetenv("EPLB_ALIGN_SPLIT_PAIRS"); }
    } restore;
    for (const char* split : {"0", "1000000000"}) {
        setenv("EPLB_ALIGN_SPLIT_PAIRS", split, 1);
        for (int iteration = 0; iteration < 12; ++iteration) {
            const int32_t top_k = 1 + int32_t(rng()() % 9);
            const int64_t tokens = 512 + int64_t(rng()() % 30000);
            const int32_t experts = iteration == 0 ? 4096 : 1 + int32_t(rng()() % 300);
            const int32_t first = int32_t(rng()() % 64);
            const int32_t block = int32_t(1) << (rng()() % 8);
            const auto ids = random_slots(size_t(tokens * top_k), -1, first + experts + 40);
            const Aligned cpu = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, first, experts, block);
            const Aligned gpu = run_align(EPLB_BACKEND_CUDA, ids, tokens, top_k, first, experts, block);
            if (!(gpu.counts == cpu.counts && gpu.offsets == cpu.offsets && gpu.sorted == cpu.sorted &&
                  gpu.blocks == cpu.blocks && gpu.positions == cpu.positions))
                EPLB_FAIL("split " << split << ": " << tokens << " tokens x " << top_k << ", " << experts
                                   << " experts, block " << block << ": CUDA differs from the CPU");
        }
        const int32_t ranks = 8;
        const auto ids = random_slots(size_t(20000) * 8, -1, 255);
        const Buckets cpu = run_buckets(EPLB_BACKEND_CPU, ids, 20000, 8, 256, ranks);
        const Buckets gpu = run_buckets(EPLB_BACKEND_CUDA, ids, 20000, 8, 256, ranks);
        EPLB_EXPECT(gpu.counts == cpu.counts && gpu.offsets == cpu.offsets && gpu.send == cpu.send &&
                    gpu.positions == cpu.positions);
    }
}

EPLB_TEST(dispatch_cuda_bucket_matches_cpu) {
    require_cuda();
    for (int iteration = 0; iteration < 30; ++iteration) {
        const int32_t ranks = 1 + int32_t(rng()() % 64);
        const int32_t physical = ranks * (1 + int32_t(rng()() % 40));
        const int32_t top_k = 1 + int32_t(rng()() % 9);
        const int64_t tokens = int64_t(rng()() % 20000);
        const auto ids = random_slots(size_t(tokens * top_k), -1, physical - 1);
        const Buckets cpu = run_buckets(EPLB_BACKEND_CPU, ids, tokens, top_k, physical, ranks);
        const Buckets gpu = run_buckets(EPLB_BACKEND_CUDA, ids, tokens, top_k, physical, ranks);
        EPLB_EXPECT(gpu.counts == cpu.counts && gpu.offsets == cpu.offsets && gpu.send == cpu.send &&
                    gpu.positions == cpu.positions);
    }
    const auto ids = real_ids("prefill_in2048", 10, 16384);
    const Buckets cpu = run_buckets(EPLB_BACKEND_CPU, ids, 16384, 8, 256, 8);
    const Buckets gpu = run_buckets(EPLB_BACKEND_CUDA, ids, 16384, 8, 256, 8);
    EPLB_EXPECT(gpu.counts == cpu.counts && gpu.offsets == cpu.offsets && gpu.send == cpu.send && gpu.positions == cpu.positions);
}

EPLB_TEST(dispatch_cuda_permute_and_combine_match_cpu) {
    require_cuda();
    for (int iteration = 0; iteration < 16; ++iteration) {
        const int32_t top_k = 1 + int32_t(rng()() % 8);
        const int64_t tokens = iteration == 0 ? 1 : 1 + int64_t(rng()() % 600);
        // Vector-friendly sizes, awkward ones (scalar fallback) and the DeepSeek-V3 hidden size.
        const int64_t sizes[] = {7168, 8192, 8, 1, 13, 96 + 4, 2050};
        const int64_t hidden = sizes[iteration % 7];
        const int32_t experts = 1 + int32_t(rng()() % 40);
        const int32_t first = int32_t(rng()() % 8);
        const int32_t block = int32_t(1) << (rng()() % 8);
        const auto ids = random_slots(size_t(tokens * top_k), -1, first + experts + 8);
        const Aligned a = run_align(EPLB_BACKEND_CPU, ids, tokens, top_k, first, experts, block);
        const int32_t rows = a.offsets[size_t(experts)];
        const int64_t capacity = int64_t(a.sorted.size());
        const auto weights = random_weights(tokens, top_k);

        const auto x = random_floats(size_t(tokens * hidden));
        const auto xb = random_bf16(size_t(tokens * hidden));
        EPLB_EXPECT(run_permute<float>(EPLB_BACKEND_CUDA, x, tokens, hidden, top_k, a.sorted, rows, -7.0f) ==
                    run_permute<float>(EPLB_BACKEND_CPU, x, tokens, hidden, top_k, a.sorted, rows, -7.0f));
        EPLB_EXPECT(run_permute<uint16_t>(EPLB_BACKEND_CUDA, xb, tokens, hidden, top_k, a.sorted, rows, kPoison16) ==
                    run_permute<uint16_t>(EPLB_BACKEND_CPU, xb, tokens, hidden, top_k, a.sorted, rows, kPoison16));

        const auto y = random_floats(size_t(capacity * hidden));
        const auto yb = random_bf16(size_t(capacity * hidden));
        for (bool weighted : {true, false}) {
            const auto& w = weighted ? weights : std::vector<float>{};
            EPLB_EXPECT((run_combine<float, float>(EPLB_BACKEND_CUDA, y, capacity, hidden, a.positions, w, tokens, top_k, -7.0f) ==
                         run_combine<float, float>(EPLB_BACKEND_CPU, y, capacity, hidden, a.positions, w, tokens, top_k, -7.0f)));
            EPLB_EXPECT((run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CUDA, yb, capacity, hidden, a.positions, w, tokens, top_k, kPoison16) ==
                         run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CPU, yb, capacity, hidden, a.positions, w, tokens, top_k, kPoison16)));
            EPLB_EXPECT((run_combine<uint16_t, float>(EPLB_BACKEND_CUDA, yb, capacity, hidden, a.positions, w, tokens, top_k, -7.0f) ==
                         run_combine<uint16_t, float>(EPLB_BACKEND_CPU, yb, capacity, hidden, a.positions, w, tokens, top_k, -7.0f)));
            EPLB_EXPECT((run_combine<float, uint16_t>(EPLB_BACKEND_CUDA, y, capacity, hidden, a.positions, w, tokens, top_k, kPoison16) ==
                         run_combine<float, uint16_t>(EPLB_BACKEND_CPU, y, capacity, hidden, a.positions, w, tokens, top_k, kPoison16)));
        }
    }
}

EPLB_TEST(dispatch_cuda_real_load_pipeline_matches_cpu) {
    // The benchmark's shape: 4096 tokens, top-8 from a real layer, hidden 7168 bf16, rank 0 of 8.
    require_cuda();
    const auto ids = real_ids("decode_in2000out100", 25, 4096);
    const Aligned a = run_align(EPLB_BACKEND_CPU, ids, 4096, 8, 0, 32, 128);
    const int64_t capacity = int64_t(a.sorted.size());
    const auto xb = random_bf16(size_t(4096) * 7168);
    const auto weights = random_weights(4096, 8);
    const auto rows_gpu = run_permute<uint16_t>(EPLB_BACKEND_CUDA, xb, 4096, 7168, 8, a.sorted, a.offsets[32], kPoison16);
    EPLB_EXPECT(rows_gpu == run_permute<uint16_t>(EPLB_BACKEND_CPU, xb, 4096, 7168, 8, a.sorted, a.offsets[32], kPoison16));
    auto y = rows_gpu;
    for (auto& v : y)
        if (v == kPoison16) v = 0;
    EPLB_EXPECT((run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CUDA, y, capacity, 7168, a.positions, weights, 4096, 8, kPoison16) ==
                 run_combine<uint16_t, uint16_t>(EPLB_BACKEND_CPU, y, capacity, 7168, a.positions, weights, 4096, 8, kPoison16)));
}

EPLB_TEST(dispatch_cuda_bad_indices_set_the_device_flag) {
    require_cuda();
    Stream stream(EPLB_BACKEND_CUDA);
    uint32_t flags = 0;
    // Bucketing: slot 9 with R = 8 is not sent.
    Buffer<int32_t> ids(EPLB_BACKEND_CUDA, std::vector<int32_t>{0, 9, 3, 5});
    Buffer<int32_t> counts(EPLB_BACKEND_CUDA, 2), offsets(EPLB_BACKEND_CUDA, 3), send(EPLB_BACKEND_CUDA, 4),
        positions(EPLB_BACKEND_CUDA, 4);
    EPLB_EXPECT_OK(eplb_dispatch_bucket_by_rank(stream.get(), ids.data(), 2, 2, 8, 2, counts.data(), offsets.data(),
                                                send.data(), positions.data()));
    EPLB_EXPECT_STATUS(eplb_stream_check_device_errors(stream.get(), &flags), EPLB_STATUS_DEVICE_INPUT_ERROR);
    EPLB_EXPECT_EQ(flags, uint32_t(EPLB_DEVICE_ERROR_BAD_DISPATCH_INDEX));
    EPLB_EXPECT(counts.read() == (std::vector<int32_t>{2, 1}));
    EPLB_EXPECT(positions.read() == (std::vector<int32_t>{0, kPad, 1, 2}));
    // Permute: *num_rows beyond capacity is clamped; a row id beyond the pairs leaves its row alone.
    Buffer<float> x(EPLB_BACKEND_CUDA, std::vector<float>{1, 2, 3, 4});
    Buffer<int32_t> rows(EPLB_BACKEND_CUDA, std::vector<int32_t>{3, 99});
    Buffer<int32_t> num_rows(EPLB_BACKEND_CUDA, std::vector<int32_t>{5});
    Buffer<float> out(EPLB_BACKEND_CUDA, std::vector<float>{-7, -7, -7, -7});
    EPLB_EXPECT_OK(eplb_dispatch_permute(stream.get(), EPLB_DTYPE_F32, x.data(), 2, 2, 2, rows.data(), num_rows.data(), 2, out.data()));
    EPLB_EXPECT_STATUS(eplb_stream_check_device_errors(stream.get(), &flags), EPLB_STATUS_DEVICE_INPUT_ERROR);
    EPLB_EXPECT(out.read() == (std::vector<float>{3, 4, -7, -7}));
    // Combine: a position beyond y_rows contributes nothing.
    Buffer<int32_t> pos(EPLB_BACKEND_CUDA, std::vector<int32_t>{1, 7});
    Buffer<float> sum(EPLB_BACKEND_CUDA, std::vector<float>{-7, -7});
    EPLB_EXPECT_OK(eplb_dispatch_combine(stream.get(), EPLB_DTYPE_F32, x.data(), 2, 2, pos.data(), nullptr, 1, 2, EPLB_DTYPE_F32, sum.data()));
    EPLB_EXPECT_STATUS(eplb_stream_check_device_errors(stream.get(), &flags), EPLB_STATUS_DEVICE_INPUT_ERROR);
    EPLB_EXPECT(sum.read() == (std::vector<float>{3, 4}));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), &flags));
}

EPLB_TEST(dispatch_cuda_rejects_host_pointers) {
    require_cuda();
    Stream stream(EPLB_BACKEND_CUDA);
    std::vector<int32_t> host_ids = {0, 1};
    Buffer<int32_t> counts(EPLB_BACKEND_CUDA, 2), offsets(EPLB_BACKEND_CUDA, 3), sorted(EPLB_BACKEND_CUDA, 2),
        blocks(EPLB_BACKEND_CUDA, 2), positions(EPLB_BACKEND_CUDA, 2);
    EPLB_EXPECT_STATUS(eplb_dispatch_align(stream.get(), host_ids.data(), 2, 1, 0, 2, 1, 2, counts.data(), offsets.data(),
                                           sorted.data(), blocks.data(), positions.data()),
                       EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("host memory") != std::string::npos);
}
