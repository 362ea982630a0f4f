#!/usr/bin/env bash
# CPU test of the real bundle (registered with CTest as scripts.gpu_bundle): `gpu-check.sh prepare`
# publishes the managed tests without touching the checkout's bin/ and obj/, and the result must
# pass check-bundle (under 16 MiB, no libeplb.so,
# no plotting natives, no symbols, invariant globalization) and its test host must start here and
# run the GPU category against this build's libeplb (every test skips without a device; none may
# fail). Skipped (77) where dotnet is missing.
#
#   scripts/tests/gpu-bundle-test.sh LIBEPLB
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LIBEPLB=${1:?usage: gpu-bundle-test.sh PATH/TO/libeplb.so}
command -v dotnet >/dev/null || { echo "skipped: no dotnet here"; exit 77; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

touch "$WORK/before"
sleep 1
"$ROOT/scripts/gpu-check.sh" prepare "$WORK/gpu-tests.tar.xz" || { echo "FAILED: prepare"; exit 1; }
# prepare builds in a folder of its own: the checkout's bin/ and obj/ stay as they were.
touched=$(find "$ROOT/managed" "$ROOT/tests" "$ROOT/bindings" \( -path '*/bin/*' -o -path '*/obj/*' \) \
          -newer "$WORK/before" -print 2>/dev/null | head -n 5)
if [ -n "$touched" ]; then
  echo "FAILED: prepare changed the checkout's build outputs, e.g.:"
  echo "$touched"
  exit 1
fi
tar -C "$WORK" -xJf "$WORK/gpu-tests.tar.xz"
EPLB_NATIVE_PATH="$LIBEPLB" timeout 600 "$WORK/gpu-tests/Eplb.Tests" \
  --filter "TestCategory=GPU" --results-directory "$WORK/results" --report-trx --report-trx-filename gpu.trx \
  >"$WORK/host.log" 2>&1
status=$?
counters=$(grep -o '<Counters [^>]*' "$WORK/results/gpu.trx" 2>/dev/null)
total=$(grep -o ' total="[0-9]*"' <<<"$counters" | grep -o '[0-9]*')
failed=$(grep -o ' failed="[0-9]*"' <<<"$counters" | grep -o '[0-9]*')
if [ "$status" -ne 0 ] || [ "${total:-0}" -eq 0 ] || [ "${failed:-1}" -ne 0 ]; then
  tail -n 30 "$WORK/host.log"
  echo "FAILED: the bundled test host (exit $status, total ${total:-?}, failed ${failed:-?})"
  exit 1
fi
echo "bundle test host ran the GPU category: $total tests, 0 failed"
