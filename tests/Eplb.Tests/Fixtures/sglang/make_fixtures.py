#!/usr/bin/env python3
"""Writes the golden SGLang recorder dumps the tests read, with real torch.save.

Run from this folder with a Python that has PyTorch (>= 1.6; these were made with Debian's
python3-torch 1.13):   /usr/bin/python3 make_fixtures.py

The dicts have the shapes SGLang's expert-distribution recorder saves
(python/sglang/srt/eplb/expert_distribution.py): _StatAccumulator.dump for the stat/stat_approx
modes, _DetailAccumulator.dump for per_pass. expected.json holds, per file, the [layers][experts]
logical load torch itself computes from the same tensors (sum over the buffer steps; per_pass: the
physical counts of all records folded to logical experts through last_physical_to_logical_map).
"""
import json

import torch

LAYERS, EXPERTS, DENSE = 6, 8, 2          # layers 0 and 1 are dense: zero rows, as in DeepSeek-V3
RANKS, SLOTS_PER_RANK = 2, 5
SLOTS = RANKS * SLOTS_PER_RANK            # N + 2 redundant slots
g = torch.Generator().manual_seed(20250614)
expected = {}


def counts(*shape, dtype=torch.int32):
    """Random counts; callers zero the dense layers."""
    return torch.randint(0, 1000, shape, generator=g).to(dtype)


# stat / stat_approx: a circular buffer of 4 steps, the last one never filled (zero).
logical_count = counts(4, LAYERS, EXPERTS)
logical_count[:, :DENSE] = 0
logical_count[3] = 0
torch.save(dict(rank=0, logical_count=logical_count, average_utilization_rate_over_window=0.8125),
           "recorder_stat.pt")
expected["recorder_stat.pt"] = logical_count.sum(dim=0).tolist()

# The same dump as a non-contiguous int64 view (strides must be honoured), without the
# utilization figure (None when metrics are off).
per_layer = counts(LAYERS, 3, EXPERTS, dtype=torch.int64)   # [L][3][N]
per_layer[:DENSE] = 0
strided = per_layer.transpose(0, 1)                          # [3][L][N], strides (N, 3N, 1)
assert not strided.is_contiguous()
torch.save(dict(rank=0, logical_count=strided, average_utilization_rate_over_window=None),
           "recorder_stat_int64_strided.pt")
expected["recorder_stat_int64_strided.pt"] = strided.sum(dim=0).tolist()

# A float32 [L][N] logical_count (init_by_eplb takes 2-D counts too), viewed at an offset.
flat = torch.rand(LAYERS * EXPERTS + 5, generator=g) * 100
flat[5:5 + DENSE * EXPERTS] = 0
float2d = flat[5:].view(LAYERS, EXPERTS)
assert float2d.storage_offset() == 5
torch.save(dict(rank=0, logical_count=float2d, average_utilization_rate_over_window=None),
           "recorder_stat_float32_offset.pt")
expected["recorder_stat_float32_offset.pt"] = float2d.double().tolist()

# per_pass: one file per rank, a record per forward pass with this rank's global physical counts,
# and the map in force at the end (each row holds every logical expert; dense rows are trivial).
phy2log = torch.arange(SLOTS).repeat(LAYERS, 1) % EXPERTS
for layer in range(DENSE, LAYERS):
    row = torch.cat([torch.randperm(EXPERTS, generator=g), torch.randint(0, EXPERTS, (SLOTS - EXPERTS,), generator=g)])
    phy2log[layer] = row[torch.randperm(SLOTS, generator=g)]
records = []
for forward_pass_id in range(3):
    physical = counts(LAYERS, SLOTS)
    physical[:DENSE] = 0
    records.append(dict(forward_pass_id=forward_pass_id, rank=1, gatherer_key="primary", global_physical_count=physical))
torch.save(dict(records=records, last_physical_to_logical_map=phy2log), "recorder_per_pass.pt")
total = sum(r["global_physical_count"] for r in records).long()
folded = torch.zeros(LAYERS, EXPERTS, dtype=torch.int64).scatter_add_(1, phy2log, total)
expected["recorder_per_pass.pt"] = folded.tolist()

with open("expected.json", "w") as f:
    json.dump(expected, f, indent=1)
    f.write("\n")
print("torch", torch.__version__, "wrote", ", ".join(expected))
