// A small self-contained test harness, so the native tests build on any machine with a compiler
// (the GPU machines have no GoogleTest). Each EPLB_TEST becomes one CTest test through
// discovery (`eplb_native_tests --list`), so CTest counts cases, not binaries.
//
//   EPLB_TEST(mapping_golden) { EPLB_EXPECT_EQ(a, b); }
//   EPLB_SKIP("no CUDA device");   // exit code 77, reported as skipped by CTest
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace eplb::test {

struct Case {
    const char* name;
    std::function<void()> body;
};

std::vector<Case>& registry();

struct Registrar {
    Registrar(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

struct Failure {
    std::string message;
};

struct Skip {
    std::string reason;
};

// Deterministic per-case generator; the seed is printed on failure so a case can be replayed.
std::mt19937_64& rng();
uint64_t seed();

}  // namespace eplb::test

#define EPLB_TEST_CONCAT_(a, b) a##b
#define EPLB_TEST_CONCAT(a, b) EPLB_TEST_CONCAT_(a, b)
#define EPLB_TEST(name)                                                                              \
    static void EPLB_TEST_CONCAT(eplb_test_, name)();                                                \
    static ::eplb::test::Registrar EPLB_TEST_CONCAT(eplb_registrar_, name)(#name, &EPLB_TEST_CONCAT(eplb_test_, name)); \
    static void EPLB_TEST_CONCAT(eplb_test_, name)()

#define EPLB_FAIL(...)                                                                        \
    do {                                                                                      \
        std::ostringstream eplb_out_;                                                         \
        eplb_out_ << __FILE__ << ":" << __LINE__ << ": " << __VA_ARGS__;                      \
        throw ::eplb::test::Failure{eplb_out_.str()};                                         \
    } while (0)

#define EPLB_EXPECT(cond)                                \
    do {                                                 \
        if (!(cond)) EPLB_FAIL("expected " #cond);       \
    } while (0)

#define EPLB_EXPECT_EQ(actual, expected)                                                                  \
    do {                                                                                                  \
        const auto eplb_a_ = (actual);                                                                    \
        const auto eplb_e_ = (expected);                                                                  \
        if (!(eplb_a_ == eplb_e_)) EPLB_FAIL(#actual " == " #expected ": got " << eplb_a_ << ", want " << eplb_e_); \
    } while (0)

#define EPLB_SKIP(reason) throw ::eplb::test::Skip{reason}
