#!/usr/bin/env python3
"""Checks, with real PyTorch, that placements written by `eplb plan` load as SGLang loads them.

    eplb plan --load DUMP ... --out p.pt
    eplb plan --load DUMP ... --out p.json
    /usr/bin/python3 check_placement_with_torch.py p.pt p.json p.json.report.json

Mirrors python/sglang/srt/eplb/expert_location.py (compute_initial_expert_location_metadata ->
init_by_mapping -> _compute_logical_to_all_physical_map) without importing SGLang.
"""
import inspect
import json
import sys

import torch


def load_like_sglang(path):
    # .pt -> torch.load(weights_only=True); anything else -> JSON
    data = torch.load(path, weights_only=True) if path.endswith(".pt") else json.load(open(path))

    # init_by_mapping(server_args, model_config, **data): physical_to_logical_map is its only keyword.
    def init_by_mapping(server_args, model_config, physical_to_logical_map):
        return physical_to_logical_map

    inspect.signature(init_by_mapping).bind(None, None, **data)  # TypeError on any other key
    phy2log = data["physical_to_logical_map"]
    if not isinstance(phy2log, torch.Tensor):
        phy2log = torch.tensor(phy2log)
    assert phy2log.dtype in (torch.int32, torch.int64), phy2log.dtype
    return phy2log


def replica_lists(phy2log, num_logical):
    layers, slots = phy2log.shape
    lists = [[[] for _ in range(num_logical)] for _ in range(layers)]
    for layer in range(layers):
        for slot in range(slots):
            lists[layer][phy2log[layer, slot].item()].append(slot)
    return lists


pt, js, report_path = sys.argv[1:4]
report = json.load(open(report_path))
a, b = load_like_sglang(pt), load_like_sglang(js)
assert a.dtype == torch.int64 and torch.equal(a, b), "the .pt and the .json hold different maps"
layers, experts = report["model_layers"], report["experts"]
assert tuple(a.shape) == (layers, report["replicas"]), a.shape
lists = replica_lists(a, experts)
assert all(len(expert) > 0 for layer in lists for expert in layer), "an expert without a replica"
ours = [[[s for s in expert if s >= 0] for expert in layer] for layer in report["logical_to_physical_map"]]
assert ours == lists, "the report's logical_to_physical_map differs from SGLang's replica lists"
assert report["logical_replica_count"] == [[len(e) for e in layer] for layer in lists]
print(f"torch {torch.__version__}: {pt} and {js} load as SGLang loads them: {layers} layers x {a.shape[1]} slots, "
      f"replica lists equal the report's")
