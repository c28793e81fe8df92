"""Run the block_sparse_attn backward several times and count gradient elements whose bits change.

    python bench/check_determinism.py [--seqlen 8192] [--runs 3]

M3 shape (Hq=64, Hkv=4, D=128, block 128, topk 16, init_blocks=1 so block 0 is hot), bf16, the
indexer's selection. Prints, for deterministic=False and True, how many elements of dq, dk, dv
differ from the first run (the default mode's fp32 atomics add in run-dependent order), and the
largest difference between the two modes relative to the largest gradient.
"""

import argparse

import torch

import msa_cuda


def grads(q, k, v, sel, dout, deterministic):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = msa_cuda.block_sparse_attn(*leaves, sel, block_size=128, validate=False, deterministic=deterministic)
    return torch.autograd.grad(out, leaves, dout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    s = args.seqlen
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v, dout = mk(1, s, 64, 128), mk(1, s, 4, 128), mk(1, s, 4, 128), mk(1, s, 64, 128)
    sel = msa_cuda.select_blocks(mk(1, s, 4, 128), mk(1, s, 128), block_size=128, topk=16, init_blocks=1)
    first = {}
    for deterministic in (False, True):
        runs = [grads(q, k, v, sel, dout, deterministic) for _ in range(args.runs)]
        first[deterministic] = runs[0]
        changed = [sum(int((a != b).sum()) for a, b in zip(runs[0], other)) for other in runs[1:]]
        total = sum(t.numel() for t in runs[0])
        print(f"deterministic={deterministic}: elements differing from run 1 in runs 2..{args.runs}: {changed} "
              f"of {total}")
    for name, a, b in zip(("dq", "dk", "dv"), first[False], first[True]):
        rel = (a.float() - b.float()).abs().max().item() / max(a.float().abs().max().item(), 1e-30)
        print(f"{name}: max |fp32 mode - deterministic| / max |grad| = {rel:.2e}")


if __name__ == "__main__":
    main()
