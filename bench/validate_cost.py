"""What validate=True costs: block_sparse_attn and indexer_kl_loss (forward + backward, lse given)
with and without the check of the selection's values, at M3 shape (B=1, Hq=64, Hkv=4, D=Di=128,
block 128, topk 16, bf16), the indexer's selection of random inputs, in one process.

    python bench/validate_cost.py [--seqlens 32768 131072] [--reps 10]

CUDA events around each call, 3 warm-up calls, median of --reps (no L2 flush: the check's cost is
a difference of two such times). Then the check alone: the GPU kernel path and the PyTorch pass
(a sort of the ids) it replaced.
"""

import argparse
import statistics

import torch

import msa_cuda
from msa_cuda import _validation

from common import event_times


def median_ms(fn, reps: int) -> float:
    return statistics.median(event_times(fn, reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}; validate=True vs False, median ms")
    for s in args.seqlens:
        mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v = mk(1, s, 64, 128), mk(1, s, 4, 128), mk(1, s, 4, 128)
        q_idx, k_idx = mk(1, s, 4, 128), mk(1, s, 128)
        sel = msa_cuda.select_blocks(q_idx, k_idx)
        lse = msa_cuda.block_sparse_attn(q, k, v, sel, return_lse=True, validate=False)[1]
        qi, ki = q_idx.requires_grad_(True), k_idx.requires_grad_(True)

        def kl(validate):
            loss = msa_cuda.indexer_kl_loss(q, k, qi, ki, sel, lse=lse, validate=validate)
            return torch.autograd.grad(loss, (qi, ki))

        for name, fn in (("block_sparse_attn", lambda flag: msa_cuda.block_sparse_attn(q, k, v, sel, validate=flag)),
                         ("indexer_kl_loss fwd+bwd", kl)):
            on, off = median_ms(lambda: fn(True), args.reps), median_ms(lambda: fn(False), args.reps)
            print(f"{s:>8} {name:24s} validate=True {on:8.3f}  False {off:8.3f}  check {on - off:6.3f} ms", flush=True)
        # The check alone: the GPU kernel path (the public one) and the PyTorch pass it replaced.
        for name, check in (("check (kernel)", _validation.check_block_indices_values),
                            ("check (PyTorch sort)", _validation.check_block_indices_values_torch)):
            ms = median_ms(lambda: check(sel, 128, s, None, None), args.reps)
            print(f"{s:>8} {name:24s} {ms:8.3f} ms", flush=True)
        del q, k, v, q_idx, k_idx, sel, lse, qi, ki
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
