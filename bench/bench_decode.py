"""Time one decoding step of msa_cuda.sparse_attn_with_kvcache against dense cuDNN decoding.

    python bench/bench_decode.py [--cases 131072x8 1048576x2] [--new-tokens 1] [--out DIR]

M3 shape (Hq=64, Hkv=4, D=Di=128, block 128, topk 16), bf16, contiguous caches filled to the
given length, one new token per request (no append). Dense baseline: torch SDPA (cuDNN, GQA) of
the new queries over the whole cache, in the same process. Both sides are timed eagerly and as a
captured CUDA graph (how a serving loop runs a decode step: no launch gaps); each median uses CUDA
events with L2 flushed before each rep. Reports the speedup and each side's bandwidth on the bytes
it must read (dense: K and V of the whole cache; MSA: the index-key cache plus topk blocks of K
and V per group). Issue 5's targets: >= 7x at 1M x 2 and 128K x 8 (bf16 index keys), and >= 85%
of dense decoding's bandwidth. --profile adds the per-kernel CUDA time of one MSA step, --timeline
each kernel's start and end inside a replayed step graph, --append the step that appends first,
--layers N the per-layer time of N steps over independent caches captured in one graph (a serving
loop's whole forward), dense likewise; with --append also the layers' steps that append first.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import L2Flusher, run_metadata, time_op  # noqa: E402

import msa_cuda  # noqa: E402

HQ, HKV, D, DI, BS, TOPK = 64, 4, 128, 128, 128, 16


def capture(step):
    """A CUDA graph of step(None), after a warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(None)
    return graph


def profile_kernels(step, reps=10):
    """Mean CUDA time per step of each kernel of step(None), in microseconds. The decode kernels
    are launched one after the other for this (MSA_CUDA_DECODE_PDL=0): with programmatic launches a
    kernel's span would include its wait for the one before."""
    from torch.profiler import ProfilerActivity, profile

    os.environ["MSA_CUDA_DECODE_PDL"] = "0"
    step(None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step(None)
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0) > 0:
            us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if us > 0:
                times[ev.key[:90]] = us / reps
    del os.environ["MSA_CUDA_DECODE_PDL"]
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def graph_timeline(graph, reps=10):
    """Where a replayed step graph's time goes (programmatic launches on): each kernel's start and
    end in microseconds from the step's first kernel start, medians over reps replays."""
    import statistics
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    steps, step = [], []
    for e in kernels:  # replays are synchronized: a long idle gap starts the next step
        if step and e["ts"] - max(k["ts"] + k["dur"] for k in step) > 30:
            steps.append(step)
            step = []
        step.append(e)
    if step:
        steps.append(step)
    n = min(len(s) for s in steps)
    return [dict(name=steps[0][i]["name"][:60],
                 start_us=statistics.median(s[i]["ts"] - s[0]["ts"] for s in steps),
                 end_us=statistics.median(s[i]["ts"] + s[i]["dur"] - s[0]["ts"] for s in steps)) for i in range(n)]


def record_timeline(row, key, graph):
    """graph_timeline(graph) into row[key], printed."""
    row[key] = graph_timeline(graph)
    for k in row[key]:
        print(f"      {k['start_us']:7.1f} .. {k['end_us']:7.1f} us  {k['name']}")


def time_layers(length, batch, n, layers, mask, flush, reps, fp8, append=False):
    """Per-layer time of `layers` decoding steps over independent caches (a model's layers)
    captured in one CUDA graph, for MSA (bf16 and, with fp8, e4m3 index keys) and dense: how a
    serving loop that captures its whole forward runs, the graph's launch shared by the layers.
    Independent caches keep one layer's selected blocks from sitting in L2 for the next. With
    append, also the steps that first append n new tokens per layer (as serving does; each replay
    writes the same rows, so the cache length stays `length`)."""
    dev = torch.device("cuda")
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    sets = []
    for _ in range(layers):
        ki = torch.randn(batch, length, DI, **bf16)
        layer = dict(q=torch.randn(batch, n, HQ, D, **bf16), q_idx=torch.randn(batch, n, HKV, DI, **bf16),
                     k=torch.randn(batch, length, HKV, D, **bf16), v=torch.randn(batch, length, HKV, D, **bf16), ki=ki)
        if fp8:
            layer["ki8"], layer["scales"] = msa_cuda.quantize_index_keys(ki)
        if append:
            layer["new"] = dict(k=torch.randn(batch, n, HKV, D, **bf16), v=torch.randn(batch, n, HKV, D, **bf16),
                                k_idx=torch.randn(batch, n, DI, **bf16))
        sets.append(layer)
    lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
    lens_before = lens - n

    def msa_layers(keys, scales, with_append=False):
        def run(_):
            for layer in sets:
                new = layer["new"] if with_append else {}
                msa_cuda.sparse_attn_with_kvcache(layer["q"], layer["k"], layer["v"], layer["q_idx"], layer[keys],
                                                  k_idx_scale_cache=layer.get(scales),
                                                  cache_seqlens=lens_before if with_append else lens,
                                                  block_size=BS, topk=TOPK, **new)
        return run

    def dense_layers(_):
        for layer in sets:
            F.scaled_dot_product_attention(layer["q"].transpose(1, 2), layer["k"].transpose(1, 2),
                                           layer["v"].transpose(1, 2), attn_mask=mask, enable_gqa=True)

    result = dict(layers=layers)
    variants = [("msa", msa_layers("ki", None)), ("dense", dense_layers)]
    if fp8:
        variants.append(("fp8", msa_layers("ki8", "scales")))
    if append:
        variants.append(("msa_append", msa_layers("ki", None, True)))
        if fp8:
            variants.append(("fp8_append", msa_layers("ki8", "scales", True)))
    for name, fn in variants:
        graph = capture(fn)
        result[name + "_ms"] = time_op(lambda _: graph.replay(), flush, reps=reps).median_ms / layers
        del graph
    for name in ("msa", "fp8", "msa_append", "fp8_append"):
        if name + "_ms" in result:
            result[name + "_speedup"] = result["dense_ms"] / result[name + "_ms"]
    del sets
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["131072x8", "1048576x2"], help="LENGTHxBATCH")
    ap.add_argument("--new-tokens", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="per-kernel times of the MSA step (torch.profiler)")
    ap.add_argument("--fp8", action="store_true", help="also time the step over an fp8 (e4m3) index-key cache")
    ap.add_argument("--append", action="store_true",
                    help="also time the step that appends the new tokens' k, v, k_idx first (as serving does)")
    ap.add_argument("--timeline", action="store_true", help="each kernel's start / end inside a replayed step")
    ap.add_argument("--layers", type=int, default=0,
                    help="also time this many steps over independent caches in one graph (per-layer time)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    flush = L2Flusher(dev)
    rows = []
    for case in args.cases:
        length, batch = map(int, case.split("x"))
        n = args.new_tokens
        bf16 = dict(device=dev, dtype=torch.bfloat16)
        k_cache = torch.randn(batch, length, HKV, D, **bf16)
        v_cache = torch.randn(batch, length, HKV, D, **bf16)
        ki_cache = torch.randn(batch, length, DI, **bf16)
        q = torch.randn(batch, n, HQ, D, **bf16)
        q_idx = torch.randn(batch, n, HKV, DI, **bf16)
        lens = torch.full((batch,), length, dtype=torch.int32, device=dev)

        def msa_step(_):
            return msa_cuda.sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, ki_cache, cache_seqlens=lens,
                                                     block_size=BS, topk=TOPK)

        qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        # n new tokens at the end of the cache: bottom-right causal only matters for n > 1.
        mask = None
        if n > 1:
            pos = torch.arange(length, device=dev)
            mask = (pos[None, :] <= (length - n + torch.arange(n, device=dev))[:, None])

        def dense_step(_):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)

        t_msa = time_op(msa_step, flush, reps=args.reps)
        t_dense = time_op(dense_step, flush, reps=args.reps)
        g_msa, g_dense = capture(msa_step), capture(dense_step)
        tg_msa = time_op(lambda _: g_msa.replay(), flush, reps=args.reps)
        tg_dense = time_op(lambda _: g_dense.replay(), flush, reps=args.reps)
        dense_bytes = 2 * batch * length * HKV * D * 2
        blocks = min(TOPK, -(-length // BS))
        msa_bytes = batch * (length * DI * 2 + n * 2 * HKV * blocks * BS * D * 2)
        row = dict(length=length, batch=batch, new_tokens=n, msa_ms=t_msa.median_ms, dense_ms=t_dense.median_ms,
                   msa_graph_ms=tg_msa.median_ms, dense_graph_ms=tg_dense.median_ms)
        for tag, tm, td in (("", t_msa, t_dense), ("graph_", tg_msa, tg_dense)):
            row[tag + "speedup"] = td.median_ms / tm.median_ms
            row[tag + "dense_gbps"] = dense_bytes / td.median_ms / 1e6
            row[tag + "msa_gbps"] = msa_bytes / tm.median_ms / 1e6
            row[tag + "bandwidth_ratio"] = row[tag + "msa_gbps"] / row[tag + "dense_gbps"]
            print(f"{length:>8} x {batch} {'graph' if tag else 'eager'}: MSA {tm.median_ms:8.4f} ms "
                  f"({row[tag + 'msa_gbps']:7.1f} GB/s)  dense {td.median_ms:8.4f} ms ({row[tag + 'dense_gbps']:7.1f} "
                  f"GB/s)  speedup {row[tag + 'speedup']:.2f}x  bandwidth ratio {row[tag + 'bandwidth_ratio']:.2f}",
                  flush=True)
        if args.profile:
            row["kernels_us"] = profile_kernels(msa_step)
            for name, us in row["kernels_us"].items():
                print(f"    {us:9.2f} us  {name}")
        if args.timeline:
            record_timeline(row, "timeline", g_msa)
        if args.append:
            k_new = torch.randn(batch, n, HKV, D, **bf16)
            v_new, ki_new = torch.randn_like(k_new), torch.randn(batch, n, DI, **bf16)
            lens_before = lens - n  # each replay appends the same tokens at the same rows

            def msa_append_step(_):
                return msa_cuda.sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, ki_cache, cache_seqlens=lens_before,
                                                         k=k_new, v=v_new, k_idx=ki_new, block_size=BS, topk=TOPK)

            g_app = capture(msa_append_step)
            tg_app = time_op(lambda _: g_app.replay(), flush, reps=args.reps)
            row.update(append_graph_ms=tg_app.median_ms, append_graph_speedup=tg_dense.median_ms / tg_app.median_ms)
            print(f"{length:>8} x {batch} graph, with append: MSA {tg_app.median_ms:8.4f} ms  speedup "
                  f"{row['append_graph_speedup']:.2f}x", flush=True)
            if args.timeline:
                record_timeline(row, "append_timeline", g_app)
            del g_app
        if args.fp8:
            keys, scales = msa_cuda.quantize_index_keys(ki_cache)

            def msa_fp8_step(_):
                return msa_cuda.sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, keys, k_idx_scale_cache=scales,
                                                         cache_seqlens=lens, block_size=BS, topk=TOPK)

            g_fp8 = capture(msa_fp8_step)
            tg_fp8 = time_op(lambda _: g_fp8.replay(), flush, reps=args.reps)
            fp8_bytes = batch * (length * (DI + 4) + n * 2 * HKV * blocks * BS * D * 2)
            row.update(fp8_graph_ms=tg_fp8.median_ms, fp8_graph_speedup=tg_dense.median_ms / tg_fp8.median_ms,
                       fp8_graph_gbps=fp8_bytes / tg_fp8.median_ms / 1e6)
            row["fp8_graph_bandwidth_ratio"] = row["fp8_graph_gbps"] / row["graph_dense_gbps"]
            print(f"{length:>8} x {batch} graph, fp8 index keys: MSA {tg_fp8.median_ms:8.4f} ms "
                  f"({row['fp8_graph_gbps']:7.1f} GB/s)  speedup {row['fp8_graph_speedup']:.2f}x  bandwidth ratio "
                  f"{row['fp8_graph_bandwidth_ratio']:.2f}", flush=True)
            if args.profile:
                row["fp8_kernels_us"] = profile_kernels(msa_fp8_step)
                for name, us in row["fp8_kernels_us"].items():
                    print(f"    {us:9.2f} us  {name}")
            if args.timeline:
                record_timeline(row, "fp8_timeline", g_fp8)
            del keys, scales, g_fp8
        if args.layers > 0:
            row["graph_layers"] = time_layers(length, batch, n, args.layers, mask, flush, args.reps, args.fp8,
                                              args.append)
            lay = row["graph_layers"]
            print(f"{length:>8} x {batch} graph of {args.layers} layers, per layer: MSA {lay['msa_ms']:8.4f} ms  dense "
                  f"{lay['dense_ms']:8.4f} ms  speedup {lay['msa_speedup']:.2f}x"
                  + (f"  fp8 {lay['fp8_ms']:8.4f} ms ({lay['fp8_speedup']:.2f}x)" if args.fp8 else ""), flush=True)
            if args.append:
                print(f"{length:>8} x {batch} graph of {args.layers} layers with append, per layer: MSA "
                      f"{lay['msa_append_ms']:8.4f} ms ({lay['msa_append_speedup']:.2f}x)"
                      + (f"  fp8 {lay['fp8_append_ms']:8.4f} ms ({lay['fp8_append_speedup']:.2f}x)" if args.fp8 else ""),
                      flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode.json").write_text(json.dumps(dict(meta=run_metadata(False), rows=rows), indent=1))


if __name__ == "__main__":
    main()
