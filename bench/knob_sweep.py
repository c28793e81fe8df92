"""Time the block_sparse_attn backward (or forward, or the indexer_kl_loss training call) under
several settings of an environment knob, in one process (same card, same inputs):
  python bench/knob_sweep.py --var MSA_BWD_CHUNK_TOKENS --values 0 2048 4096 8192
  python bench/knob_sweep.py --op fwd --var MSA_FWD_PARTIAL_KIB --values 1048576 2097152
  python bench/knob_sweep.py --op kl --var NAME --values A B
[--seqlens 32768 131072] [--reps 10] [--deterministic]. M3 shape (B=1, Hq=64, Hkv=4, D=128,
block 128, topk 16, bf16), indexer selection of random inputs as in bench_ops.py; CUDA events,
3 warm-up calls, median of --reps. Prints ms and effective TFLOPS (bench_ops's count: the
forward's 4 D G x attended triples, the backward 2.5 x that). For kl (forward + backward, the
forward's lse given, validate=False) the TFLOPS column uses the forward's count, and a line with
the attention forward's time on the same inputs gives the ratio the issue asks for."""

import argparse
import os
import statistics

import torch

import msa_cuda
from bwd_once import msa_backward_problem
from common import BWD_FACTOR, Shape, count_triples, event_times, sparse_fwd_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=["bwd", "fwd", "kl"], default="bwd")
    ap.add_argument("--var", required=True)
    ap.add_argument("--values", nargs="+", required=True)
    ap.add_argument("--seqlens", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    for s in args.seqlens:
        q, k, v, sel, out, dout = msa_backward_problem(s, args.deterministic)
        flops = sparse_fwd_flops(Shape(seqlen=s), count_triples(sel, s, 128))
        if args.op == "bwd":
            flops *= BWD_FACTOR
            run = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        else:
            qd, kd, vd = (x.detach() for x in (q, k, v))
            run = lambda: msa_cuda.block_sparse_attn(qd, kd, vd, sel, validate=False)  # noqa: E731
        if args.op == "kl":
            fwd_ms = statistics.median(event_times(run, args.reps))
            print(f"{s:>8} attention forward (the ratio's denominator) {fwd_ms:9.3f} ms", flush=True)
            lse = msa_cuda.block_sparse_attn(qd, kd, vd, sel, return_lse=True, validate=False)[1]
            leaf = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(True)  # noqa: E731
            q_idx, k_idx = leaf(1, s, k.shape[2], 128), leaf(1, s, 128)

            def run():
                loss = msa_cuda.indexer_kl_loss(qd, kd, q_idx, k_idx, sel, lse=lse, validate=False)
                return torch.autograd.grad(loss, (q_idx, k_idx))
        for value in args.values:
            os.environ[args.var] = value
            times = event_times(run, args.reps)
            ms = statistics.median(times)
            ratio = f"  kl/fwd {ms / fwd_ms:.3f}" if args.op == "kl" else ""
            print(f"{s:>8} {args.op} {args.var}={value:<8} {ms:9.3f} ms  {flops / ms / 1e9:7.1f} TFLOPS  "
                  f"(min {min(times):.3f}, max {max(times):.3f}){ratio}", flush=True)
        del q, k, v, sel, out, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
