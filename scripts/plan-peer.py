#!/usr/bin/env python3
"""Planning speed side by side: DeepSeek's own `rebalance_experts` against `eplb plan --policy deepseek`.

Both run pinned to one core in this one session: the script pins itself (and torch to one
thread) before importing torch. For every load file and layout it runs rounds of one call of
DeepSeek's Python and one `eplb plan --repeat N` under `taskset` on the same core (the median of N
plans after the CLI's own warm-up: no process start-up, no JIT), so a busy machine slows both
sides alike, and reports the median round of each. It checks that both give the same phy2log:
every layer must match, except layers whose plan depends on a tie (equal loads or ratios), where
torch's order is unspecified; the repository's tie-aware oracle
(tests/Eplb.Tests/Reference/deepseek_reference.py) names those, and their logcnt must still match.
It prints a markdown table; it exits 1 when a tie-free layer differs.

The repository does not ship DeepSeek's code: fetch https://github.com/deepseek-ai/EPLB and pass
the path of its eplb.py. Needs a Python with torch (e.g. Debian's python3-torch) and a built CLI
(./build.sh).

    /usr/bin/python3 scripts/plan-peer.py --eplb-py ~/EPLB/eplb.py [--cpu 1] [--runs 5] [--repeat 1000]
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
# (name, R, groups, nodes, G): DeepSeek-V3 on 32 GPUs, hierarchical over 4 nodes and on one node.
LAYOUTS = [('4 nodes x 8 GPUs', 288, 8, 4, 32), ('1 node x 32 GPUs', 288, 8, 1, 32)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--eplb-py', required=True, help="path of DeepSeek's eplb.py (github.com/deepseek-ai/EPLB)")
    parser.add_argument('--data', default=os.path.join(ROOT, 'data/load-data/sglang-deepseek-v3-r1'), help='folder of load dumps (*.json)')
    parser.add_argument('--eplb', default=os.path.join(ROOT, 'managed/Eplb.Cli/bin/Release/net10.0/eplb'), help='the eplb CLI')
    parser.add_argument('--cpu', type=int, default=max(os.sched_getaffinity(0)), help='the core both sides run on (default: the last allowed one)')
    parser.add_argument('--runs', type=int, default=5, help='rounds per file and layout: one Python call, then one `eplb plan` run')
    parser.add_argument('--repeat', type=int, default=1000, help='plans per `eplb plan` run (it reports their median)')
    return parser.parse_args()


def load_rows(path):
    """The layers with load, as `eplb plan` reads them: {"logical_count": [L][N] or [T][L][N]} or a bare [L][N]."""
    with open(path) as f:
        dump = json.load(f)
    rows = dump['logical_count'] if isinstance(dump, dict) else dump
    if rows and isinstance(rows[0][0], list):  # [T][L][N]: sum over T
        rows = [[sum(step[l][e] for step in rows) for e in range(len(rows[0][l]))] for l in range(len(rows[0]))]
    kept = [l for l, row in enumerate(rows) if sum(row) > 0]
    return rows, kept


def our_rows(placement, raw_layers, kept):
    """Our physical_to_logical_map rows for the kept layers, whichever way the file lays them out."""
    rows = placement['physical_to_logical_map']
    if 'layer_ids' in placement:
        by_id = dict(zip(placement['layer_ids'], rows))
        return [by_id[l] for l in kept]
    if len(rows) == raw_layers:
        return [rows[l] for l in kept]
    return rows


def time_python(rebalance, weight, layout):
    _, replicas, groups, nodes, gpus = layout
    start = time.perf_counter()
    result = rebalance(weight, replicas, groups, nodes, gpus)
    return (time.perf_counter() - start) * 1e3, result[0].tolist(), result[2].tolist()


def time_eplb(args, path, layout, out):
    _, replicas, groups, nodes, gpus = layout
    command = ['taskset', '-c', str(args.cpu), args.eplb, 'plan', '--load', path, '--policy', 'deepseek',
               '--slots', str(replicas), '--groups', str(groups), '--nodes', str(nodes), '--ranks', str(gpus),
               '--out', out, '--repeat', str(args.repeat)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({run.returncode}): {run.stderr.strip()}")
    match = re.search(r'planned in ([0-9.]+) ms', run.stdout)
    if not match:
        sys.exit(f"no 'planned in ... ms' in the output of {' '.join(command)}:\n{run.stdout}")
    with open(out) as f:
        return float(match.group(1)), json.load(f)


def measure(args, deepseek, weight, path, layout, out):
    """Python and Eplb in turn, --runs rounds (after one Python warm-up call), so both sides see the
    same moments of a busy machine; the median round of each."""
    time_python(deepseek.rebalance_experts, weight, layout)
    python, eplb = [], []
    for _ in range(args.runs):
        ms, theirs, their_counts = time_python(deepseek.rebalance_experts, weight, layout)
        python.append(ms)
        ms, placement = time_eplb(args, path, layout, out)
        eplb.append(ms)
    return statistics.median(python), statistics.median(eplb), theirs, their_counts, placement


def tie_layers(path, layout):
    """Indices (among the kept layers) whose plan depends on a tie, by the repository's oracle."""
    _, replicas, groups, nodes, gpus = layout
    spec = importlib.util.spec_from_file_location('deepseek_reference', os.path.join(ROOT, 'tests/Eplb.Tests/Reference/deepseek_reference.py'))
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    return {i for i, row in enumerate(oracle.plan_file(path, replicas, groups, nodes, gpus)) if row is None}


def main():
    args = parse_args()
    # Pin before torch starts its thread pools.
    os.sched_setaffinity(0, {args.cpu})
    import torch
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    spec = importlib.util.spec_from_file_location('deepseek_eplb', args.eplb_py)
    deepseek = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deepseek)
    if not os.access(args.eplb, os.X_OK):
        sys.exit(f"{args.eplb} is not there: run ./build.sh first (or pass --eplb)")
    files = sorted(f for f in os.listdir(args.data) if f.endswith('.json'))
    if not files:
        sys.exit(f"no *.json load dumps in {args.data}")

    load_before = os.getloadavg()
    lines = []
    worst = {}
    mismatches = []
    compared = skipped = counts_differ = 0
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, 'placement.json')
        for name in files:
            path = os.path.join(args.data, name)
            rows, kept = load_rows(path)
            weight = torch.tensor([rows[l] for l in kept], dtype=torch.float64)
            for layout in LAYOUTS:
                python_ms, eplb_ms, theirs, their_counts, placement = measure(args, deepseek, weight, path, layout, out)
                ours = our_rows(placement, len(rows), kept)
                counts_differ += sum(1 for row, counts in zip(ours, their_counts) if [row.count(e) for e in range(len(counts))] != counts)
                differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
                ties = tie_layers(path, layout) if differ else set()
                if len(ours) != len(theirs) or any(i not in ties for i in differ):
                    mismatches.append(f"{name} {layout[0]}: phy2log differs on tie-free layers {[i for i in differ if i not in ties]}")
                compared += len(theirs) - len(differ)
                skipped += len(differ)
                ratio = python_ms / eplb_ms
                worst[layout[0]] = min(worst.get(layout[0], ratio), ratio)
                lines.append(f"| {name[:-5]} | {layout[0]} | {python_ms:.0f} | {eplb_ms:.3f} | {ratio:,.0f}x |")
                print(lines[-1], file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    print(f"{datetime.date.today()}, {cpu} ({os.cpu_count()} cores), both sides pinned to core {args.cpu}; "
          f"torch {torch.__version__} (1 thread), Python {platform.python_version()}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.")
    print(f"{args.runs} rounds per row, each one call of rebalance_experts (after a warm-up call) and one `eplb plan --repeat {args.repeat}` "
          f"(the median of {args.repeat} plans after its warm-up); the table shows the median round of each. "
          f"Both plan all {len(kept)} MoE layers, 256 experts -> 288 slots.")
    print()
    print("| file | layout | Python ms | Eplb ms | ratio |")
    print("|---|---|---:|---:|---:|")
    print('\n'.join(lines))
    print()
    print("Smallest ratio: " + ", ".join(f"{k} {v:,.0f}x" for k, v in worst.items()) + ". "
          f"phy2log identical on {compared} of {compared + skipped} layers; the {skipped} others each depend on a tie "
          f"(equal loads or ratios, where torch's order is unspecified), and logcnt differs on {counts_differ} of them.")
    if mismatches:
        print('\n'.join(mismatches), file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
