"""Run a few attention backwards at M3 shape (for ncu / compute-sanitizer):
python bench/bwd_once.py [SEQLEN] [REPS] [msa|dense]. msa (default): block_sparse_attn on the
indexer's selection, forward once, backward REPS times. dense: causal cuDNN SDPA with enable_gqa
(the bench's dense baseline), forward once, backward REPS times."""

import sys

import torch

import msa_cuda

HQ, HKV, D, DI = 64, 4, 128, 128  # the M3 shape


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _leaves(s: int):
    return tuple(_randn(1, s, h, D).requires_grad_(True) for h in (HQ, HKV, HKV))


def msa_backward_problem(s: int, deterministic: bool = False):
    """(q, k, v, selection, out, dout) of block_sparse_attn at M3 shape and length s, the
    selection the indexer's on random index q/k (as bench_ops.py), the forward already run."""
    q, k, v = _leaves(s)
    sel = msa_cuda.select_blocks(_randn(1, s, HKV, DI), _randn(1, s, DI))
    out = msa_cuda.block_sparse_attn(q, k, v, sel, validate=False, deterministic=deterministic)
    return q, k, v, sel, out, torch.randn_like(out)


def main() -> None:
    s = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    which = sys.argv[3] if len(sys.argv) > 3 else "msa"
    if which == "dense":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = _leaves(s)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(
                *(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True)
        dout = torch.randn_like(out)
    else:
        q, k, v, _, out, dout = msa_backward_problem(s)
    for _ in range(reps):
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
