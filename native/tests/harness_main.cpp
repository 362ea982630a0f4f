// Runner: `--list` prints case names (CTest discovery), `--run NAME` runs one case, no argument
// runs all. Exit codes: 0 pass, 1 fail, 77 skipped.
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "harness.hpp"

namespace eplb::test {

std::vector<Case>& registry() {
    static std::vector<Case> cases;
    return cases;
}

namespace {
uint64_t g_seed = 0;
std::mt19937_64 g_rng;
}  // namespace

std::mt19937_64& rng() { return g_rng; }
uint64_t seed() { return g_seed; }

}  // namespace eplb::test

namespace {

enum class Outcome { Pass, Fail, Skip };

Outcome run_case(const eplb::test::Case& test_case) {
    using namespace eplb::test;
    // A fresh seed per run unless EPLB_TEST_SEED replays one.
    const char* fixed = std::getenv("EPLB_TEST_SEED");
    g_seed = fixed ? std::strtoull(fixed, nullptr, 10) : std::random_device{}();
    g_rng.seed(g_seed);
    try {
        test_case.body();
        std::cout << "[ PASS ] " << test_case.name << "\n";
        return Outcome::Pass;
    } catch (const Skip& skip) {
        std::cout << "[ SKIP ] " << test_case.name << ": " << skip.reason << "\n";
        return Outcome::Skip;
    } catch (const Failure& failure) {
        std::cout << "[ FAIL ] " << test_case.name << ": " << failure.message << " (EPLB_TEST_SEED=" << g_seed << ")\n";
    } catch (const std::exception& e) {
        std::cout << "[ FAIL ] " << test_case.name << ": exception: " << e.what() << " (EPLB_TEST_SEED=" << g_seed << ")\n";
    }
    return Outcome::Fail;
}

}  // namespace

int main(int argc, char** argv) {
    auto& cases = eplb::test::registry();
    if (argc >= 2 && std::strcmp(argv[1], "--list") == 0) {
        for (const auto& c : cases) std::cout << c.name << "\n";
        return 0;
    }
    if (argc >= 3 && std::strcmp(argv[1], "--run") == 0) {
        for (const auto& c : cases) {
            if (std::strcmp(c.name, argv[2]) == 0) {
                switch (run_case(c)) {
                    case Outcome::Pass: return 0;
                    case Outcome::Skip: return 77;
                    case Outcome::Fail: return 1;
                }
            }
        }
        std::cerr << "no test named " << argv[2] << "\n";
        return 2;
    }
    int passed = 0, failed = 0, skipped = 0;
    for (const auto& c : cases) {
        switch (run_case(c)) {
            case Outcome::Pass: ++passed; break;
            case Outcome::Skip: ++skipped; break;
            case Outcome::Fail: ++failed; break;
        }
    }
    std::cout << "native: " << passed << " passed, " << failed << " failed, " << skipped << " skipped\n";
    return failed == 0 ? 0 : 1;
}
