#!/usr/bin/env bash
# CPU test of scripts/gpu-check.sh (registered with CTest as scripts.gpu_check): argument handling,
# the bundle checker on synthetic bundles, and whole runs against stub commands on PATH (nvcc,
# nvidia-smi, cmake, ctest, python3 and a fake test host in a fake bundle) for the cases a GPU
# machine can meet: everything passes, the build fails, a test fails, a phase runs out of time,
# no bundle, nvcc only under $CUDA_HOME. Prints "N passed, N failed"; exits 1 on any failure.
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")/.." && pwd)/gpu-check.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
passed=0
failed=0

check() {  # check DESCRIPTION COMMAND...: the command must succeed
  local what=$1
  shift
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $what" >&2; fi
}
has() { grep -qF -- "$2" "$1" || { echo "  '$2' not in $1:" >&2; sed 's/^/    /' "$1" >&2; return 1; }; }
lacks() { ! grep -qF -- "$2" "$1" || { echo "  '$2' unexpectedly in $1" >&2; return 1; }; }
status_is() { [ "$1" -eq "$2" ] || { echo "  exit status $1, want $2" >&2; return 1; }; }

# --- Arguments ----------------------------------------------------------------------------------
expect_usage_error() {  # expect_usage_error WHAT ARGS...
  local what=$1 status
  shift
  "$SCRIPT" "$@" >"$WORK/out" 2>&1
  status=$?
  check "$what: exit 2" status_is "$status" 2
  check "$what: says usage" has "$WORK/out" "usage: scripts/gpu-check.sh"
}
expect_usage_error "no command"
expect_usage_error "unknown command" frobnicate
expect_usage_error "run without a results folder" run
expect_usage_error "run with an option for a folder" run --no-bench
expect_usage_error "run with an unknown option" run "$WORK/r" --fast
expect_usage_error "check-bundle without a path" check-bundle
expect_usage_error "prepare with two paths" prepare a b
GPU_CHECK_TESTS_S=soon "$SCRIPT" run "$WORK/r" >"$WORK/out" 2>&1
check "a budget that is not a number: exit 2" status_is $? 2
check "a budget that is not a number: names it" has "$WORK/out" "GPU_CHECK_TESTS_S must be a number"
"$SCRIPT" help >"$WORK/out" 2>&1
check "help: exit 0" status_is $? 0
check "help: names the phases" has "$WORK/out" "1 build"

# --- The bundle checker -------------------------------------------------------------------------
# make_bundle FILE [without NAME] [with NAME] [variant]: a tar.xz of a minimal gpu-tests folder.
make_bundle() {
  local file=$1 stage
  shift
  stage=$(mktemp -d "$WORK/stage.XXXX")
  mkdir -p "$stage/gpu-tests"
  for name in Eplb.Tests Eplb.Tests.dll Eplb.dll libcoreclr.so; do echo "$name" >"$stage/gpu-tests/$name"; done
  printf '{\n  "runtimeOptions": {\n    "configProperties": {\n      "System.Globalization.Invariant": true\n    }\n  }\n}\n' \
    >"$stage/gpu-tests/Eplb.Tests.runtimeconfig.json"
  while [ $# -gt 0 ]; do
    case $1 in
      without) rm -f "$stage/gpu-tests/$2"; shift 2 ;;
      with) echo x >"$stage/gpu-tests/$2"; shift 2 ;;
      icu) sed -i 's/true/false/' "$stage/gpu-tests/Eplb.Tests.runtimeconfig.json"; shift ;;
      big) head -c $((17 * 1024 * 1024)) /dev/urandom >"$stage/gpu-tests/blob"; shift ;;
    esac
  done
  tar -C "$stage" -cJf "$file" gpu-tests
}
expect_bundle() {  # expect_bundle WHAT STATUS NEEDLE MAKE-ARGS...
  local what=$1 want=$2 needle=$3 status
  shift 3
  make_bundle "$WORK/b.tar.xz" "$@"
  "$SCRIPT" check-bundle "$WORK/b.tar.xz" >"$WORK/out" 2>&1
  status=$?
  check "bundle $what: exit $want" status_is "$status" "$want"
  check "bundle $what: says '$needle'" has "$WORK/out" "$needle"
}
expect_bundle "complete" 0 "bundle ok"
expect_bundle "with a stale libeplb.so" 1 "holds libeplb.so" with libeplb.so
expect_bundle "with SkiaSharp" 1 "holds libSkiaSharp.so" with libSkiaSharp.so
expect_bundle "with symbols" 1 "holds .pdb files" with Eplb.Tests.pdb
expect_bundle "without the test host" 1 "missing gpu-tests/Eplb.Tests" without Eplb.Tests
expect_bundle "needing libicu" 1 "invariant globalization" icu
expect_bundle "of 17 MiB" 1 "not under 16 MiB" big
"$SCRIPT" check-bundle "$WORK/none.tar.xz" >"$WORK/out" 2>&1
check "missing bundle: exit 1" status_is $? 1

# --- Runs against stubs -------------------------------------------------------------------------
STUBS=$WORK/stubs
mkdir -p "$STUBS/bin" "$STUBS/cuda/bin" "$STUBS/site/nvidia/nccl/lib"
touch "$STUBS/site/nvidia/nccl/lib/libnccl.so.2"
stub() { cat >"$STUBS/$1"; chmod +x "$STUBS/$1"; }
stub bin/nvcc <<'EOF'
#!/bin/sh
echo "Cuda compilation tools, release 13.0, V13.0.88"
EOF
cp "$STUBS/bin/nvcc" "$STUBS/cuda/bin/nvcc"
stub bin/nvidia-smi <<'EOF'
#!/bin/sh
echo "NVIDIA H200, 570.86, 143771 MiB"
EOF
# cmake: configure records CUDACXX and prints what CMake would; --build makes libeplb.so and one
# benchmark that prints a heading with the copy bandwidth and a table. STUB_BUILD=fail fails it.
stub bin/cmake <<'EOF'
#!/bin/bash
if [ "$1" = "--build" ]; then
  [ "${STUB_BUILD:-ok}" = fail ] && { echo "routing.cu(12): error: identifier undefined"; exit 1; }
  mkdir -p "$2/lib" "$2/bin"
  touch "$2/lib/libeplb.so"
  printf '#!/bin/sh\necho "# routing benchmark on NVIDIA H200; copy bandwidth 4012 GB/s"\necho "| op | us |"\necho "|---|---:|"\necho "| hash | 3.1 |"\n' >"$2/bin/eplb_bench_routing"
  chmod +x "$2/bin/eplb_bench_routing"
  exit 0
fi
echo "${CUDACXX:-unset}" >"$STUB_LOG/cudacxx"
echo "-- eplb: CUDA 13.0.88 at $CUDACXX, host compiler /usr/bin/c++"
echo "-- eplb 0.1.0: CUDA backend ON (archs: 90)"
EOF
# ctest: writes a JUnit file; STUB_CTEST=fail has one failure, hang outlives any budget.
stub bin/ctest <<'EOF'
#!/bin/bash
junit=""
while [ $# -gt 0 ]; do [ "$1" = "--output-junit" ] && junit=$2; shift; done
[ "${STUB_CTEST:-pass}" = hang ] && sleep 60
failures=0; [ "${STUB_CTEST:-pass}" = fail ] && failures=1
printf '<?xml version="1.0"?>\n<testsuite name="eplb" tests="3" failures="%s" disabled="0" skipped="0">\n</testsuite>\n' "$failures" >"$junit"
[ "$failures" -eq 0 ]
EOF
# python3: the site-packages query, else a peer printing its heading (with the matmul rate) and a table.
stub bin/python3 <<'EOF'
#!/bin/bash
if [ "$1" = "-c" ]; then echo "$STUB_SITE"; exit 0; fi
echo "# Mega MoE vs PyTorch on NVIDIA H200 (torch 2.11); copy 4010 GB/s, bf16 matmul 905 TFLOP/s"
echo "| layer | us |"
echo "|---|---:|"
echo "| V3 | 12.5 |"
EOF
# The fake bundle's test host records what the script handed it and writes a TRX file.
make_fake_host() {
  local stage
  stage=$(mktemp -d "$WORK/host.XXXX")
  mkdir -p "$stage/gpu-tests"
  cat >"$stage/gpu-tests/Eplb.Tests" <<'EOF'
#!/bin/bash
dir=""; name=""
while [ $# -gt 0 ]; do
  case $1 in --results-directory) dir=$2 ;; --report-trx-filename) name=$2 ;; esac
  shift
done
echo "$EPLB_NATIVE_PATH" >"$STUB_LOG/native_path"
echo "${EPLB_NCCL_PATH:-unset}" >"$STUB_LOG/nccl_path"
printf '<TestRun><ResultSummary><Counters total="5" executed="4" passed="4" failed="0" error="0" /></ResultSummary></TestRun>\n' >"$dir/$name"
EOF
  chmod +x "$stage/gpu-tests/Eplb.Tests"
  tar -C "$stage" -cJf "$WORK/fake-bundle.tar.xz" gpu-tests
}
make_fake_host

# gpu_run NAME [VAR=VALUE ...]: a run with the stubs first on PATH; results in $WORK/NAME.
gpu_run() {
  local name=$1
  shift
  mkdir -p "$WORK/$name.log"
  env -u CUDACXX -u CUDAHOSTCXX PATH="$STUBS/bin:$PATH" STUB_LOG="$WORK/$name.log" STUB_SITE="$STUBS/site" GPU_BUILD_DIR="$WORK/$name.build" \
    GPU_CHECK_BUNDLE="$WORK/fake-bundle.tar.xz" "$@" "$SCRIPT" run "$WORK/$name" >"$WORK/$name.out" 2>&1
}

gpu_run pass
check "all pass: exit 0" status_is $? 0
for phase in build tests bench; do check "all pass: $phase ok" has "$WORK/pass/summary.md" "| $phase | ok |"; done
check "all pass: CTest counted" has "$WORK/pass/summary.md" "3 passed, 0 failed, 0 skipped"
check "all pass: managed counted" has "$WORK/pass/summary.md" "4 passed, 0 failed, 1 skipped"
check "all pass: the GPU named" has "$WORK/pass/summary.md" "NVIDIA H200, 570.86"
check "all pass: nvcc named" has "$WORK/pass/summary.md" "release 13.0"
check "all pass: CUDACXX is the nvcc on PATH" has "$WORK/pass.log/cudacxx" "$STUBS/bin/nvcc"
check "all pass: the fresh libeplb.so is used" has "$WORK/pass.log/native_path" "$WORK/pass.build/lib/libeplb.so"
check "all pass: NCCL from the wheel" has "$WORK/pass.log/nccl_path" "$STUBS/site/nvidia/nccl/lib/libnccl.so.2"
check "all pass: tables dated" has "$WORK/pass/benchmarks.md" "- date: "
check "all pass: tables name the command" has "$WORK/pass/benchmarks.md" "scripts/gpu-check.sh run $WORK/pass"
check "all pass: copy bandwidth of the run" has "$WORK/pass/benchmarks.md" "copy bandwidth (device to device, this run): 4012 GB/s"
check "all pass: matmul rate of the run" has "$WORK/pass/benchmarks.md" "bf16 matmul (torch.matmul, this run): 905 TFLOP/s"
check "all pass: native table kept" has "$WORK/pass/benchmarks.md" "| hash | 3.1 |"
check "all pass: peer table kept" has "$WORK/pass/benchmarks.md" "| V3 | 12.5 |"
check "all pass: printed summary" has "$WORK/pass.out" "| bench | ok |"

# A PATH with the stubs and the system tools the script uses, but no nvcc (this machine may have
# one in /usr/bin).
mkdir -p "$STUBS/no-nvcc"
for tool in "$STUBS"/bin/*; do [ "$(basename "$tool")" = nvcc ] || ln -s "$tool" "$STUBS/no-nvcc/"; done
for name in bash sh env tar xz awk grep sed head tail tr cut wc date mkdir rm cat ls sort find dirname basename \
            stat timeout nproc git sleep mktemp touch chmod mv cp; do
  tool=$(command -v "$name") && [ ! -e "$STUBS/no-nvcc/$name" ] && ln -s "$tool" "$STUBS/no-nvcc/$name"
done
gpu_run nopath PATH="$STUBS/no-nvcc" CUDA_HOME="$STUBS/cuda"
check "nvcc under CUDA_HOME: CUDACXX set to it" has "$WORK/nopath.log/cudacxx" "$STUBS/cuda/bin/nvcc"

gpu_run buildfail STUB_BUILD=fail
check "build fails: exit 1" status_is $? 1
check "build fails: build FAILED" has "$WORK/buildfail/summary.md" "| build | FAILED |"
check "build fails: the compiler error shown" has "$WORK/buildfail/summary.md" "identifier undefined"
check "build fails: tests not run" has "$WORK/buildfail/summary.md" "| tests | all | not run | the build failed |"
check "build fails: no benchmark tables" lacks "$WORK/buildfail/summary.md" "| bench | ok |"

gpu_run testfail STUB_CTEST=fail
check "a test fails: exit 1" status_is $? 1
check "a test fails: tests FAILED" has "$WORK/testfail/summary.md" "| tests | FAILED |"
check "a test fails: counted" has "$WORK/testfail/summary.md" "2 passed, 1 failed, 0 skipped"
check "a test fails: benchmarks still run" has "$WORK/testfail/summary.md" "| bench | ok |"

gpu_run hang STUB_CTEST=hang GPU_CHECK_TESTS_S=33
check "tests run out of time: exit 1" status_is $? 1
check "tests run out of time: TIMEOUT" has "$WORK/hang/summary.md" "| tests | native (CTest) | TIMEOUT |"
check "tests run out of time: the summary of the build stands" has "$WORK/hang/summary.md" "| build | ok |"

gpu_run nobundle GPU_CHECK_BUNDLE="$WORK/missing.tar.xz"
check "no bundle: exit 1" status_is $? 1
check "no bundle: says what to run" has "$WORK/nobundle/summary.md" "scripts/gpu-check.sh prepare"

env -u CUDACXX PATH="$STUBS/bin:$PATH" STUB_LOG="$WORK/pass.log" STUB_SITE="$STUBS/site" GPU_BUILD_DIR="$WORK/nb.build" \
  GPU_CHECK_BUNDLE="$WORK/fake-bundle.tar.xz" "$SCRIPT" run "$WORK/nb" --no-bench >"$WORK/nb.out" 2>&1
check "--no-bench: exit 0" status_is $? 0
check "--no-bench: bench skipped" has "$WORK/nb/summary.md" "| bench | all | skipped | --no-bench |"

echo "gpu-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
