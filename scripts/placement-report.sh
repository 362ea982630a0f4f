#!/usr/bin/env bash
# Placement goal figures on the real SGLang DeepSeek-V3 dumps (issue 3), as markdown tables, using
# `eplb plan` exactly as a user would:
#   1. deepseek (hierarchical, 4 nodes x 8 GPUs, R = 288) against locality (same layout), per file;
#   2. deepseek global at 40 GPUs (R = 320: 288 is not a multiple of 40) and 72 GPUs (R = 288);
#   3. incremental on consecutive files (name order): the locality plan of the old load is in
#      force, the new load arrives; the fresh locality plan (slot-preserved) against incremental.
#
#   scripts/placement-report.sh [DATA_DIR]     (builds first with ./build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/load-data/sglang-deepseek-v3-r1}
./build.sh >/dev/null
EPLB=managed/Eplb.Cli/bin/Release/net10.0/eplb
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# plan OUT ARGS... -> "balancedness node_local slots_changed worst_layer" (4 decimals, from the file)
plan() {
  local out=$1; shift
  local changed
  changed=$("$EPLB" plan --groups 8 --out "$out" "$@" | awk '/^slots changed/ { print $3 }')
  tr -d '\n' <"$out" | awk -v changed="$changed" '
    function field(key,   m) { match($0, "\"" key "\":[^,\\]}]*"); m = substr($0, RSTART, RLENGTH); sub(/.*:/, "", m); return m }
    {
      match($0, /"balancedness_per_layer":\[[^\]]*\]/); per = substr($0, RSTART + 26, RLENGTH - 27)
      n = split(per, v, ","); worst = 1; for (i = 1; i <= n; i++) if (v[i] + 0 < worst) worst = v[i] + 0
      printf "%.4f %.4f %s %.3f\n", field("balancedness"), field("node_local_fraction"), changed, worst
    }'
}

files=$(ls "$DATA"/*.json | sort)

echo "| file | deepseek hierarchical (worst layer) | locality balancedness (worst layer) | locality node-local | deepseek global 40 GPUs | deepseek global 72 GPUs |"
echo "|---|---:|---:|---:|---:|---:|"
for f in $files; do
  name=$(basename "$f" .json)
  read -r hb _ _ hw < <(plan "$WORK/h.json" --load "$f" --slots 288 --nodes 4 --ranks 32)
  read -r lb ln _ lw < <(plan "$WORK/l.json" --load "$f" --slots 288 --nodes 4 --ranks 32 --policy locality)
  read -r g40 _ _ _ < <(plan "$WORK/g40.json" --load "$f" --slots 320 --nodes 5 --ranks 40)
  read -r g72 _ _ _ < <(plan "$WORK/g72.json" --load "$f" --slots 288 --nodes 9 --ranks 72)
  echo "| $name | $hb ($hw) | $lb ($lw) | $ln | $g40 | $g72 |"
done

# Incremental on consecutive files, for the hierarchical layout and the two global ones.
for layout in "288 4 32" "320 5 40" "288 9 72"; do
  read -r R NODES GPUS <<<"$layout"
  echo
  echo "Incremental, R = $R, $GPUS GPUs in $NODES nodes (reference: the fresh locality plan):"
  echo
  echo "| old load -> new load | old placement on new load | fresh: balancedness, slots changed | incremental: balancedness, slots changed | changed / fresh | gap |"
  echo "|---|---:|---:|---:|---:|---:|"
  prev=""
  for f in $files; do
    if [ -n "$prev" ]; then
      shape=(--slots "$R" --nodes "$NODES" --ranks "$GPUS")
      plan "$WORK/old.json" --load "$prev" "${shape[@]}" --policy locality >/dev/null
      # The old placement under the new load: the deepseek run's "balancedness BEFORE -> after" line.
      before=$("$EPLB" plan --groups 8 --out "$WORK/x.json" --load "$f" "${shape[@]}" --old "$WORK/old.json" | awk '/^balancedness/ { print $2 }')
      read -r fb _ fc _ < <(plan "$WORK/fresh.json" --load "$f" "${shape[@]}" --policy locality --old "$WORK/old.json")
      read -r ib _ ic _ < <(plan "$WORK/inc.json" --load "$f" "${shape[@]}" --policy incremental --old "$WORK/old.json")
      ratio=$(awk -v a="$ic" -v b="$fc" 'BEGIN { printf "%.1f%%", 100 * a / b }')
      gap=$(awk -v a="$fb" -v b="$ib" 'BEGIN { printf "%.4f", a - b }')
      echo "| $(basename "$prev" .json) -> $(basename "$f" .json) | $before | $fb, $fc | $ib, $ic | $ratio | $gap |"
    fi
    prev=$f
  done
done
