"""Time the block_sparse_attn backward (or forward) under several settings of an environment knob,
in one process (same card, same inputs):
  python bench/knob_sweep.py --var MSA_BWD_CHUNK_TOKENS --values 0 2048 4096 8192
  python bench/knob_sweep.py --op fwd --var MSA_FWD_PARTIAL_KIB --values 1048576 2097152
[--seqlens 32768 131072] [--reps 10] [--deterministic]. M3 shape (B=1, Hq=64, Hkv=4, D=128,
block 128, topk 16, bf16), indexer selection of random inputs as in bench_ops.py; CUDA events,
3 warm-up calls, median of --reps. Prints ms and effective TFLOPS (bench_ops's count: the
forward's 4 D G x attended triples, the backward 2.5 x that)."""

import argparse
import os
import statistics

import torch

import msa_cuda
from bwd_once import msa_backward_problem
from common import BWD_FACTOR, Shape, count_triples, sparse_fwd_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=["bwd", "fwd"], default="bwd")
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
        for value in args.values:
            os.environ[args.var] = value
            times = []
            for i in range(3 + args.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            ms = statistics.median(times)
            print(f"{s:>8} {args.op} {args.var}={value:<8} {ms:9.3f} ms  {flops / ms / 1e9:7.1f} TFLOPS  "
                  f"(min {min(times):.3f}, max {max(times):.3f})", flush=True)
        del q, k, v, sel, out, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
