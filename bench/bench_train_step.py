"""Time one training step (forward + backward) of the example's MSA layer against the same layer
with dense cuDNN attention (issue 4).

    python bench/bench_train_step.py [--seqlens 32768 131072] [--kl-max-seqlen N] [--out DIR]

The model is examples/train_msa_layer.py's RecallModel (embedding + token shift, one attention
layer, LM head) at its default sizes. Variants, each a full step (loss.backward(), no optimizer):
  dense      the main branch is cuDNN SDPA causal attention (no selector, no KL)
  msa        sparse_attn (selector + block-sparse attention kernels) with the LM loss only
  msa+kl     as msa, plus indexer_kl_loss on the selected support with aux.lse (the SM90 KL
             kernels; only up to --kl-max-seqlen)
CUDA events, warm-up steps, median of the timed steps; dense and MSA in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_msa_layer as ex  # noqa: E402

import msa_cuda  # noqa: E402


def step_fn(model: ex.RecallModel, batch, dtype, variant: str, vocab: int):
    """One forward + backward of `variant`; returns the loss (detached)."""
    x = batch["x"]
    prev = F.pad(x[:, :-1], (1, 0))
    h = model.norm(model.embed(x) + model.embed_prev(prev))
    layer = model.attn
    p = layer.projections(h, dtype)
    kl = None
    if variant == "dense":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(p["q"].transpose(1, 2), p["k"].transpose(1, 2),
                                                 p["v"].transpose(1, 2), is_causal=True,
                                                 enable_gqa=True).transpose(1, 2)
    else:
        out, aux = msa_cuda.sparse_attn(p["q"], p["k"], p["v"], p["q_idx"], p["k_idx"], block_size=layer.block_size,
                                        topk=layer.topk, return_aux=True)
        if variant == "msa+kl":
            kl = msa_cuda.indexer_kl_loss(p["q"].detach(), p["k"].detach(), p["q_idx"], p["k_idx"],
                                          aux.block_indices, block_size=layer.block_size, lse=aux.lse,
                                          validate=False)
    b, s = h.shape[:2]
    logits = model.head(h + layer.wo(out.reshape(b, s, -1).to(h.dtype)))
    ans = logits.gather(1, batch["answer_pos"][..., None].expand(-1, -1, vocab)).float()
    loss = F.cross_entropy(ans.reshape(-1, vocab), batch["answers"].reshape(-1))
    if kl is not None:
        loss = loss + kl
    loss.backward()
    return loss.detach()


def time_steps(fn, warmup: int, reps: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--kl-max-seqlen", type=int, default=1 << 20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    dtype, device = torch.bfloat16, torch.device("cuda")
    num_markers, num_values = 64, 64
    vocab = num_markers + num_values + 128
    model = ex.RecallModel(vocab, 256, heads_q=16, heads_kv=2, head_dim=64, index_dim=64, block_size=128,
                           topk=8).to(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"device {torch.cuda.get_device_name()}; example layer: d_model 256, 16/2 heads x 64, index dim 64, "
          f"block 128, topk 8, bf16, B=1", flush=True)
    for s in args.seqlens:
        batch = ex.make_batch(1, s, 32, num_markers, num_values, vocab, gen, device)
        variants = ["dense", "msa"] + (["msa+kl"] if s <= args.kl_max_seqlen else [])
        for variant in variants:
            model.zero_grad(set_to_none=True)
            try:
                med, best = time_steps(lambda: step_fn(model, batch, dtype, variant, vocab), args.warmup, args.reps)
            except torch.OutOfMemoryError as exc:
                print(f"{s:>8} {variant:<8} out of memory: {exc}", flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append({"seqlen": s, "variant": variant, "median_ms": med, "min_ms": best})
            print(f"{s:>8} {variant:<8} {med:10.2f} ms (min {best:.2f})", flush=True)
        dense = next((r for r in rows if r["seqlen"] == s and r["variant"] == "dense"), None)
        for r in rows:
            if r["seqlen"] == s and dense is not None:
                r["speedup_vs_dense"] = dense["median_ms"] / r["median_ms"]
        torch.cuda.empty_cache()
    for r in rows:
        print(json.dumps(r))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_step.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                        indent=1))


if __name__ == "__main__":
    main()
