"""Run a few attention backwards at M3 shape (for ncu / compute-sanitizer):
python bench/bwd_once.py [SEQLEN] [REPS] [msa|dense]. msa (default): block_sparse_attn on the
indexer's selection, forward once, backward REPS times. dense: causal cuDNN SDPA with enable_gqa
(the bench's dense baseline), forward once, backward REPS times."""

import sys

import torch

import msa_cuda


def main() -> None:
    s = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    which = sys.argv[3] if len(sys.argv) > 3 else "msa"
    hq, hkv, d = 64, 4, 128
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = (mk(1, s, h, d).requires_grad_(True) for h in (hq, hkv, hkv))
    if which == "dense":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(
                *(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True)
    else:
        sel = msa_cuda.select_blocks(mk(1, s, hkv, 128), mk(1, s, 128))
        out = msa_cuda.block_sparse_attn(q, k, v, sel, validate=False)
    dout = torch.randn_like(out)
    for _ in range(reps):
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
