// Helpers for the native tests: RAII over the C ABI, random placements, the real load files.
#pragma once

#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "eplb/eplb.h"
#include "harness.hpp"

namespace eplb::test {

#define EPLB_EXPECT_OK(expr)                                                                              \
    do {                                                                                                  \
        const eplb_status_t eplb_s_ = (expr);                                                             \
        if (eplb_s_ != EPLB_STATUS_OK)                                                                    \
            EPLB_FAIL(#expr " -> " << eplb_status_string(eplb_s_) << ": " << eplb_last_error_message()); \
    } while (0)

#define EPLB_EXPECT_STATUS(expr, status)                                                                   \
    do {                                                                                                   \
        const eplb_status_t eplb_s_ = (expr);                                                              \
        if (eplb_s_ != (status))                                                                           \
            EPLB_FAIL(#expr " -> " << eplb_status_string(eplb_s_) << " (" << eplb_last_error_message()      \
                                   << "), want " << eplb_status_string(status));                          \
    } while (0)

// Skips the calling test unless the CUDA backend can run here, with the reason.
inline void require_cuda() {
    const eplb_status_t status = eplb_backend_available(EPLB_BACKEND_CUDA);
    if (status == EPLB_STATUS_NOT_COMPILED) EPLB_SKIP("built without CUDA");
    if (status != EPLB_STATUS_OK) EPLB_SKIP(eplb_last_error_message());  // "no CUDA device: ..."
}

class Stream {
public:
    explicit Stream(eplb_backend_t backend) { EPLB_EXPECT_OK(eplb_stream_create(backend, &stream_)); }
    ~Stream() { eplb_stream_destroy(stream_); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    eplb_stream_t* get() const { return stream_; }

private:
    eplb_stream_t* stream_ = nullptr;
};

// A typed buffer of one backend, filled from / read back into std::vector.
template <typename T>
class Buffer {
public:
    Buffer(eplb_backend_t backend, size_t count) : count_(count) {
        EPLB_EXPECT_OK(eplb_buffer_create(backend, count * sizeof(T), &buffer_));
        eplb_buffer_info_t info{};
        EPLB_EXPECT_OK(eplb_buffer_get_info(buffer_, &info));
        data_ = static_cast<T*>(info.data);
    }
    Buffer(eplb_backend_t backend, const std::vector<T>& values) : Buffer(backend, values.size()) { write(values); }
    ~Buffer() { eplb_buffer_destroy(buffer_); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    T* data() const { return data_; }
    size_t size() const { return count_; }
    eplb_buffer_t* handle() const { return buffer_; }

    // Without a stream the copy is a blocking one on the legacy default stream; with one it is
    // ordered on that stream (what a test that later launches on a non-blocking stream needs).
    void write(const std::vector<T>& values, eplb_stream_t* stream = nullptr) {
        EPLB_EXPECT_OK(eplb_buffer_write(buffer_, 0, values.data(), values.size() * sizeof(T), stream));
    }
    std::vector<T> read() const {
        std::vector<T> values(count_);
        EPLB_EXPECT_OK(eplb_buffer_read(buffer_, 0, values.data(), count_ * sizeof(T), nullptr));
        return values;
    }
    // Fills with a 4-byte poison so unwritten outputs show.
    void poison(uint32_t pattern = 0xDEADBEEFu) {
        static_assert(sizeof(T) % 4 == 0 || sizeof(T) == 2, "poison pattern size");
        EPLB_EXPECT_OK(eplb_buffer_fill(buffer_, 0, count_ * sizeof(T) / 4, &pattern, 4, nullptr));
    }

private:
    eplb_buffer_t* buffer_ = nullptr;
    T* data_ = nullptr;
    size_t count_ = 0;
};

// Host-side placement tables of one layer.
struct Tables {
    int32_t num_logical = 0;
    int32_t num_physical = 0;
    int32_t max_replicas = 0;
    std::vector<int32_t> phy2log;
    std::vector<int32_t> log2phy;  // [N][Kmax], ascending, -1 padded
    std::vector<int32_t> logcnt;   // [N]
};

// Builds log2phy/logcnt from phy2log with capacity max_replicas (0 = the largest count).
inline Tables tables_from_phy2log(const std::vector<int32_t>& phy2log, int32_t num_logical, int32_t max_replicas = 0) {
    Tables t;
    t.num_logical = num_logical;
    t.num_physical = int32_t(phy2log.size());
    t.phy2log = phy2log;
    t.logcnt.assign(num_logical, 0);
    for (int32_t e : phy2log) ++t.logcnt[e];
    const int32_t largest = *std::max_element(t.logcnt.begin(), t.logcnt.end());
    t.max_replicas = max_replicas > 0 ? max_replicas : largest;
    t.log2phy.assign(size_t(num_logical) * t.max_replicas, -1);
    std::vector<int32_t> filled(num_logical, 0);
    for (int32_t slot = 0; slot < t.num_physical; ++slot) {
        const int32_t e = phy2log[slot];
        if (filled[e] < t.max_replicas) t.log2phy[size_t(e) * t.max_replicas + filled[e]] = slot;
        ++filled[e];
    }
    return t;
}

// A random placement: every expert at least once, the rest of the R slots random, shuffled.
inline Tables random_tables(int32_t num_logical, int32_t num_physical, int32_t extra_capacity = 0) {
    std::vector<int32_t> phy2log(num_physical);
    for (int32_t s = 0; s < num_physical; ++s)
        phy2log[s] = s < num_logical ? s : int32_t(rng()() % uint64_t(num_logical));
    std::shuffle(phy2log.begin(), phy2log.end(), rng());
    Tables t = tables_from_phy2log(phy2log, num_logical);
    if (extra_capacity > 0) t = tables_from_phy2log(phy2log, num_logical, t.max_replicas + extra_capacity);
    return t;
}

// The real SGLang DeepSeek-V3 load files: [61 layers][256 experts], layers 0-2 dense (all zero).
inline std::vector<std::string> load_file_names() {
    return {"decode_in1000out1000", "decode_in1800out100", "decode_in2000out100", "decode_in500out1500",
            "prefill_in1000out1000", "prefill_in1024", "prefill_in1800out100", "prefill_in2000out100",
            "prefill_in2048", "prefill_in4096", "prefill_in500out1500", "prefill_in512"};
}

// Reads {"logical_count": [[...]]} into rows of doubles (a minimal reader for this one format).
inline std::vector<std::vector<double>> read_load_file(const std::string& name) {
    const std::string path = std::string(EPLB_DATA_DIR) + "/sglang-deepseek-v3-r1/" + name + ".json";
    std::ifstream in(path);
    if (!in) EPLB_FAIL("cannot open " << path);
    std::stringstream text;
    text << in.rdbuf();
    const std::string s = text.str();
    std::vector<std::vector<double>> rows;
    int depth = 0;
    std::vector<double> row;
    for (size_t i = 0; i < s.size(); ++i) {
        const char c = s[i];
        if (c == '[') {
            ++depth;
            row.clear();
        } else if (c == ']') {
            if (depth == 2) rows.push_back(row);
            --depth;
        } else if (depth == 2 && (c == '-' || (c >= '0' && c <= '9'))) {
            size_t used = 0;
            row.push_back(std::stod(s.substr(i, 32), &used));
            i += used - 1;
        }
    }
    return rows;
}

// Draws num_tokens rows of top_k distinct experts from a load row (sampling proportional to load).
inline std::vector<int32_t> sample_topk(const std::vector<double>& load, int64_t num_tokens, int32_t top_k) {
    std::vector<int32_t> ids(size_t(num_tokens) * top_k);
    for (int64_t t = 0; t < num_tokens; ++t) {
        std::vector<double> weights = load;
        for (int32_t k = 0; k < top_k; ++k) {
            std::discrete_distribution<int32_t> pick(weights.begin(), weights.end());
            const int32_t e = pick(rng());
            ids[size_t(t) * top_k + k] = e;
            weights[e] = 0.0;
        }
    }
    return ids;
}

}  // namespace eplb::test
