"""Train a small MSA attention layer on a synthetic long-range recall task (issue 4, item 3).

The model is one MiniMax Sparse Attention layer between a token embedding and an LM head:

    h = Embed(x_t) + EmbedPrev(x_{t-1})             (a one-step token shift, so a key can
                                                     carry the token that precedes it)
    q, k, v = Wq h, Wk h, Wv h                       main branch, GQA: Hq heads, Hkv KV heads
    q_idx = RMSNorm(Wqi h), k_idx = RMSNorm(Wki h)   indexer: Hkv index heads, one index-key head
    out, aux = msa_cuda.sparse_attn(q, k, v, q_idx, k_idx, return_aux=True)
    logits = LMHead(h + Wo out)

The task: each sequence holds `pairs` (marker, value) bigrams in its first half and, in its second
half, the same markers again; the LM loss is the cross entropy of predicting each marker's value
right after its second occurrence. Only attention from the second occurrence to the first can
solve it, and the first occurrence is arbitrarily far back, so the selector must find it.

Training signal (MSA_SPEC s.6-7): the LM loss trains the main branch (q, k, v reach it through
the selected blocks; nothing flows through the selection); the indexer gets its gradient only from
`indexer_kl_loss`, the KL between the group-mean main-branch attention (teacher, constant) and the
index-score softmax (student). The first `--warmup-steps` steps use the dense warm-up support
(`dense=True`: the whole causal history), later steps the selected blocks with the main branch's
lse from `aux.lse` (no second main-branch forward).

Logged every `--log-every` steps (stdout, JSON lines and a plot in `--out`):
  lm       LM loss on the answer positions
  kl       the indexer loss value
  acc      answer accuracy
  recall   share of the main branch's attention mass (dense, on sampled queries) that lies in the
           selected blocks, averaged over heads
  overlap  share of the selected blocks that are among the main branch's own top-k blocks by
           attention mass (group mean), on the same sampled queries

    python examples/train_msa_layer.py --seqlen 8192 --steps 300 --out examples/out
    python examples/train_msa_layer.py --device cpu --seqlen 512 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import msa_cuda
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import msa_cuda


class MSALayer(nn.Module):
    """One MSA attention block: main-branch and indexer projections, sparse attention, output."""

    def __init__(self, d_model: int, heads_q: int, heads_kv: int, head_dim: int, index_dim: int,
                 block_size: int, topk: int):
        super().__init__()
        self.heads_q, self.heads_kv, self.head_dim, self.index_dim = heads_q, heads_kv, head_dim, index_dim
        self.block_size, self.topk = block_size, topk
        self.wq = nn.Linear(d_model, heads_q * head_dim, bias=False)
        self.wk = nn.Linear(d_model, heads_kv * head_dim, bias=False)
        self.wv = nn.Linear(d_model, heads_kv * head_dim, bias=False)
        self.wo = nn.Linear(heads_q * head_dim, d_model, bias=False)
        self.wq_idx = nn.Linear(d_model, heads_kv * index_dim, bias=False)
        self.wk_idx = nn.Linear(d_model, index_dim, bias=False)
        self.norm_q_idx = nn.RMSNorm(index_dim)
        self.norm_k_idx = nn.RMSNorm(index_dim)

    def projections(self, h: torch.Tensor, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        b, s, _ = h.shape
        return {
            "q": self.wq(h).view(b, s, self.heads_q, self.head_dim).to(dtype),
            "k": self.wk(h).view(b, s, self.heads_kv, self.head_dim).to(dtype),
            "v": self.wv(h).view(b, s, self.heads_kv, self.head_dim).to(dtype),
            "q_idx": self.norm_q_idx(self.wq_idx(h).view(b, s, self.heads_kv, self.index_dim)).to(dtype),
            "k_idx": self.norm_k_idx(self.wk_idx(h)).to(dtype),
        }

    def forward(self, h: torch.Tensor, dtype: torch.dtype, dense_kl: bool, dense_attn: bool = False):
        p = self.projections(h, dtype)
        out, aux = msa_cuda.sparse_attn(p["q"], p["k"], p["v"], p["q_idx"], p["k_idx"], block_size=self.block_size,
                                        topk=self.topk, return_aux=True)
        if dense_attn:
            # Dense warm-up of the main branch: it first learns where to look over the whole causal
            # history (the selection is still made, for the metrics); the indexer distills from it.
            out = F.scaled_dot_product_attention(p["q"].transpose(1, 2), p["k"].transpose(1, 2),
                                                 p["v"].transpose(1, 2), is_causal=True,
                                                 enable_gqa=True).transpose(1, 2)
        # The teacher is a constant (stop-gradient on q and k); only q_idx and k_idx learn from it.
        if dense_kl:
            kl = msa_cuda.indexer_kl_loss(p["q"].detach(), p["k"].detach(), p["q_idx"], p["k_idx"], None,
                                          block_size=self.block_size, dense=True)
        else:
            kl = msa_cuda.indexer_kl_loss(p["q"].detach(), p["k"].detach(), p["q_idx"], p["k_idx"],
                                          aux.block_indices, block_size=self.block_size, lse=aux.lse,
                                          validate=False)  # select_blocks made it: no host sync
        b, s = h.shape[:2]
        return self.wo(out.reshape(b, s, -1).to(h.dtype)), kl, aux, p


class RecallModel(nn.Module):
    def __init__(self, vocab: int, d_model: int, **layer_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.embed_prev = nn.Embedding(vocab, d_model)
        self.norm = nn.RMSNorm(d_model)
        self.attn = MSALayer(d_model, **layer_kwargs)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: torch.Tensor, dtype: torch.dtype, dense_kl: bool, dense_attn: bool = False):
        prev = F.pad(x[:, :-1], (1, 0))
        h = self.norm(self.embed(x) + self.embed_prev(prev))
        attn_out, kl, aux, proj = self.attn(h, dtype, dense_kl, dense_attn)
        return self.head(h + attn_out), kl, aux, proj


def make_batch(batch: int, seqlen: int, pairs: int, num_markers: int, num_values: int, vocab: int,
               gen: torch.Generator, device) -> Dict[str, torch.Tensor]:
    """Filler tokens with `pairs` (marker, value) bigrams in the first half and the markers again,
    shuffled, in the second half; targets are the values right after the second occurrences."""
    filler_lo = num_markers + num_values
    x = torch.randint(filler_lo, vocab, (batch, seqlen), generator=gen)
    answer_pos = torch.empty(batch, pairs, dtype=torch.long)
    answers = torch.empty(batch, pairs, dtype=torch.long)
    half = seqlen // 2
    for b in range(batch):
        markers = torch.randperm(num_markers, generator=gen)[:pairs]
        values = num_markers + torch.randint(0, num_values, (pairs,), generator=gen)
        first = torch.randperm(half // 2 - 1, generator=gen)[:pairs] * 2  # even slots, no overlap
        x[b, first] = markers
        x[b, first + 1] = values
        second = half + torch.randperm((seqlen - half) // 2 - 1, generator=gen)[:pairs] * 2
        order = torch.randperm(pairs, generator=gen)
        x[b, second] = markers[order]
        answer_pos[b] = second  # the model predicts token second + 1 at position second
        answers[b] = values[order]
    return {"x": x.to(device), "answer_pos": answer_pos.to(device), "answers": answers.to(device)}


@torch.no_grad()
def selector_quality(proj: Dict[str, torch.Tensor], block_indices: torch.Tensor, block_size: int,
                     queries: torch.Tensor) -> Dict[str, float]:
    """Recall (main-branch attention mass inside the selected blocks) and overlap (selected blocks
    among the main branch's top-k blocks by group-mean mass), from dense attention on `queries`."""
    q, k = proj["q"].float(), proj["k"].float()  # [B, S, Hq, D], [B, S, Hkv, D]
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    topk = block_indices.shape[-1]
    nblk = (s + block_size - 1) // block_size
    recall, overlap = [], []
    for bi in range(b):
        qs = q[bi, queries]                                    # [n, Hq, D]
        kk = k[bi].repeat_interleave(g, dim=1)                 # [S, Hq, D]
        scores = torch.einsum("nhd,shd->nhs", qs, kk) / math.sqrt(d)
        causal = torch.arange(s, device=q.device)[None, :] <= queries[:, None]
        probs = scores.masked_fill(~causal[:, None, :], float("-inf")).softmax(-1)  # [n, Hq, S]
        pad = nblk * block_size - s
        mass = F.pad(probs, (0, pad)).view(len(queries), hq, nblk, block_size).sum(-1)  # [n, Hq, nblk]
        sel = block_indices[bi, queries].long()                # [n, Hkv, topk]
        chosen = torch.zeros(len(queries), hkv, nblk + 1, device=q.device)
        chosen.scatter_(2, torch.where(sel < 0, nblk, sel), 1.0)
        chosen = chosen[..., :nblk].repeat_interleave(g, dim=1)  # [n, Hq, nblk]
        recall.append((mass * chosen).sum(-1).mean().item())
        group_mass = mass.view(len(queries), hkv, g, nblk).mean(2)  # [n, Hkv, nblk]
        top = group_mass.topk(min(topk, nblk), dim=-1).indices
        top_mask = torch.zeros_like(group_mass).scatter_(2, top, 1.0)
        n_sel = (sel >= 0).sum(-1).clamp_min(1).float()
        hit = (top_mask * chosen.view(len(queries), hkv, g, nblk)[:, :, 0]).sum(-1)
        overlap.append((hit / n_sel).mean().item())
    return {"recall": sum(recall) / len(recall), "overlap": sum(overlap) / len(overlap)}


def plot(history: List[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [h["lm"] for h in history], label="LM loss")
    axes[0].set_title("LM loss (answers)")
    axes[1].plot(steps, [h["kl"] for h in history], label="KL")
    axes[1].set_title("indexer KL")
    axes[2].plot(steps, [h["recall"] for h in history], label="recall (mass in selected blocks)")
    axes[2].plot(steps, [h["overlap"] for h in history], label="overlap with top blocks")
    axes[2].plot(steps, [h["acc"] for h in history], label="answer accuracy")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=50, help="steps with the dense warm-up KL support")
    p.add_argument("--dense-attn-steps", type=int, default=0,
                   help="first steps with a dense causal main branch (SDPA) instead of the selected blocks")
    p.add_argument("--kl-coeff", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads-q", type=int, default=16)
    p.add_argument("--heads-kv", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--index-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--pairs", type=int, default=32, help="(marker, value) pairs per sequence")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--sample-queries", type=int, default=64, help="queries for the recall/overlap metrics")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for history.jsonl and curves.png")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    num_markers, num_values = 64, 64
    vocab = num_markers + num_values + 128
    if args.pairs > num_markers or 2 * args.pairs + 2 > args.seqlen // 2:
        raise ValueError(f"--pairs must be at most {num_markers} and fit in half of --seqlen")
    model = RecallModel(vocab, args.d_model, heads_q=args.heads_q, heads_kv=args.heads_kv, head_dim=args.head_dim,
                        index_dim=args.index_dim, block_size=args.block_size, topk=args.topk).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(out_dir / "history.jsonl", "w")
    history: List[dict] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = make_batch(args.batch, args.seqlen, args.pairs, num_markers, num_values, vocab, gen, device)
        dense_kl = step <= args.warmup_steps
        dense_attn = step <= args.dense_attn_steps
        logits, kl, aux, proj = model(batch["x"], dtype, dense_kl, dense_attn)
        ans_logits = logits.gather(1, batch["answer_pos"][..., None].expand(-1, -1, vocab)).float()
        lm = F.cross_entropy(ans_logits.reshape(-1, vocab), batch["answers"].reshape(-1))
        loss = lm + args.kl_coeff * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            acc = (ans_logits.argmax(-1) == batch["answers"]).float().mean().item()
            # Sample from the answer positions (where long-range attention matters) and elsewhere.
            n = min(args.sample_queries, args.seqlen)
            queries = torch.cat([batch["answer_pos"][0, : n // 2],
                                 torch.randint(0, args.seqlen, (n - min(n // 2, args.pairs),), generator=gen).to(device)])
            quality = selector_quality(proj, aux.block_indices, args.block_size, queries)
            row = {"step": step, "lm": lm.item(), "kl": kl.item(), "acc": acc, **quality,
                   "kl_support": "dense" if dense_kl else "selected", "main": "dense" if dense_attn else "sparse",
                   "elapsed_s": time.perf_counter() - start}
            history.append(row)
            print(json.dumps(row), flush=True)
            if out_dir:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
    if out_dir:
        log_file.close()
        meta = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "kernels": msa_cuda.compiled_variants() if device.type == "cuda" else {}}
        (out_dir / "run.json").write_text(json.dumps(meta, indent=1))
        plot(history, out_dir / "curves.png")
    return history


if __name__ == "__main__":
    main()
