#!/usr/bin/env bash
# Registers, spills and shared memory per CUDA kernel, from ptxas (-Xptxas -v): compile-time only,
# no GPU needed. Recompiles one .cu of libeplb with the flags of the configured build, for one arch.
#
#   scripts/kernel-registers.sh [SOURCE] [ARCH]     e.g. scripts/kernel-registers.sh routing 90
#
# SOURCE: a file of native/src/cuda (default routing); ARCH: an sm number (default 90);
# EXTRA_FLAGS: more nvcc flags (e.g. -DEPLB_TOPK_MIN_BLOCKS=3).
# Needs a CUDA-configured Ninja build in BUILD_DIR (default build/native; ./build.sh makes one).
# Prints "| kernel | registers | spill stores | spill loads | shared |" rows.
set -euo pipefail
cd "$(dirname "$0")/.."
source_name=${1:-routing}
arch=${2:-90}
build=${BUILD_DIR:-build/native}
object="native/CMakeFiles/eplb.dir/src/cuda/${source_name%.cu}.cu.o"
command=$(ninja -C "$build" -t commands "$object" 2>/dev/null | tail -n 1)
if [ -z "$command" ] || [[ "$command" != *nvcc* ]]; then
  echo "kernel-registers: no nvcc command for $object in $build (configure with CUDA first: ./build.sh)" >&2
  exit 2
fi
# One arch, no object file kept, ptxas verbose.
command=$(sed -E 's/--generate-code=arch=[^ ]*//g; s/ -MD -MT [^ ]* -MF [^ ]*//; s/ -o [^ ]*$/ -o \/dev\/null/' <<<"$command")
log=$(cd "$build" && eval "$command --generate-code=arch=compute_$arch,code=sm_$arch -Xptxas -v ${EXTRA_FLAGS:-}" 2>&1)
echo "| kernel (sm_$arch) | registers | spill stores | spill loads | shared |"
echo "|---|---:|---:|---:|---:|"
awk '
  /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
  /bytes spill stores/ { stores = $5; loads = $9 }
  /Used [0-9]+ registers/ {
    regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
    smem = "0"; if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
    print name "\t" regs "\t" stores "\t" loads "\t" smem
  }' <<<"$log" | c++filt | sed -E 's/\(anonymous namespace\):://g; s/eplb::cuda:://g' |
  awk -F '\t' '{ printf "| `%s` | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
