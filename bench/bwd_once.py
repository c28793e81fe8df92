"""Run a few block_sparse_attn backwards at M3 shape (for ncu / compute-sanitizer):
python bench/bwd_once.py [SEQLEN] [REPS]. The forward runs once; the backward REPS times."""

import sys

import torch

import msa_cuda


def main() -> None:
    s = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    hq, hkv, d = 64, 4, 128
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = (mk(1, s, h, d).requires_grad_(True) for h in (hq, hkv, hkv))
    sel = msa_cuda.select_blocks(mk(1, s, hkv, 128), mk(1, s, 128))
    out = msa_cuda.block_sparse_attn(q, k, v, sel, validate=False)
    dout = torch.randn_like(out)
    for _ in range(reps):
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
