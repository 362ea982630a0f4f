#!/usr/bin/env python3
"""PyTorch peer of bench_routing: the same routing in PyTorch on the same GPU, in the same script.

Each op runs twice per shape: PyTorch (scores, topk, gather, the EPLB map as index arithmetic, the
padding mask, load recording with scatter_add_) and libeplb (called through ctypes on the same CUDA
stream). Both are timed with CUDA events (warm-up, median), eagerly and as CUDA-graph replays (no
launch overhead), and the outputs are cross-checked: ids equal, weights within 1e-5.

    python3 native/bench/peers/routing_peer.py --lib build/gpu/lib/libeplb.so
"""
import argparse
import ctypes
import statistics
import sys

from _libeplb import LibEplb

import torch
import torch.nn.functional as F

VOCAB = 129280  # DeepSeek-V4
REDUNDANT = 32  # R = N + 32
KMAX = 4
SCORES = {"sigmoid": 0, "sqrtsoftplus": 1, "softmax": 2}
# name, score, groups, kept groups, bias, hash
OPS = [
    ("hash (V4)", "sqrtsoftplus", 1, 1, False, True),
    ("biased sqrtsoftplus (V4)", "sqrtsoftplus", 1, 1, True, False),
    ("grouped sigmoid 8/4 (V3)", "sigmoid", 8, 4, True, False),
    ("softmax renormalised", "softmax", 1, 1, False, False),
]
FACTOR = 2.5


class ExpertMap(ctypes.Structure):
    _fields_ = [("log2phy", ctypes.c_void_p), ("logcnt", ctypes.c_void_p), ("counters", ctypes.c_void_p),
                ("record_flag", ctypes.c_void_p), ("num_logical", ctypes.c_int32), ("max_replicas", ctypes.c_int32),
                ("num_physical", ctypes.c_int32), ("replica_selection", ctypes.c_int32)]


class RouterConfig(ctypes.Structure):
    _fields_ = [("num_experts", ctypes.c_int32), ("top_k", ctypes.c_int32), ("score", ctypes.c_int32),
                ("num_groups", ctypes.c_int32), ("topk_groups", ctypes.c_int32), ("renormalize", ctypes.c_int32),
                ("scale_in_weights", ctypes.c_int32), ("routed_scaling_factor", ctypes.c_float)]


class Eplb(LibEplb):
    """The routing entry points the peer needs."""

    def __init__(self, path):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        super().__init__(path, {
            "eplb_route_topk": [p, ctypes.POINTER(RouterConfig), p, p, i64, ctypes.POINTER(ExpertMap), p, p, p],
            "eplb_route_hash": [p, ctypes.POINTER(RouterConfig), p, p, p, i64, i64, ctypes.POINTER(ExpertMap), p, p, p],
        })

    def wrap(self, stream):
        return self.wrap_cuda(stream.cuda_stream)


def median_us(fn, warmup=20, runs=200):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0)
    return statistics.median(times)


def graph_us(fn, stream):
    """Median replay time of fn captured once into a CUDA graph on stream."""
    with torch.cuda.stream(stream):
        fn()  # warm up on the capture stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        context = torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")
    except TypeError:  # PyTorch < 2.1
        context = torch.cuda.graph(graph, stream=stream)
    with context:
        fn()
    return median_us(graph.replay)


def torch_route(op, logits, bias, token_ids, tid2eid, k, log2phy, logcnt, counters, num_unpadded, rows):
    _, score, groups, kept, _, hashed = op
    t, n = logits.shape
    if hashed:
        ids = tid2eid[token_ids]
        s = F.softplus(logits.gather(1, ids.long())).sqrt()
        weights = s / (s.sum(-1, keepdim=True) + 1e-20) * FACTOR
    elif score == "softmax":
        weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * FACTOR
    else:
        s = torch.sigmoid(logits) if score == "sigmoid" else F.softplus(logits).sqrt()
        keyed = s + bias
        if groups > 1:
            group_scores = keyed.view(t, groups, -1).topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(kept, dim=-1).indices, 1.0)
            keyed = keyed.masked_fill(keep.repeat_interleave(n // groups, dim=1) == 0, float("-inf"))
        ids = keyed.topk(k, dim=-1).indices
        weights = s.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * FACTOR
    # EPLB epilogue: TokenHash replica, padding mask, load recording.
    ids = ids.long()
    replica = ((rows * 2654435769) % 4294967296).unsqueeze(1) % logcnt[ids]
    physical = log2phy[ids * KMAX + replica]
    padding = (rows >= num_unpadded).unsqueeze(1)
    physical = physical.masked_fill(padding, -1)
    weights = weights.masked_fill(padding, 0.0)
    counters.scatter_add_(0, physical.clamp(min=0).flatten(), (physical >= 0).to(torch.int32).flatten())
    return physical.to(torch.int32), weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="path to libeplb.so")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: PyTorch sees no CUDA device")
        return 0
    eplb = Eplb(args.lib)
    device = torch.device("cuda")
    torch.manual_seed(7)
    stream = torch.cuda.current_stream()
    eager_handle = eplb.wrap(stream)
    capture = torch.cuda.Stream()
    capture_handle = eplb.wrap(capture)

    print(f"# routing: PyTorch {torch.__version__} vs libeplb on {torch.cuda.get_device_name()}\n")
    print("Same inputs, same GPU, same script; EPLB map (R = N + 32) and load recording on in both. "
          "Speedup = PyTorch time / libeplb time.\n")
    print("| op | T | N | K | torch us | eplb us | speedup | torch graph us | eplb graph us | graph speedup | ids equal | max abs dw |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    max_tokens = 16384
    all_logits = torch.randn(max_tokens, 384, device=device)
    all_tokens = torch.randint(0, VOCAB, (max_tokens,), device=device)
    failures = 0
    for op in OPS:
        name, score, groups, kept, use_bias, hashed = op
        for n in (256, 384):
            for k in (6, 8):
                r = n + REDUNDANT
                logcnt = torch.ones(n, dtype=torch.int32)
                log2phy = torch.full((n * KMAX,), -1, dtype=torch.int32)
                log2phy[torch.arange(n) * KMAX] = torch.arange(n, dtype=torch.int32)
                for slot in range(n, r):
                    e = (slot - n) * 7 % n
                    log2phy[e * KMAX + logcnt[e]] = slot
                    logcnt[e] += 1
                log2phy, logcnt = log2phy.to(device), logcnt.to(device)
                counters = torch.zeros(r, dtype=torch.int32, device=device)
                flag = torch.ones(1, dtype=torch.int32, device=device)
                bias = 0.1 * torch.randn(n, device=device)
                tid2eid = torch.randint(0, n, (VOCAB, k), dtype=torch.int32, device=device)
                emap = ExpertMap(log2phy.data_ptr(), logcnt.data_ptr(), counters.data_ptr(), flag.data_ptr(), n, KMAX, r, 0)
                config = RouterConfig(n, k, SCORES[score], groups, kept, 1, 1, FACTOR)
                for tokens in (1, 128, 4096, 16384):
                    logits = all_logits[:tokens, :n].contiguous()
                    token_ids = all_tokens[:tokens].contiguous()
                    rows = torch.arange(tokens, device=device)
                    num_unpadded = torch.tensor([tokens], dtype=torch.int32, device=device)
                    ids = torch.empty(tokens, k, dtype=torch.int32, device=device)
                    weights = torch.empty(tokens, k, dtype=torch.float32, device=device)

                    def ours(handle):
                        if hashed:
                            status = eplb.lib.eplb_route_hash(handle, ctypes.byref(config), logits.data_ptr(),
                                                              token_ids.data_ptr(), tid2eid.data_ptr(), VOCAB, tokens,
                                                              ctypes.byref(emap), num_unpadded.data_ptr(), ids.data_ptr(),
                                                              weights.data_ptr())
                        else:
                            status = eplb.lib.eplb_route_topk(handle, ctypes.byref(config), logits.data_ptr(),
                                                              bias.data_ptr() if use_bias else None, tokens,
                                                              ctypes.byref(emap), num_unpadded.data_ptr(), ids.data_ptr(),
                                                              weights.data_ptr())
                        eplb.check(status, name)

                    def theirs():
                        return torch_route(op, logits, bias if use_bias else 0.0, token_ids, tid2eid, k, log2phy, logcnt,
                                           counters, num_unpadded, rows)

                    # Cross-check (random normal logits: ties have probability ~0).
                    ours(eager_handle)
                    want_ids, want_weights = theirs()
                    torch.cuda.synchronize()
                    flags = ctypes.c_uint32()
                    eplb.check(eplb.lib.eplb_stream_check_device_errors(eager_handle, ctypes.byref(flags)), "device errors")
                    same = bool(torch.equal(ids, want_ids))
                    dw = (weights - want_weights).abs().max().item()
                    failures += (not same) or dw > 1e-5

                    torch_us = median_us(theirs, runs=args.runs)
                    eplb_us = median_us(lambda: ours(eager_handle), runs=args.runs)
                    torch_graph = graph_us(theirs, capture)
                    try:
                        eplb_graph = graph_us(lambda: ours(capture_handle), capture)
                        graph_cells = f"{eplb_graph:.2f} | {torch_graph / eplb_graph:.1f}x"
                    except Exception as error:  # report, keep the eager numbers
                        failures += 1
                        graph_cells = f"capture failed: {error} | -"
                    print(f"| {name} | {tokens} | {n} | {k} | {torch_us:.2f} | {eplb_us:.2f} | {torch_us / eplb_us:.1f}x | "
                          f"{torch_graph:.2f} | {graph_cells} | {'yes' if same else 'NO'} | {dw:.1e} |", flush=True)
    eplb.lib.eplb_stream_destroy(eager_handle)
    eplb.lib.eplb_stream_destroy(capture_handle)
    if failures:
        print(f"\n{failures} shapes where libeplb and PyTorch disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
