"""Where the time of one block_sparse_attn forward goes: per-kernel CUDA time (main, combine, and
the plan by its count, scan and fill kernels) from torch.profiler, at M3 shape with the indexer's
(or the hot-block) selection. --backward profiles the attention's backward instead, --kl the
indexer_kl_loss training call (forward + backward, the forward's lse given).

    python bench/profile_fwd.py [--seqlen 131072] [--reps 3] [--selection indexer|hot] [--backward | --kl]

With --no-profiler it only runs the forward (a warm-up call and --reps calls), for external
tools: ncu -k regex:fwd_kernel ... python bench/profile_fwd.py --no-profiler --seqlen 32768
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import msa_cuda
from common import Shape, hot_block_selection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=131072)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--selection", choices=("indexer", "hot"), default="indexer",
                        help="the indexer's selection (random index keys) or bench/common.py's hot-block one")
    parser.add_argument("--no-profiler", action="store_true", help="just run the calls (for ncu, compute-sanitizer)")
    parser.add_argument("--backward", action="store_true",
                        help="profile the backward instead (the forward runs once, outside the profiler)")
    parser.add_argument("--kl", action="store_true",
                        help="profile indexer_kl_loss forward + backward instead (lse from one untimed forward)")
    args = parser.parse_args()
    s, hq, hkv, d = args.seqlen, 64, 4, 128
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(1, s, hq, d), mk(1, s, hkv, d), mk(1, s, hkv, d)
    if args.selection == "hot":
        sel = hot_block_selection(Shape(batch=1, seqlen=s), torch.device("cuda"))
    else:
        sel = msa_cuda.select_blocks(mk(1, s, hkv, 128), mk(1, s, 128))
    run = lambda: msa_cuda.block_sparse_attn(q, k, v, sel, validate=False)  # noqa: E731
    if args.backward:
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        out = msa_cuda.block_sparse_attn(q, k, v, sel, validate=False)
        dout = torch.randn_like(out)
        run = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
    if args.kl:
        lse = msa_cuda.block_sparse_attn(q, k, v, sel, return_lse=True, validate=False)[1]
        q_idx, k_idx = mk(1, s, hkv, 128).requires_grad_(True), mk(1, s, 128).requires_grad_(True)

        def run():
            loss = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, sel, lse=lse, validate=False)
            return torch.autograd.grad(loss, (q_idx, k_idx))
    run()
    torch.cuda.synchronize()
    if args.no_profiler:
        for _ in range(args.reps):
            run()
        torch.cuda.synchronize()
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            run()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name
            plan_step = next((step for step in ("count", "scan", "fill") if f"plan_{step}" in name), None)
            kind = ("main (fwd_kernel)" if "fwd_kernel" in name else "main (bwd_kernel)" if "bwd_kernel" in name
                    else "kl pass 1 (stats)" if "kl_kernel" in name and "true>" in name
                    else "kl pass 2 (kl_kernel)" if "kl_kernel" in name
                    else "combine" if "combine" in name
                    else f"plan ({plan_step})" if plan_step else "other (" + name[:40] + ")")
            totals[kind] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    whole = sum(totals.values())
    what = "indexer_kl_loss fwd+bwd" if args.kl else f"block_sparse_attn {'backward' if args.backward else 'forward'}"
    print(f"{what}, S={s}, M3 shape, {args.selection} selection, {args.reps} calls, {torch.cuda.get_device_name()}")
    for kind, us in totals.most_common():
        print(f"  {kind:40s} {us / args.reps / 1000:9.3f} ms/call  {100 * us / whole:5.1f}%")


if __name__ == "__main__":
    main()
