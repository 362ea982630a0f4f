#!/usr/bin/env python3
"""PyTorch peer of bench_dispatch: the same dispatch ops written with torch (argsort, index_select,
index_add_) and libeplb's kernels called through ctypes, timed in one script on the same GPU with the
same inputs (CUDA events around each call, median), plus a check that both give the same result.

Shapes as bench_dispatch: hidden 7168 bf16, top-8 of 256 experts (one slot each), rank 0 of 8
simulated EP ranks (32 slots) and 1 rank (all local), T in {128, 4096, 16384}, block 128.

    python3 native/bench/peers/dispatch_peer.py --lib build/gpu/lib/libeplb.so
"""
import argparse
import ctypes
import sys

from _libeplb import LibEplb, median_us

EPLB_DTYPE_F32 = 0
EPLB_DTYPE_BF16 = 1
TOP_K = 8
EXPERTS = 256
HIDDEN = 7168
BLOCK = 128


class Eplb(LibEplb):
    """The dispatch entry points the peer needs, on raw addresses (ctypes)."""

    def __init__(self, path):
        c = ctypes
        p = c.c_void_p
        super().__init__(path, {
            "eplb_dispatch_align_capacity": [c.c_int64, c.c_int32, c.c_int32, c.POINTER(c.c_int64)],
            "eplb_dispatch_align": [p, p, c.c_int64, c.c_int32, c.c_int32, c.c_int32, c.c_int32, c.c_int64, p, p, p, p, p],
            "eplb_dispatch_bucket_by_rank": [p, p, c.c_int64, c.c_int32, c.c_int32, c.c_int32, p, p, p, p],
            "eplb_dispatch_permute": [p, c.c_int, p, c.c_int64, c.c_int64, c.c_int32, p, p, c.c_int64, p],
            "eplb_dispatch_combine": [p, c.c_int, p, c.c_int64, c.c_int64, p, p, c.c_int64, c.c_int32, c.c_int, p],
        })

    def align_capacity(self, pairs, local, block):
        capacity = ctypes.c_int64()
        self.check(self.lib.eplb_dispatch_align_capacity(pairs, local, block, ctypes.byref(capacity)), "align_capacity")
        return capacity.value

    def align(self, stream, ids, tokens, top_k, first, local, block, capacity, counts, offsets, sorted_ids, blocks, positions):
        self.check(self.lib.eplb_dispatch_align(stream, ids, tokens, top_k, first, local, block, capacity, counts, offsets,
                                                sorted_ids, blocks, positions), "eplb_dispatch_align")

    def bucket(self, stream, ids, tokens, top_k, physical, ranks, counts, offsets, send, positions):
        self.check(self.lib.eplb_dispatch_bucket_by_rank(stream, ids, tokens, top_k, physical, ranks, counts, offsets, send,
                                                         positions), "eplb_dispatch_bucket_by_rank")

    def permute(self, stream, dtype, x, tokens, hidden, top_k, row_ids, num_rows, capacity, out):
        self.check(self.lib.eplb_dispatch_permute(stream, dtype, x, tokens, hidden, top_k, row_ids, num_rows, capacity, out),
                   "eplb_dispatch_permute")

    def combine(self, stream, y_dtype, y, y_rows, hidden, positions, weights, tokens, top_k, out_dtype, out):
        self.check(self.lib.eplb_dispatch_combine(stream, y_dtype, y, y_rows, hidden, positions, weights, tokens, top_k,
                                                  out_dtype, out), "eplb_dispatch_combine")


def copy_bandwidth(torch):
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = median_us(torch, lambda: b.copy_(a), warmup=3, runs=20)
    return 2.0 * a.numel() / (us * 1e-6)


def torch_align(torch, ids, first, local, block, capacity):
    """Stable align with argsort: sorted pair ids (padding -1), positions, counts, padded offsets."""
    key = ids.long() - first
    key = torch.where((key >= 0) & (key < local), key, torch.full_like(key, local))  # not local: last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=local + 1)
    padded = (counts[:local] + block - 1) // block * block
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.cat([torch.cumsum(padded, 0) - padded, padded.sum().view(1)])
    sorted_key = key[order]
    rank_in_expert = torch.arange(key.numel(), device=ids.device) - starts[sorted_key]
    rows = torch.where(sorted_key < local, offsets[sorted_key.clamp(max=local)] + rank_in_expert,
                       torch.full_like(sorted_key, capacity))
    sorted_ids = torch.full((capacity + 1,), -1, dtype=torch.int32, device=ids.device)
    sorted_ids[rows] = order.int()  # not-local pairs all land on the dropped row `capacity`
    positions = torch.full_like(ids, -1)
    positions[order] = torch.where(sorted_key < local, rows, torch.full_like(rows, -1)).int()
    return sorted_ids[:capacity], positions, counts[:local].int(), offsets.int()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="path to libeplb.so")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device for torch")
        return 0

    eplb = Eplb(args.lib)
    stream = eplb.wrap_cuda(torch.cuda.current_stream().cuda_stream)
    copy = copy_bandwidth(torch)
    print(f"# dispatch peer on {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {copy / 1e9:.0f} GB/s")
    print(f"# hidden {HIDDEN} bf16, top-{TOP_K} of {EXPERTS} experts, block {BLOCK}; rank 0 of the given ranks; "
          "torch: argsort / index_select / index_add_ (fp32 accumulation, as libeplb)\n")
    print("| op | T | ranks | torch us | libeplb us | speedup | torch GB/s | libeplb GB/s | libeplb of copy | same result |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    generator = torch.Generator(device="cuda").manual_seed(7)
    row_bytes = HIDDEN * 2

    def row(op, tokens, ranks, torch_us, eplb_us, bytes_moved, same):
        print(f"| {op} | {tokens} | {ranks} | {torch_us:.2f} | {eplb_us:.2f} | {torch_us / eplb_us:.1f}x | "
              f"{bytes_moved / (torch_us * 1e-6) / 1e9:.0f} | {bytes_moved / (eplb_us * 1e-6) / 1e9:.0f} | "
              f"{100.0 * bytes_moved / (eplb_us * 1e-6) / copy:.0f}% | {same} |")

    for tokens in (128, 4096, 16384):
        pairs = tokens * TOP_K
        # Top-8 distinct experts per token, uniform: the 8 smallest of 256 random keys.
        ids = torch.rand(tokens, EXPERTS, generator=generator, device="cuda").argsort(dim=1)[:, :TOP_K]
        ids = ids.to(torch.int32).contiguous().view(-1)
        x = (torch.rand(tokens, HIDDEN, generator=generator, device="cuda") * 4 - 2).to(torch.bfloat16)
        weights = torch.rand(tokens, TOP_K, generator=generator, device="cuda")
        weights = (weights / weights.sum(dim=1, keepdim=True)).contiguous()
        out = torch.empty(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")

        for ranks in (8, 1):
            local = EXPERTS // ranks
            capacity = eplb.align_capacity(pairs, local, BLOCK)
            counts = torch.empty(local, dtype=torch.int32, device="cuda")
            offsets = torch.empty(local + 1, dtype=torch.int32, device="cuda")
            sorted_ids = torch.empty(capacity, dtype=torch.int32, device="cuda")
            blocks = torch.empty(capacity // BLOCK, dtype=torch.int32, device="cuda")
            positions = torch.empty(pairs, dtype=torch.int32, device="cuda")
            rows = torch.zeros(capacity, HIDDEN, dtype=torch.bfloat16, device="cuda")

            def eplb_align():
                eplb.align(stream, ids.data_ptr(), tokens, TOP_K, 0, local, BLOCK, capacity, counts.data_ptr(),
                           offsets.data_ptr(), sorted_ids.data_ptr(), blocks.data_ptr(), positions.data_ptr())

            def eplb_permute():
                eplb.permute(stream, EPLB_DTYPE_BF16, x.data_ptr(), tokens, HIDDEN, TOP_K, sorted_ids.data_ptr(),
                             offsets.data_ptr() + 4 * local, capacity, rows.data_ptr())

            def eplb_combine():
                eplb.combine(stream, EPLB_DTYPE_BF16, rows.data_ptr(), capacity, HIDDEN, positions.data_ptr(),
                             weights.data_ptr(), tokens, TOP_K, EPLB_DTYPE_BF16, out.data_ptr())

            eplb_align()
            eplb_permute()
            eplb_combine()
            eplb.check_device(stream)
            t_sorted, t_positions, t_counts, t_offsets = torch_align(torch, ids, 0, local, BLOCK, capacity)
            local_pairs = int(t_counts.sum())
            # Outside the timed regions: the local pairs in row order, their tokens and their rows.
            local_pair_ids = t_sorted[t_sorted >= 0].long()
            gather_tokens = local_pair_ids // TOP_K
            local_rows = t_positions[local_pair_ids].long()

            def torch_permute():
                return x.index_select(0, gather_tokens)

            def torch_combine(y_local):
                acc = torch.zeros(tokens, HIDDEN, dtype=torch.float32, device="cuda")
                acc.index_add_(0, gather_tokens, y_local.float() * weights.view(-1)[local_pair_ids].unsqueeze(1))
                return acc.to(torch.bfloat16)

            same_align = (torch.equal(sorted_ids, t_sorted) and torch.equal(positions, t_positions)
                          and torch.equal(counts, t_counts) and torch.equal(offsets, t_offsets))
            y_local = torch_permute()
            same_permute = torch.equal(rows[local_rows], y_local)
            reference = torch_combine(y_local)
            # index_add_ sums in an unspecified order: allow one bf16 rounding step of difference.
            same_combine = torch.allclose(out.float(), reference.float(), rtol=2 ** -7, atol=1e-6)

            t_align = median_us(torch, lambda: torch_align(torch, ids, 0, local, BLOCK, capacity))
            e_align = median_us(torch, eplb_align)
            row("align", tokens, ranks, t_align, e_align, pairs * 8 + capacity * 4, "yes" if same_align else "NO")
            t_permute = median_us(torch, torch_permute)
            e_permute = median_us(torch, eplb_permute)
            row("permute", tokens, ranks, t_permute, e_permute, local_pairs * 2 * row_bytes, "yes" if same_permute else "NO")
            t_combine = median_us(torch, lambda: torch_combine(y_local))
            e_combine = median_us(torch, eplb_combine)
            row("combine", tokens, ranks, t_combine, e_combine, (local_pairs + tokens) * row_bytes,
                "yes" if same_combine else "NO")

        # EP bucketing over 8 ranks: torch's stable argsort by destination rank.
        rank_counts = torch.empty(8, dtype=torch.int32, device="cuda")
        rank_offsets = torch.empty(9, dtype=torch.int32, device="cuda")
        send_ids = torch.empty(pairs, dtype=torch.int32, device="cuda")
        send_positions = torch.empty(pairs, dtype=torch.int32, device="cuda")

        def eplb_bucket():
            eplb.bucket(stream, ids.data_ptr(), tokens, TOP_K, EXPERTS, 8, rank_counts.data_ptr(), rank_offsets.data_ptr(),
                        send_ids.data_ptr(), send_positions.data_ptr())

        def torch_bucket():
            rank = ids.long() // (EXPERTS // 8)
            order = torch.argsort(rank, stable=True)
            return order, torch.bincount(rank, minlength=8)

        eplb_bucket()
        eplb.check_device(stream)
        order, t_rank_counts = torch_bucket()
        same_bucket = torch.equal(send_ids.long(), order) and torch.equal(rank_counts.long(), t_rank_counts)
        row("bucket", tokens, 8, median_us(torch, torch_bucket), median_us(torch, eplb_bucket), pairs * 12,
            "yes" if same_bucket else "NO")

    eplb.destroy(stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
