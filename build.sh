#!/usr/bin/env bash
# Build, test and run Eplb. Thin on purpose: CMake builds libeplb, dotnet builds the managed code.
#
#   ./build.sh              build native (Release) and managed
#   ./build.sh test         build, then run CTest and dotnet test; prints
#                           "tests: N passed, N failed, N skipped" over all suites
#   ./build.sh run [ARGS]   build, then run the main job: eplb simulate ARGS
#   ./build.sh eplb ARGS    build, then run any eplb command
#   ./build.sh bindings [--verify]   regenerate (or check) bindings/generated from eplb.h
#   ./build.sh bench [ARGS] build, then run the BenchmarkDotNet suite (ARGS go to BenchmarkDotNet)
#   ./build.sh clean
#
# Environment: EPLB_ENABLE_CUDA (ON), EPLB_REQUIRE_CUDA (OFF), EPLB_CUDA_ARCHS (80;90),
# CONFIG (Release), BUILD_DIR (build), CUDAHOSTCXX (g++-11 when nvcc is 11.x and it exists).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
CONFIG=${CONFIG:-Release}
BUILD_DIR=${BUILD_DIR:-$ROOT/build}
NATIVE_DIR=$BUILD_DIR/native
RESULTS_DIR=$BUILD_DIR/test-results
export EPLB_NATIVE_BUILD_DIR=$NATIVE_DIR
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

log() { printf '== %s\n' "$*" >&2; }

nvcc_path() { command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true; }

build_native() {
  local nvcc generator=()
  nvcc=$(nvcc_path)
  # CMake 3.25's check_language(CUDA) only honours CUDAHOSTCXX; nvcc 11.x needs g++ <= 11.
  if [ -n "$nvcc" ] && [ -z "${CUDAHOSTCXX:-}" ] && command -v g++-11 >/dev/null; then
    if "$nvcc" --version | grep -q "release 11\."; then export CUDAHOSTCXX=g++-11; fi
  fi
  if [ -n "$nvcc" ] && [ -z "${CUDACXX:-}" ]; then export CUDACXX=$nvcc; fi
  command -v ninja >/dev/null && generator=(-G Ninja)
  if [ ! -f "$NATIVE_DIR/CMakeCache.txt" ]; then
    cmake -S "$ROOT" -B "$NATIVE_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE="$CONFIG" \
      -DEPLB_ENABLE_CUDA="${EPLB_ENABLE_CUDA:-ON}" -DEPLB_REQUIRE_CUDA="${EPLB_REQUIRE_CUDA:-OFF}" \
      -DEPLB_CUDA_ARCHS="${EPLB_CUDA_ARCHS:-80;90}" >&2
  else
    cmake "$NATIVE_DIR" -DEPLB_ENABLE_CUDA="${EPLB_ENABLE_CUDA:-ON}" -DEPLB_REQUIRE_CUDA="${EPLB_REQUIRE_CUDA:-OFF}" >&2
  fi
  cmake --build "$NATIVE_DIR" --parallel >&2
}

build_managed() {
  dotnet build "$ROOT/Eplb.sln" -c "$CONFIG" -nologo -v quiet -clp:ErrorsOnly >&2
}

build_all() {
  log "native (libeplb, $CONFIG)"
  build_native
  log "managed ($CONFIG)"
  build_managed
}

# Prints the value of attribute $3 on the first <$2 ...> element of XML file $1 (0 when absent).
xml_attr() {
  local value
  value=$(tr '\n\t' '  ' <"$1" | grep -o "<$2 [^>]*" | head -n 1 | grep -o " $3=\"[0-9]*\"" | grep -o '[0-9]*' || true)
  echo "${value:-0}"
}

# passed/failed/skipped of a CTest JUnit file.
ctest_counts() {
  local tests failures skipped disabled
  tests=$(xml_attr "$1" testsuite tests); failures=$(xml_attr "$1" testsuite failures)
  skipped=$(xml_attr "$1" testsuite skipped); disabled=$(xml_attr "$1" testsuite disabled)
  echo "$((tests - failures - skipped - disabled)) $failures $((skipped + disabled))"
}

# passed/failed/skipped of a TRX file (NUnit's ignored tests are counted but not executed).
trx_counts() {
  local total executed passed failed errors timeouts aborted
  total=$(xml_attr "$1" Counters total); executed=$(xml_attr "$1" Counters executed)
  passed=$(xml_attr "$1" Counters passed); failed=$(xml_attr "$1" Counters failed)
  errors=$(xml_attr "$1" Counters error); timeouts=$(xml_attr "$1" Counters timeout)
  aborted=$(xml_attr "$1" Counters aborted)
  echo "$passed $((failed + errors + timeouts + aborted)) $((total - executed))"
}

run_tests() {
  build_all
  rm -rf "$RESULTS_DIR" && mkdir -p "$RESULTS_DIR"
  local passed=0 failed=0 skipped=0 status=0 p f s
  log "native tests (CTest)"
  if ! ctest --test-dir "$NATIVE_DIR" --output-on-failure --output-junit "$RESULTS_DIR/ctest.xml" >&2; then status=1; fi
  if [ -f "$RESULTS_DIR/ctest.xml" ]; then
    read -r p f s < <(ctest_counts "$RESULTS_DIR/ctest.xml")
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    log "native: $p passed, $f failed, $s skipped"
  else
    log "native: CTest wrote no results"; failed=$((failed + 1)); status=1
  fi
  # Microsoft.Testing.Platform runner (global.json): the same tests also run as a published executable.
  # Eplb.TorchSharp.Tests is its own project so the GPU bundle of Eplb.Tests stays free of libtorch.
  local project name
  for project in Eplb.Tests Eplb.TorchSharp.Tests; do
    name=$([ "$project" = Eplb.Tests ] && echo managed || echo torchsharp)
    log "$name tests (dotnet test $project)"
    if ! dotnet test --project "$ROOT/tests/$project/$project.csproj" -c "$CONFIG" --no-build --no-progress \
        --results-directory "$RESULTS_DIR" --report-trx --report-trx-filename "$name.trx" >&2; then
      status=1
    fi
    if [ -f "$RESULTS_DIR/$name.trx" ]; then
      read -r p f s < <(trx_counts "$RESULTS_DIR/$name.trx")
      passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
      log "$name: $p passed, $f failed, $s skipped"
    else
      log "$name: dotnet test wrote no results"; failed=$((failed + 1)); status=1
    fi
  done
  echo "tests: $passed passed, $failed failed, $skipped skipped"
  if [ "$failed" -ne 0 ]; then status=1; fi
  return $status
}

eplb_cli() {
  "$ROOT/managed/Eplb.Cli/bin/$CONFIG/net10.0/eplb" "$@"
}

command=${1:-build}
[ $# -gt 0 ] && shift
case "$command" in
  build) build_all ;;
  test) run_tests ;;
  run) build_all; log "eplb simulate $*"; eplb_cli simulate "$@" ;;
  eplb) build_all; eplb_cli "$@" ;;
  bindings) dotnet run --project "$ROOT/bindings/generator" -c "$CONFIG" -- --repo "$ROOT" "$@" ;;
  bench) build_all; dotnet run --project "$ROOT/tests/Eplb.Benchmarks" -c Release --no-build -- "$@" ;;
  clean) rm -rf "$BUILD_DIR"; dotnet clean "$ROOT/Eplb.sln" -nologo -v quiet >/dev/null ;;
  *) echo "usage: ./build.sh [build|test|run|eplb|bindings|bench|clean] [args]" >&2; exit 2 ;;
esac
