#!/usr/bin/env python3
"""PyTorch peer of bench_moe: one MoE layer's experts computed by PyTorch (routing -> permute ->
torch._grouped_mm, or per-expert matmuls where it is unavailable -> SwiGLU -> grouped mm ->
combine) and by libeplb's Mega MoE (fused cooperative kernel and unfused path) through ctypes, in
one script on the same GPU with the same tensors (CUDA events around each call, median), plus the
two reference rates of the machine: device copy bandwidth and the bf16 GEMM rate of torch.matmul.

Shapes as bench_moe: DeepSeek-V4-Flash (hidden 4096, intermediate 2048, 256 experts, top-6, SwiGLU
limit 10) and DeepSeek-V3-shaped (7168, 2048, 256, top-8) layers, all experts on one GPU and the
1/8 that rank 0 of 8 holds, T in {1, 16, 128, 512, 4096}; ids are distinct uniform top-k picks.

    python3 native/bench/peers/moe_peer.py --lib build/gpu/lib/libeplb.so [--tokens 1,128] [--models V3]
    python3 native/bench/peers/moe_peer.py --lib build/native/lib/libeplb.so --check-cpu   # no GPU needed
"""
import argparse
import ctypes
import sys

from _libeplb import LibEplb, median_us as _median_us

EXPERTS = 256
MODELS = {
    # name: hidden, intermediate, top_k, swiglu_limit
    "V4-Flash": (4096, 2048, 6, 10.0),
    "V3": (7168, 2048, 8, 0.0),
}
STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE = 7


class Shape(ctypes.Structure):
    """eplb_moe_shape_t (native/include/eplb/eplb_moe.h)."""

    _fields_ = [("hidden", ctypes.c_int32), ("intermediate", ctypes.c_int32), ("top_k", ctypes.c_int32),
                ("num_experts", ctypes.c_int32), ("num_local_experts", ctypes.c_int32),
                ("first_local_expert", ctypes.c_int32), ("swiglu_limit", ctypes.c_float), ("block_m", ctypes.c_int32)]


class Tensors(ctypes.Structure):
    """eplb_moe_tensors_t."""

    _fields_ = [("x", ctypes.c_void_p), ("topk_ids", ctypes.c_void_p), ("topk_weights", ctypes.c_void_p),
                ("w1", ctypes.c_void_p), ("w2", ctypes.c_void_p), ("output", ctypes.c_void_p),
                ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_uint64)]


def median_us(torch, fn, warmup=5, runs=30):
    """Fewer runs than the other peers: a MoE layer at 4096 tokens takes milliseconds."""
    return _median_us(torch, fn, warmup, runs)


class Eplb(LibEplb):
    """The Mega MoE entry points the peer needs (ctypes)."""

    def __init__(self, path):
        c = ctypes
        p = c.c_void_p
        super().__init__(path, {
            "eplb_moe_workspace_size": [c.POINTER(Shape), c.c_int64, c.POINTER(c.c_uint64)],
            "eplb_mega_moe_max_grid": [p, c.POINTER(Shape), c.c_int64, c.POINTER(c.c_int32), c.POINTER(c.c_int32)],
            "eplb_mega_moe": [p, c.POINTER(Shape), c.c_int64, c.POINTER(Tensors), c.c_int32],
            "eplb_moe_unfused": [p, c.POINTER(Shape), c.c_int64, c.POINTER(Tensors)],
        })

    def workspace_size(self, shape, tokens):
        size = ctypes.c_uint64()
        self.check(self.lib.eplb_moe_workspace_size(ctypes.byref(shape), tokens, ctypes.byref(size)), "workspace_size")
        return size.value

    def max_grid(self, stream, shape, tokens):
        """(blocks, tile height), or None when the fused kernel cannot launch here."""
        blocks, tile = ctypes.c_int32(), ctypes.c_int32()
        status = self.lib.eplb_mega_moe_max_grid(stream, ctypes.byref(shape), tokens, ctypes.byref(blocks), ctypes.byref(tile))
        if status == STATUS_COOPERATIVE_LAUNCH_UNAVAILABLE:
            return None
        self.check(status, "eplb_mega_moe_max_grid")
        return blocks.value, tile.value


def grouped_mm_works(torch):
    """torch._grouped_mm exists and runs bf16 on this GPU (PyTorch >= 2.8, Hopper or newer)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        offs = torch.tensor([32, 64], device="cuda", dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the per-expert fallback
        return False


def torch_moe(torch, x, ids, weights, w13, w2, first, local, limit, grouped):
    """The PyTorch pipeline: routing -> permute -> GEMM1 -> SwiGLU -> GEMM2 -> combine."""
    tokens, top_k = ids.shape
    inter = w2.shape[2]
    # Routing: the local expert of each (token, k), non-local pairs sorted behind the local ones.
    flat = ids.reshape(-1).long() - first
    is_local = (flat >= 0) & (flat < local)
    key = torch.where(is_local, flat, torch.full_like(flat, local))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=local + 1)[:local]
    # Permute.
    xs = x.index_select(0, order // top_k)
    if grouped:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    else:
        gate_up = torch.zeros(xs.shape[0], 2 * inter, device=x.device, dtype=x.dtype)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate_up[start:start + n] = xs[start:start + n] @ w13[e].t()
                start += n
    gate, up = gate_up[:, :inter].float(), gate_up[:, inter:].float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    act = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
    if grouped:
        y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    else:
        y = torch.zeros(xs.shape[0], w2.shape[1], device=x.device, dtype=x.dtype)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                y[start:start + n] = act[start:start + n] @ w2[e].t()
                start += n
    # Combine: rows past the local ones are undefined; where() drops them without arithmetic.
    local_sorted = is_local[order]
    contribution = torch.where(local_sorted[:, None], y.float() * weights.reshape(-1)[order][:, None], 0.0)
    unsorted = torch.empty_like(contribution)
    unsorted[order] = contribution
    return unsorted.view(tokens, top_k, -1).sum(1).to(torch.bfloat16)


def check_on_cpu(torch, eplb):
    """Small layers on the CPU: the PyTorch pipeline (per-expert matmuls) against libeplb's CPU
    reference through ctypes, fused and unfused, so the peer's math is checked without a GPU."""
    torch.manual_seed(3)
    stream = eplb.cpu_stream()
    worst = 0.0
    # hidden, intermediate, top_k, experts, local, first, limit, tokens
    for hidden, inter, top_k, experts, local, first, limit, tokens in [
            (128, 64, 4, 16, 16, 0, 0.0, 9), (192, 128, 6, 32, 8, 8, 0.5, 17), (64, 64, 8, 12, 5, 7, 10.0, 1),
            (256, 192, 2, 40, 13, 20, 0.05, 33)]:
        shape = Shape(hidden, inter, top_k, experts, local, first, limit, 0)
        x = (torch.rand(tokens, hidden) * 2 - 1).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(torch.int32).contiguous()
        ids[0, 0] = -1
        weights = (torch.rand(tokens, top_k) * 0.95 + 0.05).contiguous()
        w13 = ((torch.rand(local, 2 * inter, hidden) * 2 - 1) * 1.7 / hidden ** 0.5).to(torch.bfloat16)
        w2 = ((torch.rand(local, hidden, inter) * 2 - 1) * 1.7 / inter ** 0.5).to(torch.bfloat16)
        workspace = torch.empty(eplb.workspace_size(shape, tokens), dtype=torch.uint8)
        reference = torch_moe(torch, x, ids, weights, w13, w2, first, local, limit, grouped=False).float()
        for name in ("eplb_mega_moe", "eplb_moe_unfused"):
            out = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16)
            tensors = Tensors(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13.data_ptr(), w2.data_ptr(),
                              out.data_ptr(), workspace.data_ptr(), workspace.numel())
            arguments = [stream, ctypes.byref(shape), tokens, ctypes.byref(tensors)] + ([0] if name == "eplb_mega_moe" else [])
            eplb.check(getattr(eplb.lib, name)(*arguments), name)
            diff = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            worst = max(worst, diff)
            print(f"{name} H={hidden} I={inter} K={top_k} local=[{first}+{local}) limit={limit} T={tokens}: "
                  f"max diff {diff:.2e}")
            if not diff <= 2e-2:
                raise RuntimeError(f"{name} and the PyTorch pipeline disagree: {diff}")
    eplb.check(eplb.lib.eplb_stream_destroy(stream), "eplb_stream_destroy")
    print(f"ok: libeplb's CPU path and the PyTorch pipeline agree (worst {worst:.2e} of the output's max)")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True, help="path to libeplb.so")
    parser.add_argument("--tokens", default="1,16,128,512,4096")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--check-cpu", action="store_true", help="check the PyTorch pipeline against libeplb on the CPU")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: PyTorch is not installed")
        return 0
    if args.check_cpu:
        return check_on_cpu(torch, Eplb(args.lib))
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0

    eplb = Eplb(args.lib)
    torch.manual_seed(7)
    cuda_stream = torch.cuda.current_stream()
    stream = eplb.wrap_cuda(ctypes.c_void_p(cuda_stream.cuda_stream))
    grouped = grouped_mm_works(torch)

    # The machine's two ceilings: device copy bandwidth and the bf16 GEMM rate of torch.matmul.
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_target = torch.empty_like(big)
    copy = 2.0 * big.numel() / (median_us(torch, lambda: copy_target.copy_(big), 3, 20) * 1e-6)
    del big, copy_target
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul = 2.0 * n ** 3 / (median_us(torch, lambda: a @ b, 3, 20) * 1e-6)
    del a, b
    print(f"# Mega MoE vs PyTorch on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"{'torch._grouped_mm' if grouped else 'per-expert matmuls'}); copy {copy / 1e9:.0f} GB/s, "
          f"bf16 matmul {matmul / 1e12:.0f} TFLOP/s\n")
    print("| layer | experts | T | fused us | unfused us | torch us | torch / fused | weights GB/s | of copy "
          "| TFLOP/s | of matmul | max diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    token_counts = [int(t) for t in args.tokens.split(",")]
    for name in args.models.split(","):
        hidden, inter, top_k, limit = MODELS[name]
        # All 256 experts' weights, filled in place (no fp32 copy of 15 GiB); the 1/8 rank uses the first 32.
        w13 = torch.empty(EXPERTS, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16).uniform_(-1.7 / hidden ** 0.5, 1.7 / hidden ** 0.5)
        w2 = torch.empty(EXPERTS, hidden, inter, device="cuda", dtype=torch.bfloat16).uniform_(-1.7 / inter ** 0.5, 1.7 / inter ** 0.5)
        for local in (EXPERTS, EXPERTS // 8):
            shape = Shape(hidden, inter, top_k, EXPERTS, local, 0, limit, 0)
            workspace = torch.empty(eplb.workspace_size(shape, max(token_counts)), dtype=torch.uint8, device="cuda")
            w13_local, w2_local = w13[:local], w2[:local]
            for tokens in token_counts:
                x = (torch.rand(tokens, hidden, device="cuda") * 2 - 1).to(torch.bfloat16)
                ids = torch.rand(tokens, EXPERTS, device="cuda").argsort(dim=1)[:, :top_k].to(torch.int32).contiguous()
                weights = (torch.rand(tokens, top_k, device="cuda") * 0.95 + 0.05).contiguous()
                out = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
                out_unfused = torch.empty_like(out)
                tensors = Tensors(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13_local.data_ptr(),
                                  w2_local.data_ptr(), out.data_ptr(), workspace.data_ptr(), workspace.numel())
                unfused_tensors = Tensors(*[getattr(tensors, f[0]) for f in Tensors._fields_])
                unfused_tensors.output = out_unfused.data_ptr()

                fits = eplb.max_grid(stream, shape, tokens)
                fused_us = None
                if fits is not None:
                    fused_us = median_us(torch, lambda: eplb.check(
                        eplb.lib.eplb_mega_moe(stream, ctypes.byref(shape), tokens, ctypes.byref(tensors), 0), "eplb_mega_moe"))
                unfused_us = median_us(torch, lambda: eplb.check(
                    eplb.lib.eplb_moe_unfused(stream, ctypes.byref(shape), tokens, ctypes.byref(unfused_tensors)),
                    "eplb_moe_unfused"))
                flags = ctypes.c_uint32()
                eplb.check(eplb.lib.eplb_stream_check_device_errors(stream, ctypes.byref(flags)), "device errors")
                reference = None

                def peer():
                    nonlocal reference
                    reference = torch_moe(torch, x, ids, weights, w13_local, w2_local, 0, local, limit, grouped)

                torch_us = median_us(torch, peer)
                ours = out if fused_us is not None else out_unfused
                ours_us = fused_us if fused_us is not None else unfused_us
                diff = ((ours.float() - reference.float()).abs().max() /
                        reference.float().abs().max().clamp(min=1e-30)).item()
                local_ids = ids[(ids >= 0) & (ids < local)]
                active = local_ids.unique().numel()
                weight_bytes = active * 3.0 * hidden * inter * 2.0
                flops = 2.0 * local_ids.numel() * 3.0 * hidden * inter
                rate = weight_bytes / (ours_us * 1e-6)
                tflops = flops / (ours_us * 1e-6)
                fused_text = f"{fused_us:.1f}" if fused_us is not None else "unavailable"
                print(f"| {name} | {local} of {EXPERTS} ({active} active) | {tokens} | {fused_text} | {unfused_us:.1f} | "
                      f"{torch_us:.1f} | {torch_us / ours_us:.2f}x | {rate / 1e9:.0f} | {100 * rate / copy:.0f}% | "
                      f"{tflops / 1e12:.1f} | {100 * tflops / matmul:.0f}% | {diff:.1e} |", flush=True)
            del workspace
        del w13, w2
        torch.cuda.empty_cache()
    eplb.check(eplb.lib.eplb_stream_destroy(stream), "eplb_stream_destroy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
