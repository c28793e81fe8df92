"""Where a decode step's time goes, CTA by CTA: the indexer and the attention (issue 5).

    python bench/trace_decode_select.py [--cases 1048576x2 131072x8] [--reps 6] [--out DIR] [--raw]

Runs eager decode steps (M3 shape, one new token, bf16 and fp8 index-key caches) with
MSA_DECODE_TRACE_FILE set, so each step's split-indexer CTAs stamp %globaltimer at fixed points
(include/msa/decode/decode_trace.h), and prints per step the spread of those points over the CTAs:
when CTAs start, how long the first key stage takes to land, how long each CTA streams, how
unevenly they finish, and how long the list epilogue takes. Medians over the steps after the
first. The stamps synchronize the step, so only in-kernel times mean anything here, not the step's
wall time. The indexer's CTAs also stamp the stages at 1/4, 1/2 and 3/4 of their slice (is a slow
CTA slow all along or at the end?), and the attention's CTAs stamp when the indexer grid is seen
complete, the selection merged, the first block landed, the blocks attended and the chunks merged.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_metadata  # noqa: E402

import msa_cuda  # noqa: E402

HQ, HKV, D, DI, BS, TOPK = 64, 4, 128, 128, 128, 16
SLOTS = ["start", "waited", "first_issue", "first_stage", "loop_end", "list_written", "sm", "stages", "quarter",
         "half", "three_quarters", "epilogue_synced"]
ATTN_SLOTS = ["start", "waited", "selected", "first_block", "loop_end", "done", "sm", "blocks"]


def read_steps(path):
    steps, cur, section = [], None, "ctas"
    for line in Path(path).read_text().splitlines():
        if line.startswith("step"):
            cur = dict(header=list(map(int, line.split()[1:])), ctas=[], attn=[])
            steps.append(cur)
            section = "ctas"
        elif line.startswith("attn"):
            section = "attn"
        elif section == "ctas":
            cur["ctas"].append(dict(zip(SLOTS, map(int, line.split()))))
        else:
            values = list(map(int, line.split()))
            cur["attn"].append(dict(cta=values[0], **dict(zip(ATTN_SLOTS, values[1:]))))
    return steps


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def summarize(step, key_bytes):
    """Microsecond figures of one step."""
    ctas = [c for c in step["ctas"] if c["stages"] > 0]
    us = lambda ns: ns / 1000.0  # noqa: E731
    first = min(c["first_stage"] for c in ctas)
    last_end = max(c["loop_end"] for c in ctas)
    loop = [c["loop_end"] - c["first_stage"] for c in ctas]
    ends = [c["loop_end"] for c in ctas]
    epi = [c["list_written"] - c["loop_end"] for c in ctas]
    # Quarter times of the slowest and fastest tenth of the CTAs (by stream time): slow all along,
    # or slow at the end?
    by_stream = sorted(ctas, key=lambda c: c["loop_end"] - c["first_stage"])
    tenth = max(1, len(ctas) // 10)

    def quarters(group):
        marks = ["first_stage", "quarter", "half", "three_quarters", "loop_end"]
        return [us(statistics.median(c[marks[i + 1]] - c[marks[i]] for c in group)) for i in range(4)]

    attn = step["attn"]
    out = {}
    worked = [c for c in attn if c["blocks"] > 0]
    if worked and all(c["done"] for c in attn):
        indexer_end = max(c["list_written"] for c in ctas)
        out = {
            "attn_ctas": len(attn),
            "attn_start_median": us(statistics.median(c["start"] for c in attn)),
            "attn_waited_min": us(min(c["waited"] for c in attn) - indexer_end),
            "attn_waited_max": us(max(c["waited"] for c in attn) - indexer_end),
            "attn_merge_median": us(statistics.median(c["selected"] - c["waited"] for c in attn)),
            "attn_merge_max": us(max(c["selected"] - c["waited"] for c in attn)),
            "attn_first_block_median": us(statistics.median(c["first_block"] - c["selected"] for c in worked)),
            "attn_first_block_max": us(max(c["first_block"] - c["selected"] for c in worked)),
            "attn_blocks_median": us(statistics.median(c["loop_end"] - c["first_block"] for c in worked)),
            "attn_blocks_max": us(max(c["loop_end"] - c["first_block"] for c in worked)),
            "attn_loop_end_max": us(max(c["loop_end"] for c in attn) - indexer_end),
            "attn_chunk_merge_median": us(statistics.median(c["done"] - c["loop_end"] for c in attn)),
            "attn_done_max": us(max(c["done"] for c in attn) - indexer_end),
        }
    return {
        "ctas": len(ctas),
        "quarters_slowest_tenth": quarters(by_stream[-tenth:]),
        "quarters_fastest_tenth": quarters(by_stream[:tenth]),
        "epilogue_sync_median": us(statistics.median(c["epilogue_synced"] - c["loop_end"] for c in ctas)),
        "epilogue_merge_median": us(statistics.median(c["list_written"] - c["epilogue_synced"] for c in ctas)),
        **out,
        "last_start": us(max(c["start"] for c in ctas)),
        "first_issue_after_start": us(statistics.median(c["first_issue"] - c["start"] for c in ctas)),
        "first_stage_after_issue": us(statistics.median(c["first_stage"] - c["first_issue"] for c in ctas)),
        "first_stage_min": us(first),
        "stream_us_min": us(min(loop)),
        "stream_us_median": us(statistics.median(loop)),
        "stream_us_max": us(max(loop)),
        "loop_end_min": us(min(ends)),
        "loop_end_median": us(statistics.median(ends)),
        "loop_end_p90": us(pct(ends, 0.9)),
        "loop_end_max": us(last_end),
        "epilogue_median": us(statistics.median(epi)),
        "epilogue_max": us(max(epi)),
        "kernel_end": us(max(c["list_written"] for c in ctas)),
        "stream_tbps": key_bytes / (last_end - first) / 1e3,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["1048576x2", "131072x8"], help="LENGTHxBATCH")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--raw", action="store_true",
                    help="also keep every indexer and attention CTA's stamps of the last step in the JSON")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for case in args.cases:
        length, batch = map(int, case.split("x"))
        bf16 = dict(device=dev, dtype=torch.bfloat16)
        k_cache = torch.randn(batch, length, HKV, D, **bf16)
        v_cache = torch.randn_like(k_cache)
        ki_cache = torch.randn(batch, length, DI, **bf16)
        q = torch.randn(batch, 1, HQ, D, **bf16)
        q_idx = torch.randn(batch, 1, HKV, DI, **bf16)
        lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
        keys8, scales = msa_cuda.quantize_index_keys(ki_cache)
        for name, keys, extra, key_bytes in (("bf16", ki_cache, {}, batch * length * DI * 2),
                                             ("fp8", keys8, dict(k_idx_scale_cache=scales), batch * length * (DI + 4))):
            with tempfile.NamedTemporaryFile(suffix=".trace", delete=False) as f:
                path = f.name
            os.environ["MSA_DECODE_TRACE_FILE"] = path
            for _ in range(args.reps):
                msa_cuda.sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, keys, cache_seqlens=lens, block_size=BS,
                                                  topk=TOPK, **extra)
            torch.cuda.synchronize()
            del os.environ["MSA_DECODE_TRACE_FILE"]
            steps = read_steps(path)[1:]
            os.unlink(path)
            if not steps:
                print(f"{case} {name}: no trace (is this build older than the trace?)")
                continue
            per_step = [summarize(s, key_bytes) for s in steps]
            med = {k: (statistics.median(s[k] for s in per_step) if not isinstance(per_step[0][k], list) else
                       [statistics.median(s[k][i] for s in per_step) for i in range(len(per_step[0][k]))])
                   for k in per_step[0]}
            rows.append(dict(length=length, batch=batch, keys=name, splits=steps[0]["header"][0], **med))
            if args.raw:  # e.g. to relate a CTA's stream time to its SM
                rows[-1]["last_step_ctas"] = steps[-1]["ctas"]
                rows[-1]["last_step_attn"] = steps[-1]["attn"]
            print(f"{length:>8} x {batch} {name}: {med['ctas']:.0f} CTAs; last CTA start {med['last_start']:.2f} us; "
                  f"first issue {med['first_issue_after_start']:.2f} us after start, first stage "
                  f"{med['first_stage_after_issue']:.2f} us after issue (earliest {med['first_stage_min']:.2f})")
            print(f"    streaming per CTA min / median / max {med['stream_us_min']:.2f} / {med['stream_us_median']:.2f} / "
                  f"{med['stream_us_max']:.2f} us; loop end min / median / p90 / max {med['loop_end_min']:.2f} / "
                  f"{med['loop_end_median']:.2f} / {med['loop_end_p90']:.2f} / {med['loop_end_max']:.2f} us")
            print(f"    epilogue median / max {med['epilogue_median']:.2f} / {med['epilogue_max']:.2f} us; last list "
                  f"{med['kernel_end']:.2f} us; keys streamed at {med['stream_tbps']:.2f} TB/s (first stage -> last loop end)")
            fmt = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
            print(f"    quarters of the stream, slowest tenth {fmt(med['quarters_slowest_tenth'])} us, fastest tenth "
                  f"{fmt(med['quarters_fastest_tenth'])} us; epilogue barrier {med['epilogue_sync_median']:.2f} us, "
                  f"list merge + write {med['epilogue_merge_median']:.2f} us")
            if "attn_ctas" in med:
                print(f"    attention ({med['attn_ctas']:.0f} CTAs), from the indexer's last list (us): grid seen complete "
                      f"{med['attn_waited_min']:.2f} .. {med['attn_waited_max']:.2f}; selection merge median / max "
                      f"{med['attn_merge_median']:.2f} / {med['attn_merge_max']:.2f}; first block after it "
                      f"{med['attn_first_block_median']:.2f} / {med['attn_first_block_max']:.2f}; blocks "
                      f"{med['attn_blocks_median']:.2f} / {med['attn_blocks_max']:.2f}; last loop end "
                      f"{med['attn_loop_end_max']:.2f}; chunk merge median {med['attn_chunk_merge_median']:.2f}; "
                      f"last CTA done {med['attn_done_max']:.2f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "trace_decode_select.json").write_text(json.dumps(dict(meta=run_metadata(False), rows=rows),
                                                                             indent=1))


if __name__ == "__main__":
    main()
