// Tests of the MoE expert computation (eplb_moe.h): a hand-computed golden, the CPU reference
// against a naive per-token loop (random layers and ids drawn from the real load files), the
// unfused path, the workspace query and bad input on the CPU backend; on a GPU the fused
// cooperative kernel and the unfused kernels against the CPU reference, bitwise repeatability,
// and the oversized grid returning EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE.
#include "moe_test_util.hpp"

using namespace eplb::test;

namespace {

// H = I = 64, 4 experts of which slots 1 and 2 are local; every value and product is exact in
// bf16 / fp32 except where the comment rounds it.
MoeLayer golden_layer(float limit) {
    MoeLayer layer;
    layer.shape = moe_shape(64, 64, 2, 4, 2, 1, limit);
    layer.tokens = 3;
    const int64_t H = 64, I = 64;
    layer.x.assign(size_t(3 * H), 0);
    layer.x[0] = to_bf16(1.0f);          // token 0 = e0
    layer.x[H + 1] = to_bf16(2.0f);      // token 1 = 2 e1
    layer.x[2 * H + 7] = to_bf16(5.0f);  // token 2 has no local expert
    layer.ids = {1, 2, 2, 3, 0, -1};
    layer.weights = {0.5f, 0.25f, 2.0f, 7.0f, 1.0f, 1.0f};
    layer.w1.assign(layer.w1_size(), 0);
    layer.w2.assign(layer.w2_size(), 0);
    auto w1 = [&](int e, int64_t row, int64_t col) -> uint16_t& { return layer.w1[size_t((e * 2 * I + row) * H + col)]; };
    auto w2 = [&](int e, int64_t row, int64_t col) -> uint16_t& { return layer.w2[size_t((e * H + row) * I + col)]; };
    // Expert slot 1 (local 0), token 0: gate 20, up 0.5 -> h0 = silu(20) * 0.5 = 10 (silu(20) is 20 in fp32).
    w1(0, 0, 0) = to_bf16(20.0f);
    w1(0, I + 0, 0) = to_bf16(0.5f);
    for (int n = 0; n < 4; ++n) w2(0, n, 0) = to_bf16(0.125f * float(n + 1));  // y = 10 * 0.125 (n + 1)
    // Expert slot 2 (local 1), token 0: h0 = silu(20) * -1 = -20, y1 = h0.
    w1(1, 0, 0) = to_bf16(20.0f);
    w1(1, I + 0, 0) = to_bf16(-1.0f);
    w2(1, 1, 0) = to_bf16(1.0f);
    // Token 1 (x = 2 e1): h2 = silu(6) * 2 = 11.9703 -> bf16 12; y3 = 0.5 h2 = 6.
    w1(1, 2, 1) = to_bf16(3.0f);
    w1(1, I + 2, 1) = to_bf16(1.0f);
    w2(1, 3, 2) = to_bf16(0.5f);
    // Token 1: gate 2, up 16: h5 = silu(2) * 16 = 28.1855 -> 28.125; clamped up 10: 17.6159 -> 17.625.
    w1(1, 5, 1) = to_bf16(1.0f);
    w1(1, I + 5, 1) = to_bf16(8.0f);
    w2(1, 6, 5) = to_bf16(1.0f);
    return layer;
}

void expect_golden(const std::vector<uint16_t>& out, float limit) {
    std::vector<float> want(3 * 64, 0.0f);
    if (limit == 0.0f) {
        // token 0 = 0.5 [1.25, 2.5, 3.75, 5] + 0.25 [0, -20, 0, 0]
        want[0] = 0.625f, want[1] = -3.75f, want[2] = 1.875f, want[3] = 2.5f;
        want[64 + 6] = 56.25f;  // 2 * 28.125
    } else {
        // limit 10: gate 20 -> 10, silu(10) = 9.99955; 0.5 of it -> 5 and -1 times it -> -10 in bf16.
        want[0] = 0.3125f, want[1] = -1.875f, want[2] = 0.9375f, want[3] = 1.25f;
        want[64 + 6] = 35.25f;  // 2 * 17.625
    }
    want[64 + 3] = 12.0f;  // 2 * 6; the weight 7 of the non-local slot 3 adds nothing
    for (size_t i = 0; i < want.size(); ++i)
        if (bf16_value(out[i]) != want[i])
            EPLB_FAIL("element " << i << ": got " << bf16_value(out[i]) << ", want " << want[i] << " (limit " << limit << ")");
}

// A spread of awkward layers: primes, T = 1, many empty experts, clamps that fire, both tiles.
std::vector<MoeLayer> random_layers(int count, int64_t max_tokens) {
    std::vector<MoeLayer> layers;
    for (int i = 0; i < count; ++i) {
        const int32_t hidden = 64 * int32_t(1 + rng()() % 4);
        const int32_t inter = 64 * int32_t(1 + rng()() % 3);
        const int32_t top_k = 1 + int32_t(rng()() % 8);
        const int32_t experts = 1 + int32_t(rng()() % 40);
        const int32_t local = 1 + int32_t(rng()() % uint64_t(experts));
        const int32_t first = int32_t(rng()() % uint64_t(experts - local + 1));
        const float limit = (rng()() % 3 == 0) ? 0.0f : 0.05f + 0.5f * float(rng()() % 4);
        const int32_t block_m = std::vector<int32_t>{0, 32, 128}[rng()() % 3];
        const int64_t tokens = i == 0 ? 1 : 1 + int64_t(rng()() % uint64_t(max_tokens));
        layers.push_back(random_layer(moe_shape(hidden, inter, top_k, experts, local, first, limit, block_m), tokens));
    }
    return layers;
}

std::string describe(const MoeLayer& l) {
    std::ostringstream out;
    out << "T=" << l.tokens << " H=" << l.shape.hidden << " I=" << l.shape.intermediate << " K=" << l.shape.top_k
        << " R=" << l.shape.num_experts << " local=[" << l.shape.first_local_expert << "+" << l.shape.num_local_experts
        << ") limit=" << l.shape.swiglu_limit << " block_m=" << l.shape.block_m;
    return out.str();
}

// Tokens routed like the real DeepSeek-V3 layer: top-k drawn from a real load row over 256 slots,
// this rank holding 32 of them (rank 3 of 8).
MoeLayer real_load_layer(const std::string& file, int layer_index, int64_t tokens, int32_t hidden, int32_t inter) {
    const auto rows = read_load_file(file);
    MoeLayer layer;
    layer.shape = moe_shape(hidden, inter, 8, 256, 32, 96, 10.0f);
    layer.tokens = tokens;
    layer.x = random_bf16(size_t(tokens) * hidden, 1.0f);
    randomise_weights(layer);
    layer.ids = sample_topk(rows[size_t(layer_index)], tokens, 8);
    std::uniform_real_distribution<float> weight(0.05f, 1.0f);
    layer.weights.resize(layer.ids.size());
    for (auto& w : layer.weights) w = weight(rng());
    return layer;
}

bool any_local(const MoeLayer& l, int64_t t) {
    for (int32_t k = 0; k < l.shape.top_k; ++k) {
        const int64_t e = int64_t(l.ids[size_t(t * l.shape.top_k + k)]) - l.shape.first_local_expert;
        if (e >= 0 && e < l.shape.num_local_experts) return true;
    }
    return false;
}

}  // namespace

EPLB_TEST(moe_cpu_golden_hand_computed) {
    for (float limit : {0.0f, 10.0f}) {
        const MoeLayer layer = golden_layer(limit);
        expect_golden(run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused), limit);
        expect_golden(run_moe(EPLB_BACKEND_CPU, layer, MoePath::Unfused), limit);
    }
}

EPLB_TEST(moe_cpu_reference_matches_naive_per_token_loop) {
    for (const MoeLayer& layer : random_layers(24, 70)) {
        const auto got = run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused);
        expect_close(got, naive_moe(layer), layer.shape.hidden, describe(layer), kNaiveTolerance);
        // Tokens without a local expert are exactly +0.
        for (int64_t t = 0; t < layer.tokens; ++t)
            if (!any_local(layer, t))
                for (int32_t n = 0; n < layer.shape.hidden; ++n) EPLB_EXPECT_EQ(got[size_t(t * layer.shape.hidden + n)], uint16_t(0));
    }
}

EPLB_TEST(moe_cpu_reference_on_real_load_ids) {
    for (const std::string file : {"decode_in1000out1000", "prefill_in4096"}) {
        const MoeLayer layer = real_load_layer(file, 20, 48, 128, 64);
        expect_close(run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused), naive_moe(layer), 128, file, kNaiveTolerance);
    }
}

EPLB_TEST(moe_cpu_unfused_equals_fused_bit_for_bit) {
    for (const MoeLayer& layer : random_layers(10, 50)) {
        EPLB_EXPECT(run_moe(EPLB_BACKEND_CPU, layer, MoePath::Unfused) == run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused));
    }
}

EPLB_TEST(moe_cpu_empty_batch_and_no_local_tokens) {
    MoeLayer layer = random_layer(moe_shape(128, 64, 4, 16, 4, 8), 0);
    EPLB_EXPECT(run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused).empty());
    // Every id outside the local slots [8, 12): the output is all zeros, not the poison.
    layer = random_layer(moe_shape(128, 64, 4, 16, 4, 8), 9);
    for (auto& id : layer.ids) id = (id >= 8 && id < 12) ? id - 8 : id;
    const auto out = run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused);
    EPLB_EXPECT(std::all_of(out.begin(), out.end(), [](uint16_t v) { return v == 0; }));
}

EPLB_TEST(moe_workspace_size_grows_with_tokens_and_covers_the_buffers) {
    const eplb_moe_shape_t shape = moe_shape(7168, 2048, 8, 256, 32, 0);
    uint64_t previous = 0;
    for (int64_t tokens : {0, 1, 16, 128, 4096}) {
        const uint64_t bytes = moe_workspace_bytes(shape, tokens);
        // At least the bf16 intermediate and expert-output rows of every (token, k) pair.
        EPLB_EXPECT(bytes >= uint64_t(tokens) * 8 * (7168 + 2048) * 2);
        EPLB_EXPECT(bytes >= previous);
        previous = bytes;
    }
    // Independent of the tile height and of which experts are local.
    eplb_moe_shape_t other = shape;
    other.block_m = 128;
    other.first_local_expert = 224;
    EPLB_EXPECT_EQ(moe_workspace_bytes(other, 128), moe_workspace_bytes(shape, 128));
    uint64_t bytes = 7;
    EPLB_EXPECT_STATUS(eplb_moe_workspace_size(&shape, -1, &bytes), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_moe_workspace_size(nullptr, 1, &bytes), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_moe_workspace_size(&shape, 1, nullptr), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_EQ(bytes, uint64_t(7));
}

EPLB_TEST(moe_cpu_max_grid) {
    Stream stream(EPLB_BACKEND_CPU);
    const eplb_moe_shape_t shape = moe_shape(4096, 2048, 6, 256, 256, 0);
    int32_t blocks = 0, block_m = 0;
    EPLB_EXPECT_OK(eplb_mega_moe_max_grid(stream.get(), &shape, 128, &blocks, &block_m));
    EPLB_EXPECT_EQ(blocks, 1);
    EPLB_EXPECT_EQ(block_m, 32);  // 128 tokens x 6 / 256 experts = 3 rows per expert: decode tiles
    EPLB_EXPECT_OK(eplb_mega_moe_max_grid(stream.get(), &shape, 4096, &blocks, &block_m));
    EPLB_EXPECT_EQ(block_m, 128);  // 96 rows per expert
}

EPLB_TEST(moe_bad_input_writes_nothing) {
    Stream stream(EPLB_BACKEND_CPU);
    const MoeLayer layer = random_layer(moe_shape(64, 64, 2, 8, 4, 2), 5);
    std::vector<uint16_t> out(5 * 64, 0xabcd);
    const uint64_t bytes = moe_workspace_bytes(layer.shape, 5);
    Buffer<uint8_t> workspace(EPLB_BACKEND_CPU, bytes);
    const eplb_moe_tensors_t good{layer.x.data(), layer.ids.data(), layer.weights.data(), layer.w1.data(),
                                  layer.w2.data(), out.data(), workspace.data(), bytes};
    auto expect_rejected = [&](const eplb_moe_shape_t& shape, int64_t tokens, const eplb_moe_tensors_t& t,
                               const char* needle, int32_t grid = 0) {
        EPLB_EXPECT_STATUS(eplb_mega_moe(stream.get(), &shape, tokens, &t, grid), EPLB_STATUS_INVALID_ARGUMENT);
        const std::string message = eplb_last_error_message();
        if (message.find(needle) == std::string::npos) EPLB_FAIL("message '" << message << "' does not name " << needle);
        if (grid == 0)
            EPLB_EXPECT_STATUS(eplb_moe_unfused(stream.get(), &shape, tokens, &t), EPLB_STATUS_INVALID_ARGUMENT);
        EPLB_EXPECT(std::all_of(out.begin(), out.end(), [](uint16_t v) { return v == 0xabcd; }));
    };
    auto with = [&](auto change) {
        eplb_moe_shape_t s = layer.shape;
        change(s);
        return s;
    };
    expect_rejected(with([](auto& s) { s.hidden = 96; }), 5, good, "hidden");
    expect_rejected(with([](auto& s) { s.intermediate = 0; }), 5, good, "intermediate");
    expect_rejected(with([](auto& s) { s.top_k = 0; }), 5, good, "top_k");
    expect_rejected(with([](auto& s) { s.num_local_experts = 2000; }), 5, good, "num_local_experts");
    expect_rejected(with([](auto& s) { s.first_local_expert = 6; }), 5, good, "num_experts = 8");
    expect_rejected(with([](auto& s) { s.swiglu_limit = -1.0f; }), 5, good, "swiglu_limit");
    expect_rejected(with([](auto& s) { s.swiglu_limit = NAN; }), 5, good, "swiglu_limit");
    expect_rejected(with([](auto& s) { s.block_m = 64; }), 5, good, "block_m");
    expect_rejected(layer.shape, -1, good, "num_tokens");
    expect_rejected(layer.shape, int64_t(1) << 31, good, "num_tokens");
    expect_rejected(layer.shape, 5, good, "grid_blocks", -1);
    for (int field = 0; field < 7; ++field) {
        eplb_moe_tensors_t t = good;
        const char* names[] = {"x", "topk_ids", "topk_weights", "w1", "w2", "output", "workspace"};
        switch (field) {
            case 0: t.x = nullptr; break;
            case 1: t.topk_ids = nullptr; break;
            case 2: t.topk_weights = nullptr; break;
            case 3: t.w1 = nullptr; break;
            case 4: t.w2 = nullptr; break;
            case 5: t.output = nullptr; break;
            case 6: t.workspace = nullptr; break;
        }
        expect_rejected(layer.shape, 5, t, names[field]);
    }
    eplb_moe_tensors_t small = good;
    small.workspace_bytes = bytes - 1;
    expect_rejected(layer.shape, 5, small, "workspace_bytes");
    // The CPU reference needs natural alignment (CUDA: 16 bytes, see moe_cuda_rejects_misaligned).
    eplb_moe_tensors_t misaligned = good;
    misaligned.output = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(out.data()) + 1);
    expect_rejected(layer.shape, 5, misaligned, "2-byte aligned");
    misaligned = good;
    misaligned.workspace = static_cast<uint8_t*>(workspace.data()) + 2;
    expect_rejected(layer.shape, 5, misaligned, "4-byte aligned");
    EPLB_EXPECT_STATUS(eplb_mega_moe(stream.get(), &layer.shape, 5, nullptr, 0), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_mega_moe(nullptr, &layer.shape, 5, &good, 0), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT_STATUS(eplb_mega_moe(stream.get(), nullptr, 5, &good, 0), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::all_of(out.begin(), out.end(), [](uint16_t v) { return v == 0xabcd; }));
    // The good call goes through.
    EPLB_EXPECT_OK(eplb_mega_moe(stream.get(), &layer.shape, 5, &good, 0));
}

// --- CUDA (skipped without a device) ------------------------------------------------------------

EPLB_TEST(moe_cuda_golden_hand_computed) {
    require_cuda();
    for (float limit : {0.0f, 10.0f}) {
        for (int32_t block_m : {32, 128}) {
            MoeLayer layer = golden_layer(limit);
            layer.shape.block_m = block_m;
            expect_golden(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused), limit);
            expect_golden(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Unfused), limit);
        }
    }
}

EPLB_TEST(moe_cuda_fused_and_unfused_match_cpu_random) {
    require_cuda();
    for (const MoeLayer& layer : random_layers(30, 300)) {
        const auto want = run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused);
        const auto fused = run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused);
        expect_close(fused, want, layer.shape.hidden, "fused " + describe(layer));
        const auto unfused = run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Unfused);
        expect_close(unfused, want, layer.shape.hidden, "unfused " + describe(layer));
        // Same tiles, same accumulation order: the two GPU paths agree bit for bit.
        EPLB_EXPECT(fused == unfused);
    }
}

EPLB_TEST(moe_cuda_larger_expert_count_after_a_smaller_one) {
    require_cuda();
    // The kernels' shared memory grows with E: a layer with fewer local experts must not leave the
    // limit too low for a later, larger one (E = 256, 32, 256 in one process, as bench_moe and
    // moe_peer.py run them), for both tile heights and both paths.
    for (int32_t block_m : {32, 128}) {
        for (int32_t local : {256, 32, 256}) {
            const MoeLayer layer = random_layer(moe_shape(128, 64, 8, 256, local, 0, 10.0f, block_m), 40);
            const auto want = run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused);
            const std::string what = describe(layer);
            expect_close(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused), want, 128, "fused " + what);
            expect_close(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Unfused), want, 128, "unfused " + what);
        }
    }
}

EPLB_TEST(moe_cuda_many_tokens_per_expert) {
    require_cuda();
    // Few experts, many tokens: experts span several m-tiles, partial last tiles, both tile heights.
    for (int32_t block_m : {32, 128}) {
        MoeLayer layer = random_layer(moe_shape(192, 128, 6, 12, 7, 3, 0.8f, block_m), 611);
        expect_close(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused), run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused),
                     192, describe(layer));
    }
}

EPLB_TEST(moe_cuda_bitwise_repeatable_across_runs_and_grids) {
    require_cuda();
    const MoeLayer layer = random_layer(moe_shape(256, 128, 8, 64, 48, 8, 10.0f), 257);
    Stream stream(EPLB_BACKEND_CUDA);
    int32_t max_blocks = 0;
    EPLB_EXPECT_OK(eplb_mega_moe_max_grid(stream.get(), &layer.shape, layer.tokens, &max_blocks, nullptr));
    const auto first = run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused);
    for (int32_t grid : {0, 0, 1, 7, max_blocks / 2 + 1, max_blocks})
        EPLB_EXPECT(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused, grid) == first);
}

EPLB_TEST(moe_cuda_real_load_ids) {
    require_cuda();
    for (const std::string file : {"decode_in1000out1000", "prefill_in2048"}) {
        for (int64_t tokens : {1, 128, 515}) {
            const MoeLayer layer = real_load_layer(file, 30, tokens, 512, 256);
            expect_close(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused), run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused),
                         512, file + " T=" + std::to_string(tokens));
        }
    }
}

EPLB_TEST(moe_cuda_deepseek_v4_flash_shape) {
    require_cuda();
    // H 4096, I 2048, top-6, 8 of 256 experts local; ids forced onto the local ones for a few tokens.
    MoeLayer layer = random_layer(moe_shape(4096, 2048, 6, 256, 8, 40, 10.0f), 7);
    for (size_t i = 0; i < layer.ids.size(); i += 2) layer.ids[i] = 40 + int32_t(i % 8);
    expect_close(run_moe(EPLB_BACKEND_CUDA, layer, MoePath::Fused), run_moe(EPLB_BACKEND_CPU, layer, MoePath::Fused), 4096,
                 describe(layer));
}

EPLB_TEST(moe_cuda_oversized_grid_returns_unavailable_instead_of_hanging) {
    require_cuda();
    const MoeLayer layer = random_layer(moe_shape(128, 64, 4, 16, 16, 0), 33);
    Stream stream(EPLB_BACKEND_CUDA);
    int32_t max_blocks = 0, block_m = 0;
    EPLB_EXPECT_OK(eplb_mega_moe_max_grid(stream.get(), &layer.shape, layer.tokens, &max_blocks, &block_m));
    EPLB_EXPECT(max_blocks >= 1);
    Buffer<uint16_t> x(EPLB_BACKEND_CUDA, layer.x);
    Buffer<int32_t> ids(EPLB_BACKEND_CUDA, layer.ids);
    Buffer<float> weights(EPLB_BACKEND_CUDA, layer.weights);
    Buffer<uint16_t> w1(EPLB_BACKEND_CUDA, layer.w1);
    Buffer<uint16_t> w2(EPLB_BACKEND_CUDA, layer.w2);
    Buffer<uint16_t> out(EPLB_BACKEND_CUDA, std::vector<uint16_t>(size_t(33 * 128), 0xabcd));
    const uint64_t bytes = moe_workspace_bytes(layer.shape, 33);
    Buffer<uint8_t> workspace(EPLB_BACKEND_CUDA, bytes);
    const eplb_moe_tensors_t tensors{x.data(), ids.data(), weights.data(), w1.data(), w2.data(), out.data(),
                                     workspace.data(), bytes};
    EPLB_EXPECT_STATUS(eplb_mega_moe(stream.get(), &layer.shape, 33, &tensors, max_blocks + 1),
                       EPLB_STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("co-reside") != std::string::npos);
    EPLB_EXPECT_OK(eplb_stream_synchronize(stream.get()));
    const auto untouched = out.read();
    EPLB_EXPECT(std::all_of(untouched.begin(), untouched.end(), [](uint16_t v) { return v == 0xabcd; }));
    // The unfused fallback computes the layer.
    EPLB_EXPECT_OK(eplb_moe_unfused(stream.get(), &layer.shape, 33, &tensors));
    EPLB_EXPECT_OK(eplb_stream_check_device_errors(stream.get(), nullptr));
    expect_close(out.read(), naive_moe(layer), 128, "unfused fallback", kNaiveTolerance);
}

EPLB_TEST(moe_cuda_rejects_host_pointers) {
    require_cuda();
    const MoeLayer layer = random_layer(moe_shape(64, 64, 2, 4, 4, 0), 3);
    Stream stream(EPLB_BACKEND_CUDA);
    Buffer<uint16_t> w1(EPLB_BACKEND_CUDA, layer.w1);
    Buffer<uint16_t> w2(EPLB_BACKEND_CUDA, layer.w2);
    Buffer<uint16_t> out(EPLB_BACKEND_CUDA, size_t(3 * 64));
    const uint64_t bytes = moe_workspace_bytes(layer.shape, 3);
    Buffer<uint8_t> workspace(EPLB_BACKEND_CUDA, bytes);
    const eplb_moe_tensors_t tensors{layer.x.data(), layer.ids.data(), layer.weights.data(), w1.data(), w2.data(),
                                     out.data(), workspace.data(), bytes};
    EPLB_EXPECT_STATUS(eplb_mega_moe(stream.get(), &layer.shape, 3, &tensors, 0), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("tensors->x") != std::string::npos);
}

EPLB_TEST(moe_cuda_rejects_misaligned) {
    require_cuda();
    const MoeLayer layer = random_layer(moe_shape(64, 64, 2, 4, 4, 0), 3);
    Stream stream(EPLB_BACKEND_CUDA);
    Buffer<uint16_t> x(EPLB_BACKEND_CUDA, layer.x.size() + 8);
    Buffer<int32_t> ids(EPLB_BACKEND_CUDA, layer.ids);
    Buffer<float> weights(EPLB_BACKEND_CUDA, layer.weights);
    Buffer<uint16_t> w1(EPLB_BACKEND_CUDA, layer.w1);
    Buffer<uint16_t> w2(EPLB_BACKEND_CUDA, layer.w2);
    Buffer<uint16_t> out(EPLB_BACKEND_CUDA, size_t(3 * 64));
    const uint64_t bytes = moe_workspace_bytes(layer.shape, 3);
    Buffer<uint8_t> workspace(EPLB_BACKEND_CUDA, bytes + 256);
    eplb_moe_tensors_t tensors{x.data() + 1, ids.data(), weights.data(), w1.data(), w2.data(), out.data(),
                               workspace.data(), bytes};
    EPLB_EXPECT_STATUS(eplb_mega_moe(stream.get(), &layer.shape, 3, &tensors, 0), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("16-byte aligned") != std::string::npos);
    tensors.x = x.data();
    tensors.workspace = static_cast<uint8_t*>(workspace.data()) + 16;
    EPLB_EXPECT_STATUS(eplb_moe_unfused(stream.get(), &layer.shape, 3, &tensors), EPLB_STATUS_INVALID_ARGUMENT);
    EPLB_EXPECT(std::string(eplb_last_error_message()).find("256-byte aligned") != std::string::npos);
}
