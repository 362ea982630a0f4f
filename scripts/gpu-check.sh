#!/usr/bin/env bash
# GPU check: on a CUDA machine without dotnet, build libeplb with the local nvcc, run the native
# tests (CUDA vs CPU parity included), the managed GPU tests from a self-contained publish, and
# the kernel benchmarks with their PyTorch peers; print a short table.
#
#   scripts/gpu-check.sh prepare   (on a dev machine with dotnet) publish the managed tests into
#                                  build/gpu-tests.tar.xz, the one file to carry to the GPU machine
#   scripts/gpu-check.sh [run]     (on the GPU machine) build, test, benchmark
#
# Environment: GPU_BUILD_DIR (build/gpu), EPLB_CUDA_ARCHS (90), OUT (a folder for logs and tables),
# SKIP_BENCH=1 to run the tests only.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${GPU_BUILD_DIR:-$ROOT/build/gpu}
OUT=${OUT:-$BUILD/out}
mkdir -p "$OUT"

if [ "${1:-run}" = "prepare" ]; then
  rm -rf "$ROOT/build/gpu-tests"
  dotnet publish "$ROOT/tests/Eplb.Tests" -c Release -r linux-x64 --self-contained -o "$ROOT/build/gpu-tests" -nologo -v quiet
  tar -C "$ROOT/build" -cJf "$ROOT/build/gpu-tests.tar.xz" gpu-tests
  ls -la "$ROOT/build/gpu-tests.tar.xz"
  exit 0
fi

row() { printf '| %-34s | %-8s | %s |\n' "$1" "$2" "$3" | tee -a "$OUT/summary.md"; }
: >"$OUT/summary.md"
printf '| step | result | detail |\n|---|---|---|\n' | tee -a "$OUT/summary.md"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 >"$OUT/device.txt"
row "device" "-" "$(cat "$OUT/device.txt" 2>/dev/null) / nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"

# Build.
if cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DEPLB_REQUIRE_CUDA=ON \
     -DEPLB_CUDA_ARCHS="${EPLB_CUDA_ARCHS:-90}" >"$OUT/configure.log" 2>&1 &&
   cmake --build "$BUILD" --parallel >"$OUT/build.log" 2>&1; then
  row "build (nvcc)" "ok" "$(grep -o 'archs: [^)]*' "$OUT/configure.log" | head -n 1)"
else
  row "build (nvcc)" "FAILED" "see $OUT/build.log"
  tail -n 40 "$OUT/configure.log" "$OUT/build.log"
  exit 1
fi

# Native tests.
ctest --test-dir "$BUILD" --output-on-failure --output-junit "$OUT/ctest.xml" >"$OUT/ctest.log" 2>&1
native_failed=$?
total=$(tr '\n\t' '  ' <"$OUT/ctest.xml" | grep -o '<testsuite [^>]*' | grep -o ' tests="[0-9]*"' | grep -o '[0-9]*')
failed=$(tr '\n\t' '  ' <"$OUT/ctest.xml" | grep -o '<testsuite [^>]*' | grep -o ' failures="[0-9]*"' | grep -o '[0-9]*')
skipped=$(tr '\n\t' '  ' <"$OUT/ctest.xml" | grep -o '<testsuite [^>]*' | grep -o ' skipped="[0-9]*"' | grep -o '[0-9]*')
row "native tests (CTest)" "$([ "$native_failed" = 0 ] && echo ok || echo FAILED)" "$((total - failed - skipped)) passed, $failed failed, $skipped skipped"
grep -E '\*\*\*Failed|Skipped' "$OUT/ctest.log" | head -n 20

# Managed GPU tests from the self-contained publish.
if [ -f "$ROOT/build/gpu-tests.tar.xz" ] && [ ! -d "$ROOT/build/gpu-tests" ]; then
  tar -C "$ROOT/build" -xJf "$ROOT/build/gpu-tests.tar.xz"
fi
if [ -x "$ROOT/build/gpu-tests/Eplb.Tests" ]; then
  EPLB_NATIVE_PATH="$BUILD/lib" "$ROOT/build/gpu-tests/Eplb.Tests" --filter "TestCategory=GPU" \
    --results-directory "$OUT" --report-trx --report-trx-filename managed-gpu.trx >"$OUT/managed.log" 2>&1
  managed_status=$?
  counters=$(tr '\n\t' '  ' <"$OUT/managed-gpu.trx" 2>/dev/null | grep -o '<Counters [^>]*')
  get() { echo "$counters" | grep -o " $1=\"[0-9]*\"" | grep -o '[0-9]*'; }
  row "managed GPU tests" "$([ "$managed_status" = 0 ] && echo ok || echo FAILED)" \
    "$(get passed) passed, $(get failed) failed, $(( $(get total) - $(get executed) )) skipped"
  [ "$managed_status" = 0 ] || tail -n 60 "$OUT/managed.log"
else
  row "managed GPU tests" "not run" "no build/gpu-tests (run 'scripts/gpu-check.sh prepare' where dotnet is, carry build/gpu-tests.tar.xz)"
fi

# Benchmarks: native kernels, then the PyTorch peers on the same GPU.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  for bench in "$BUILD"/bin/eplb_bench_*; do
    [ -x "$bench" ] || continue
    name=$(basename "$bench")
    "$bench" >"$OUT/$name.md" 2>&1
    case $? in
      0) row "$name" "ok" "$OUT/$name.md" ;;
      77) row "$name" "skipped" "$(tail -n 1 "$OUT/$name.md")" ;;
      *) row "$name" "FAILED" "$(tail -n 1 "$OUT/$name.md")" ;;
    esac
    cat "$OUT/$name.md"
  done
  for peer in "$ROOT"/native/bench/peers/*.py; do
    [ -f "$peer" ] || continue
    case $(basename "$peer") in _*) continue ;; esac  # shared modules, not peers
    name=$(basename "$peer" .py)
    if PYTHONUNBUFFERED=1 python3 "$peer" --lib "$BUILD/lib/libeplb.so" >"$OUT/$name.md" 2>&1; then
      row "$name" "ok" "$OUT/$name.md"
    else
      row "$name" "FAILED" "$(tail -n 1 "$OUT/$name.md")"
    fi
    cat "$OUT/$name.md"
  done
fi
echo
cat "$OUT/summary.md"
grep -q "FAILED" "$OUT/summary.md" && exit 1
exit 0
