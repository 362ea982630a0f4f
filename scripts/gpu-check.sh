#!/usr/bin/env bash
# GPU check: the whole proof of the CUDA half in one call on a bare CUDA machine (nvcc, CMake,
# Python with PyTorch and the NCCL wheel; no dotnet, no network).
#
#   scripts/gpu-check.sh prepare [BUNDLE]        where dotnet is: publish the managed tests
#                                                (self-contained, invariant globalization, trimmed
#                                                framework) into BUNDLE (build/gpu-tests.tar.xz),
#                                                the one file to carry; checked as check-bundle does
#   scripts/gpu-check.sh run RESULTS [--no-bench]
#                                                on the GPU machine, three phases, each under its own
#                                                time budget and each followed by the summary:
#       1 build  configure and build libeplb, the native tests and benchmarks with the local nvcc
#       2 tests  CTest (CUDA vs CPU) and the managed GPU tests from the bundle
#       3 bench  the native benchmarks and the PyTorch peers on the same GPU
#   scripts/gpu-check.sh check-bundle BUNDLE     the bundle's size (< 16 MiB) and contents
#
# RESULTS receives summary.md (rewritten after every phase, so a run cut short still says what it
# proved), benchmarks.md (the tables for docs/benchmarks.md under the date, GPU, command, copy
# bandwidth and bf16 matmul rate of this run) and every log. Exit status: 0 when every step passed,
# 1 when any step failed or ran out of time, 2 on bad usage.
#
# Budgets in seconds: GPU_CHECK_BUILD_S (150), GPU_CHECK_TESTS_S (90), GPU_CHECK_BENCH_S (240): build
# and tests within 4 minutes, everything within 8, on an H200. Also: GPU_BUILD_DIR (build/gpu),
# EPLB_CUDA_ARCHS (90), GPU_CHECK_BUNDLE (build/gpu-tests.tar.xz), GPU_CHECK_CTEST_JOBS (4), CUDACXX
# (else nvcc from PATH, $CUDA_HOME/bin, /usr/local/cuda/bin or the newest /usr/local/cuda-*/bin).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE_LIMIT=$((16 * 1024 * 1024))
COMMAND_LINE="scripts/gpu-check.sh $*"

usage_error() {
  echo "gpu-check: $*" >&2
  echo "usage: scripts/gpu-check.sh prepare [BUNDLE] | run RESULTS [--no-bench] | check-bundle BUNDLE | help" >&2
  exit 2
}

# --- The bundle -------------------------------------------------------------------------------------

# Files the GPU run needs none of: libeplb.so (the run builds its own; a stale copy could shadow it),
# the plotting natives (SkiaSharp/HarfBuzz: no GPU test draws), zip/brotli (no GPU test compresses),
# debugger, tracing and alternative-GC support, symbols and XML docs. Native files may go (the host
# loads them on first use); managed assemblies stay, as the host checks them against deps.json.
PRUNED=(libeplb.so libSkiaSharp.so libHarfBuzzSharp.so libSystem.IO.Compression.Native.so libmscordaccore.so
        libmscordbi.so createdump libcoreclrtraceptprovider.so libclrgc.so libclrgcexp.so)

check_bundle() {
  local bundle=$1 bytes listing problems=() name config
  [ -f "$bundle" ] || { echo "check-bundle: $bundle does not exist" >&2; return 1; }
  bytes=$(stat -c %s "$bundle")
  listing=$(tar -tJf "$bundle" 2>/dev/null) || { echo "check-bundle: $bundle is not a tar.xz archive" >&2; return 1; }
  [ "$bytes" -lt "$BUNDLE_LIMIT" ] || problems+=("$bytes bytes, not under 16 MiB")
  for name in gpu-tests/Eplb.Tests gpu-tests/Eplb.Tests.dll gpu-tests/Eplb.dll gpu-tests/libcoreclr.so \
              gpu-tests/Eplb.Tests.runtimeconfig.json; do
    grep -qx "$name" <<<"$listing" || problems+=("missing $name")
  done
  for name in "${PRUNED[@]}"; do
    grep -q "/$name\$" <<<"$listing" && problems+=("holds $name")
  done
  grep -qE '\.pdb$' <<<"$listing" && problems+=("holds .pdb files")
  grep -qvE '^gpu-tests(/|$)' <<<"$listing" && problems+=("holds files outside gpu-tests/")
  config=$(tar -xJOf "$bundle" gpu-tests/Eplb.Tests.runtimeconfig.json 2>/dev/null)
  grep -q '"System.Globalization.Invariant": true' <<<"$config" ||
    problems+=("the test host is not in invariant globalization mode (it would need libicu)")
  if [ ${#problems[@]} -gt 0 ]; then
    printf 'check-bundle: %s: %s\n' "$bundle" "${problems[@]}" >&2
    return 1
  fi
  echo "bundle ok: $bundle, $(wc -l <<<"$listing") entries, $((bytes / 1024)) KiB"
}

prepare() {
  local bundle=${1:-$ROOT/build/gpu-tests.tar.xz} stage name
  command -v dotnet >/dev/null || { echo "gpu-check prepare: dotnet is needed (run it on a development machine)" >&2; return 2; }
  stage=$(mktemp -d)
  # Trimming touches only the framework (TrimMode=partial): the test assemblies stay whole for
  # NUnit's reflection. Every bin/ and obj/ of the publish lives under the stage (--artifacts-path):
  # the properties below reach the referenced projects too, and must not rebuild the checkout's
  # own outputs with them.
  if ! dotnet publish "$ROOT/tests/Eplb.Tests" -c Release -r linux-x64 --self-contained -o "$stage/gpu-tests" \
      --artifacts-path "$stage/artifacts" -nologo -v quiet -p:InvariantGlobalization=true -p:SatelliteResourceLanguages=en -p:PublishTrimmed=true \
      -p:TrimMode=partial -p:SuppressTrimAnalysisWarnings=true -p:DebuggerSupport=false \
      -p:EventSourceSupport=false -p:UseSystemResourceKeys=true -p:HttpActivityPropagationSupport=false \
      -p:MetadataUpdaterSupport=false -p:NullabilityInfoContextSupport=false \
      -p:XmlResolverIsNetworkingEnabledByDefault=false >&2; then
    rm -rf "$stage"
    echo "gpu-check prepare: dotnet publish failed" >&2
    return 1
  fi
  for name in "${PRUNED[@]}"; do rm -f "$stage/gpu-tests/$name"; done
  find "$stage/gpu-tests" \( -name '*.pdb' -o -name '*.xml' \) -delete
  mkdir -p "$(dirname "$bundle")"
  tar -C "$stage" -cf - gpu-tests | xz -9 -T0 >"$bundle.tmp" && mv "$bundle.tmp" "$bundle"
  rm -rf "$stage"
  check_bundle "$bundle"
}

# --- The run ----------------------------------------------------------------------------------------

RESULTS=""
STEPS=""        # results/steps.tsv: phase, step, result, detail
PHASES=""       # results/phases.tsv: phase, result, seconds, budget
HEADER=""       # results/header.md

step() {  # step PHASE NAME RESULT DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"
}

write_summary() {
  {
    cat "$HEADER"
    echo
    echo "| phase | result | seconds | budget |"
    echo "|---|---|---:|---:|"
    awk -F '\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$PHASES"
    echo
    echo "| phase | step | result | detail |"
    echo "|---|---|---|---|"
    awk -F '\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$STEPS"
  } >"$RESULTS/summary.md"
  echo
  cat "$RESULTS/summary.md"
}

# Runs a command under the phase's remaining time; its output goes to LOG. Returns its status,
# 124 on time-out and 125 when the phase had no time left to start it.
PHASE_START=0
PHASE_BUDGET=0
remaining() { echo $((PHASE_BUDGET - (SECONDS - PHASE_START))); }
timed() {
  local log=$1 left
  shift
  left=$(remaining)
  [ "$left" -gt 0 ] || return 125
  timeout --kill-after=10 "$left" "$@" >"$log" 2>&1
}

verdict() {  # the result word for a status of timed
  case $1 in
    0) echo ok ;;
    77) echo skipped ;;
    124 | 137) echo TIMEOUT ;;
    125) echo "not run" ;;
    *) echo FAILED ;;
  esac
}

begin_phase() { PHASE_START=$SECONDS; PHASE_BUDGET=$2; echo "== phase $1 (budget ${2}s)" >&2; }
end_phase() {  # end_phase NAME
  local result=ok
  if awk -F '\t' -v p="$1" '$1 == p && ($3 == "FAILED" || $3 == "TIMEOUT" || $3 == "not run")' "$STEPS" | grep -q .; then
    result=FAILED
  fi
  printf '%s\t%s\t%s\t%s\n' "$1" "$result" $((SECONDS - PHASE_START)) "$PHASE_BUDGET" >>"$PHASES"
  write_summary
}

# Value of attribute $3 on the first <$2 ...> element of XML file $1 (0 when absent).
xml_attr() {
  local value
  value=$(tr '\n\t' '  ' <"$1" | grep -o "<$2 [^>]*" | head -n 1 | grep -o " $3=\"[0-9]*\"" | grep -o '[0-9]*' || true)
  echo "${value:-0}"
}

find_nvcc() {
  local candidate
  if [ -n "${CUDACXX:-}" ]; then echo "$CUDACXX"; return; fi
  if command -v nvcc >/dev/null; then command -v nvcc; return; fi
  for candidate in "${CUDA_HOME:-}/bin/nvcc" "${CUDA_PATH:-}/bin/nvcc" /usr/local/cuda/bin/nvcc \
                   $(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V -r); do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
}

# libnccl.so.2 of the NCCL pip wheel (nvidia-nccl-cu13 puts it under site-packages/nvidia/...).
find_nccl() {
  local dir
  command -v python3 >/dev/null || return 0
  while read -r dir; do
    [ -d "$dir/nvidia" ] || continue
    find "$dir/nvidia" -name 'libnccl.so.2' -print -quit 2>/dev/null
  done < <(python3 -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null) |
    head -n 1
}

run_build() {
  local nvcc status generator=()
  begin_phase build "${GPU_CHECK_BUILD_S:-150}"
  nvcc=$(find_nvcc)
  if [ -z "$nvcc" ]; then
    step build nvcc FAILED "no nvcc on PATH, in \$CUDA_HOME/bin or /usr/local/cuda*/bin; set CUDACXX"
    end_phase build
    return 1
  fi
  export CUDACXX=$nvcc
  if [ -z "${CUDAHOSTCXX:-}" ] && "$nvcc" --version 2>/dev/null | grep -q "release 11\." && command -v g++-11 >/dev/null; then
    export CUDAHOSTCXX=g++-11
  fi
  command -v ninja >/dev/null && generator=(-G Ninja)
  timed "$RESULTS/configure.log" cmake -S "$ROOT" -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DEPLB_REQUIRE_CUDA=ON -DEPLB_CUDA_ARCHS="$ARCHS"
  status=$?
  if [ "$status" -ne 0 ]; then
    step build configure "$(verdict "$status")" "CUDACXX=$CUDACXX; $(tail -n 3 "$RESULTS/configure.log" | tr '\n|' '  ')"
    end_phase build
    return 1
  fi
  step build configure ok "$(grep -o 'CUDA [0-9.]* at [^,]*' "$RESULTS/configure.log" | head -n 1); $(grep -o 'archs: [^)]*' "$RESULTS/configure.log" | head -n 1)"
  timed "$RESULTS/build.log" cmake --build "$BUILD" --parallel "$(nproc)"
  status=$?
  if [ "$status" -ne 0 ]; then
    step build compile "$(verdict "$status")" "$(grep -m 1 -E 'error|FAILED' "$RESULTS/build.log" | tr '|' ' ' | cut -c1-200)"
    end_phase build
    return 1
  fi
  step build compile ok "$BUILD/lib/libeplb.so"
  end_phase build
}

run_tests() {
  local status tests failures skipped disabled bundle nccl left
  begin_phase tests "${GPU_CHECK_TESTS_S:-90}"
  # CTest gets all but the last 30 s of the phase, which the managed tests need at least.
  left=$(( $(remaining) - 30 ))
  PHASE_BUDGET_SAVED=$PHASE_BUDGET
  PHASE_BUDGET=$((PHASE_BUDGET - 30))
  # The scripts.* tests check this script itself on the CPU; the GPU run has better use for its time.
  timed "$RESULTS/ctest.log" ctest --test-dir "$BUILD" -j "${GPU_CHECK_CTEST_JOBS:-4}" --timeout 120 -E '^scripts\.' \
    --output-on-failure --output-junit "$RESULTS/ctest.xml"
  status=$?
  PHASE_BUDGET=$PHASE_BUDGET_SAVED
  if [ -f "$RESULTS/ctest.xml" ]; then
    tests=$(xml_attr "$RESULTS/ctest.xml" testsuite tests); failures=$(xml_attr "$RESULTS/ctest.xml" testsuite failures)
    skipped=$(xml_attr "$RESULTS/ctest.xml" testsuite skipped); disabled=$(xml_attr "$RESULTS/ctest.xml" testsuite disabled)
    step tests "native (CTest)" "$(verdict "$status")" \
      "$((tests - failures - skipped - disabled)) passed, $failures failed, $((skipped + disabled)) skipped"
  else
    [ "$status" -eq 0 ] && status=1
    step tests "native (CTest)" "$(verdict "$status")" "no results (budget ${left}s); see ctest.log"
  fi
  grep -E '\*\*\*Failed|\*\*\*Timeout|\(Failed\)|\(Timeout\)' "$RESULTS/ctest.log" 2>/dev/null | head -n 20 >&2

  bundle=${GPU_CHECK_BUNDLE:-$ROOT/build/gpu-tests.tar.xz}
  if [ ! -f "$bundle" ]; then
    step tests "managed GPU tests" FAILED "no $bundle: run 'scripts/gpu-check.sh prepare' where dotnet is and carry it"
  else
    # Always from the bundle just carried: never a leftover extraction.
    rm -rf "$BUILD/gpu-tests"
    mkdir -p "$BUILD"
    tar -C "$BUILD" -xJf "$bundle"
    nccl=$(find_nccl)
    if [ -n "$nccl" ]; then
      export EPLB_NCCL_PATH=$nccl LD_LIBRARY_PATH="$(dirname "$nccl")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    EPLB_NATIVE_PATH="$BUILD/lib/libeplb.so" timed "$RESULTS/managed.log" "$BUILD/gpu-tests/Eplb.Tests" \
      --filter "TestCategory=GPU" --results-directory "$RESULTS" --report-trx --report-trx-filename managed-gpu.trx
    status=$?
    if [ -f "$RESULTS/managed-gpu.trx" ]; then
      local total executed passed failed
      total=$(xml_attr "$RESULTS/managed-gpu.trx" Counters total); executed=$(xml_attr "$RESULTS/managed-gpu.trx" Counters executed)
      passed=$(xml_attr "$RESULTS/managed-gpu.trx" Counters passed); failed=$(xml_attr "$RESULTS/managed-gpu.trx" Counters failed)
      step tests "managed GPU tests" "$(verdict "$status")" \
        "$passed passed, $failed failed, $((total - executed)) skipped; NCCL: ${nccl:-not found}"
    else
      [ "$status" -eq 0 ] && status=1
      step tests "managed GPU tests" "$(verdict "$status")" "no results; see managed.log"
    fi
  fi
  end_phase tests
}

run_bench() {
  local bench peer name status
  begin_phase bench "${GPU_CHECK_BENCH_S:-240}"
  for bench in "$BUILD"/bin/eplb_bench_*; do
    [ -x "$bench" ] || continue
    name=$(basename "$bench")
    timed "$RESULTS/$name.md" "$bench"
    status=$?
    step bench "$name" "$(verdict "$status")" "$name.md"
  done
  for peer in "$ROOT"/native/bench/peers/*.py; do
    [ -f "$peer" ] || continue
    case $(basename "$peer") in _*) continue ;; esac  # shared modules, not peers
    name=$(basename "$peer" .py)
    PYTHONUNBUFFERED=1 timed "$RESULTS/$name.md" python3 "$peer" --lib "$BUILD/lib/libeplb.so"
    status=$?
    step bench "$name" "$(verdict "$status")" "$name.md"
  done
  # Registers per routing kernel as this nvcc compiles them (compile-time only; Ninja builds).
  if [ -f "$BUILD/build.ninja" ]; then
    BUILD_DIR=$BUILD timed "$RESULTS/registers.md" "$ROOT/scripts/kernel-registers.sh" routing "${ARCHS%%;*}"
    status=$?
    step bench "routing registers" "$(verdict "$status")" "registers.md"
  fi
  write_benchmarks
  end_phase bench
}

# benchmarks.md: what docs/benchmarks.md takes from this run, under the facts that date it.
write_benchmarks() {
  local copy matmul file
  copy=$(grep -ho 'copy bandwidth [0-9]* GB/s' "$RESULTS"/eplb_bench_*.md 2>/dev/null | head -n 1 | grep -o '[0-9]* GB/s')
  matmul=$(grep -ho 'bf16 matmul [0-9]* TFLOP/s' "$RESULTS"/*_peer.md 2>/dev/null | head -n 1 | grep -o '[0-9]* TFLOP/s')
  {
    cat "$HEADER"
    echo "- copy bandwidth (device to device, this run): ${copy:-not measured}"
    echo "- bf16 matmul (torch.matmul, this run): ${matmul:-not measured}"
    for file in "$RESULTS"/eplb_bench_*.md "$RESULTS"/*_peer.md "$RESULTS"/registers.md; do
      [ -f "$file" ] || continue
      echo
      echo "### $(basename "$file" .md)"
      echo
      cat "$file"
    done
  } >"$RESULTS/benchmarks.md"
}

run() {
  local bench=1 arg device failed
  [ $# -ge 1 ] || usage_error "run needs a results folder"
  case $1 in -*) usage_error "run needs a results folder before any option (got $1)" ;; esac
  RESULTS=$1
  shift
  for arg in "$@"; do
    case $arg in
      --no-bench) bench=0 ;;
      *) usage_error "unknown option for run: $arg" ;;
    esac
  done
  for var in GPU_CHECK_BUILD_S GPU_CHECK_TESTS_S GPU_CHECK_BENCH_S GPU_CHECK_CTEST_JOBS; do
    [[ "${!var:-1}" =~ ^[0-9]+$ ]] || usage_error "$var must be a number of seconds (got ${!var})"
  done
  mkdir -p "$RESULTS" || usage_error "cannot create $RESULTS"
  RESULTS=$(cd "$RESULTS" && pwd)
  BUILD=${GPU_BUILD_DIR:-$ROOT/build/gpu}
  ARCHS=${EPLB_CUDA_ARCHS:-90}
  STEPS=$RESULTS/steps.tsv; PHASES=$RESULTS/phases.tsv; HEADER=$RESULTS/header.md
  : >"$STEPS"; : >"$PHASES"
  device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
  {
    echo "# GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- GPU: ${device:-no nvidia-smi answer}"
    echo "- nvcc: $("$(find_nvcc)" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- command: \`$COMMAND_LINE\`"
  } >"$HEADER"

  if run_build; then
    run_tests
    if [ "$bench" -eq 1 ]; then run_bench; else step bench all skipped "--no-bench"; write_summary; fi
  else
    step tests all "not run" "the build failed"
    [ "$bench" -eq 1 ] && step bench all "not run" "the build failed"
    write_summary
  fi
  failed=$(awk -F '\t' '$3 == "FAILED" || $3 == "TIMEOUT" || $3 == "not run"' "$STEPS" | wc -l)
  [ "$failed" -eq 0 ] || { echo "gpu-check: $failed step(s) did not pass; see $RESULTS/summary.md" >&2; return 1; }
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  prepare) [ $# -le 1 ] || usage_error "prepare takes at most a bundle path"; prepare "$@" ;;
  run) run "$@" ;;
  check-bundle) [ $# -eq 1 ] || usage_error "check-bundle takes the bundle path"; check_bundle "$1" ;;
  help | -h | --help) sed -n '2,26p' "$0" | sed -E 's/^# ?//' ;;
  "") usage_error "no command" ;;
  *) usage_error "unknown command: $command" ;;
esac
