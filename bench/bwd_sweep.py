"""Time the block_sparse_attn backward under several settings of an environment knob, in one
process (same card, same inputs): python bench/bwd_sweep.py --var MSA_BWD_CHUNK_TOKENS
--values 0 2048 4096 8192 [--seqlens 32768 131072] [--reps 10] [--deterministic].
M3 shape (B=1, Hq=64, Hkv=4, D=128, block 128, topk 16, bf16), indexer selection of random
inputs as in bench_ops.py; CUDA events, 3 warm-up calls, median of --reps. Prints ms and effective
TFLOPS (bench_ops's count: 2.5 x the forward's 4 D G x attended triples)."""

import argparse
import os
import statistics

import torch

from bwd_once import msa_backward_problem
from common import BWD_FACTOR, Shape, count_triples, sparse_fwd_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--var", required=True)
    ap.add_argument("--values", nargs="+", required=True)
    ap.add_argument("--seqlens", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    for s in args.seqlens:
        q, k, v, sel, out, dout = msa_backward_problem(s, args.deterministic)
        flops = BWD_FACTOR * sparse_fwd_flops(Shape(seqlen=s), count_triples(sel, s, 128))
        for value in args.values:
            os.environ[args.var] = value
            times = []
            for i in range(3 + args.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            ms = statistics.median(times)
            print(f"{s:>8} {args.var}={value:<8} {ms:9.3f} ms  {flops / ms / 1e9:7.1f} TFLOPS  "
                  f"(min {min(times):.3f}, max {max(times):.3f})", flush=True)
        del q, k, v, sel, out, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
