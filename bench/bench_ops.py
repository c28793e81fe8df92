"""Benchmark the msa_cuda ops at the MiniMax-M3 shape against dense cuDNN causal attention.

Usage (from anywhere; the command is run as a script)::

    python bench/bench_ops.py [--seqlens 8192 16384 32768 65536 131072] [--include-1m]
                              [--ops select,attn,hot,sparse_attn,kl,flex,bwd] [--out bench/out]
                              [--reps N] [--kl-dense] [--dry-run]

For every sequence length S (B=1, Hq=64, Hkv=4, D=Di=128, block 128, topk 16, bf16, fresh
``torch.randn`` inputs) it times, in one process:

- ``dense_cudnn``: dense causal GQA attention through cuDNN SDPA (the baseline of every speedup;
  backward as ``dense_cudnn_bwd`` with ``bwd``);
- ``select``: ``msa_cuda.select_blocks`` (public API), the raw kernel op
  ``torch.ops.msa_cuda_kernels.select_blocks`` and the reference ``msa_cuda.reference.select_blocks``;
- ``attn``: ``msa_cuda.block_sparse_attn`` on the selection (``validate=False``);
- ``sparse_attn``: ``msa_cuda.sparse_attn`` (selection + attention);
- ``kl``: ``msa_cuda.indexer_kl_loss`` on the selection (``validate=False``), given the main branch's lse (computed
  once, untimed, or taken from the ``block_sparse_attn`` forward, which ``kl`` times itself when
  ``attn`` is not selected): the loss alone, and forward + backward with q_idx and k_idx as leaves
  (the training call). Its target is ``kl fwd+bwd time / block_sparse_attn fwd time <= 0.75``
  (``kl_targets`` in the JSON, and after the table). ``--kl-dense`` adds the dense warm-up
  variant (``dense=True``, forward + backward, given the dense causal lse computed once, untimed,
  by FlashAttention's forward) up to S = 131072 on its SM90 kernel (S <= 8192 where it falls
  back to the PyTorch reference; a call predicted above 10 s is skipped); its target is
  ``dense kl fwd+bwd time / dense cuDNN fwd time <= 1.5`` at 32K;
- ``flex``: FlexAttention (``torch.compile``) with a BlockMask built from the selection. A
  BlockMask works on 128 x 128 tiles, so a query tile must attend the UNION over its 128 queries
  of the blocks they selected (per KV group): it cannot express per-token selection and computes
  more than MSA does. Its TFLOPS count only MSA's useful work, so the gap shows what the union
  costs;
- ``bwd``: adds the backward of dense, ``attn``, ``kl`` and ``flex`` (each timed alone, after an
  untimed forward).

Ops whose CUDA path is still the PyTorch reference are timed anyway (marked in the notes); a
measurement predicted to take longer than ``--max-call-s`` per call (extrapolated from the
same op at the previous size) is skipped, out-of-memory and other failures are recorded, and
nothing stops the run. The table is printed last; ``results.json`` and ``speedup.png`` go to
``--out`` and are rewritten after every measurement, so a killed run still leaves its numbers.

``--dry-run`` needs no GPU: it skips CUDA, fills in random times and exercises the cost models,
the table, the JSON and the plot.
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from common import (REPO_ROOT, BWD_FACTOR, L2Flusher, Shape, Timing, attn_bwd_bytes, attn_fwd_bytes,
                    count_triples, dense_fwd_flops, expected_triples, floor_ms, free_cuda_memory,
                    hot_block_selection, kl_bwd_bytes, kl_bwd_flops, kl_fwd_bytes, kl_fwd_flops,
                    measure_ceilings, rep_count, run_metadata, select_bytes, select_flops, sparse_fwd_flops,
                    time_op)

DEFAULT_SEQLENS = [8192, 16384, 32768, 65536, 131072]
SEQLEN_1M = 1 << 20
OPS = ("select", "attn", "hot", "sparse_attn", "kl", "flex", "bwd")
KL_TARGET = 0.75  # indexer_kl_loss forward + backward time / block_sparse_attn forward time, at most
KL_DENSE_TARGET = 1.5  # dense=True indexer_kl_loss fwd + bwd time / dense cuDNN fwd time, at most (at 32K)
KL_DENSE_MAX_SEQLEN = 131072  # longest S of the dense KL warm-up variant (--kl-dense) on its kernel
KL_DENSE_REFERENCE_MAX_SEQLEN = 8192  # ... and where it falls back to the PyTorch reference
KL_DENSE_MAX_CALL_S = 10.0  # skip a dense KL length whose call is predicted (S^2) to take longer
DENSE = {"fwd": "dense_cudnn", "bwd": "dense_cudnn_bwd"}
# Measured throughputs the dry run draws its fake times from (TFLOP/s, low and high).
_DRY_RUN_TFLOPS = {"dense": (380.0, 520.0), "select": (250.0, 600.0), "ref": (2.0, 20.0),
                   "flex": (50.0, 250.0)}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement (or the reason there is none) of one op at one sequence length."""

    op: str
    seqlen: int
    direction: str  # "fwd" or "bwd": which dense row the speedup compares with
    status: str  # "ok", "skipped", "oom" or "error"
    note: str = ""
    flops: float = 0.0
    min_bytes: int = 0
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    spread_pct: Optional[float] = None
    reps: int = 0
    first_call_ms: Optional[float] = None
    tflops: Optional[float] = None
    floor_ms: Optional[float] = None
    speedup_vs_dense: Optional[float] = None
    extra_mib: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)


class Runner:
    """Runs measurements defensively and keeps the rows, the history and the output files.

    Parameters
    ----------
    args : argparse.Namespace
        The command line.
    meta : dict
        Run metadata (goes to the JSON as is).
    ceilings : dict
        ``matmul_tflops`` and ``copy_gbps`` for the floor times (empty if they were not measured).
    dense : tuple
        The dense baseline, ``(label, SDPA backend, uses enable_gqa)`` (:func:`choose_dense_variant`).
    flush : L2Flusher or None
        The L2 flush of every timed call (None in a dry run).
    """

    def __init__(self, args: argparse.Namespace, meta: Dict[str, Any], ceilings: Dict[str, float],
                 dense: Tuple[str, Any, bool], flush: Optional[L2Flusher]):
        self.args = args
        self.meta = meta
        self.ceilings = ceilings
        self.dense = dense
        self.flush = flush
        self.rows: List[Row] = []
        self.t0 = time.perf_counter()
        self.history: Dict[str, Tuple[int, float]] = {}  # op -> (seqlen, median ms) of last success
        self.oom_at: Dict[str, int] = {}  # op -> smallest seqlen that ran out of memory
        self.fake = random.Random(args.seed)
        # Where the inputs live; meta tensors let the dry run build its closures without memory.
        self.device = "meta" if args.dry_run else "cuda"

    # -- recording --------------------------------------------------------------------------

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {format_row(row)}", flush=True)
        self.write_json()

    def skip(self, op: str, seqlen: int, direction: str, reason: str) -> None:
        self._add(Row(op, seqlen, direction, "skipped", note=reason))

    def fail(self, op: str, seqlen: int, direction: str, exc: BaseException) -> None:
        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
        if oom:
            self.oom_at[op] = min(seqlen, self.oom_at.get(op, seqlen))
        message = "out of memory" if oom else f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        self._add(Row(op, seqlen, direction, "oom" if oom else "error", note=message))

    def prepare(self, what: str, seqlen: int, fn: Callable[[], Any]) -> Any:
        """Run an untimed preparation step; on failure record it as an error row and return None."""
        try:
            return fn()
        except Exception as exc:  # recorded, never raised: the run goes on
            self.fail(f"({what})", seqlen, "fwd", exc)
        free_cuda_memory()  # outside the handler, once the traceback no longer holds tensors
        return None

    # -- measuring --------------------------------------------------------------------------

    def _skip_reason(self, op: str, seqlen: int, exponent: float) -> Optional[str]:
        elapsed = time.perf_counter() - self.t0
        if op in self.oom_at and seqlen > self.oom_at[op]:
            return f"out of memory at S={self.oom_at[op]}"
        predicted_s = None
        if op in self.history:
            s0, ms0 = self.history[op]
            predicted_s = 1e-3 * ms0 * (seqlen / s0) ** exponent
            if predicted_s > self.args.max_call_s:
                return f"est. {predicted_s:.0f} s/call > {self.args.max_call_s:.0f} s"
        need_s = 4 * predicted_s if predicted_s is not None else 0.0  # warm-up + 3 reps
        if elapsed + need_s > self.args.time_limit_s:
            return f"run time limit ({self.args.time_limit_s:.0f} s) reached"
        return None

    def measure(self, op: str, shape: Shape, fn: Callable[[Any], Any], *, flops: float, min_bytes: int,
                direction: str = "fwd", setup: Optional[Callable[[], Any]] = None, exponent: float = 2.0,
                reps: Optional[int] = None, compiles: bool = False, keep_output: bool = False,
                note: str = "", fake: str = "ref") -> Optional[Timing]:
        """Time one op at one size and record its row; None when skipped or failed.

        ``exponent`` is how the op's time grows with S (2 for quadratic work, 1 for linear); it
        extrapolates the previous size's time to decide whether this one is feasible. ``fake`` picks
        the throughput range of the dry run's made-up times.
        """
        seqlen = shape.seqlen
        reason = self._skip_reason(op, seqlen, exponent)
        if reason is not None:
            self.skip(op, seqlen, direction, reason)
            return None
        reps = self.args.reps if reps is None else reps
        if self.args.dry_run:
            timing = self._fake_timing(flops, reps, fake)
        else:
            timing = None
            try:
                timing = time_op(fn, self.flush, setup=setup, reps=reps, warmup=self.args.warmup,
                                 budget_s=self.args.budget_s, max_call_s=self.args.max_call_s,
                                 compiles=compiles, keep_output=keep_output)
            except Exception as exc:  # recorded, never raised: the run goes on
                self.fail(op, seqlen, direction, exc)
            if timing is None:
                free_cuda_memory()  # outside the handler, once the traceback no longer holds tensors
                return None
        row = Row(op, seqlen, direction, "ok", note=note, flops=flops, min_bytes=min_bytes,
                  median_ms=timing.median_ms, min_ms=timing.min_ms, max_ms=timing.max_ms,
                  spread_pct=timing.spread_pct, reps=len(timing.times_ms), first_call_ms=timing.first_call_ms,
                  tflops=flops / (timing.median_ms * 1e-3) / 1e12 if flops else None,
                  floor_ms=floor_ms(flops, min_bytes, self.ceilings),
                  extra_mib=timing.extra_bytes / 2 ** 20, times_ms=timing.times_ms)
        self.history[op] = (seqlen, timing.median_ms)
        self._add(row)
        return timing

    def _fake_timing(self, flops: float, reps: int, kind: str) -> Timing:
        lo, hi = _DRY_RUN_TFLOPS[kind]
        ms = flops / (self.fake.uniform(lo, hi) * 1e12) * 1e3
        n = 1 if ms > 1e3 * self.args.max_call_s else rep_count(ms, reps, self.args.budget_s, self.args.max_call_s)
        times = [ms * (1 + 0.02 * self.fake.random()) for _ in range(n)]
        return Timing(times, times[0] * 3, int(self.fake.uniform(0, 64) * 2 ** 20))

    def annotate(self, op: str, seqlen: int, text: str) -> None:
        """Append ``text`` to the note of the row of ``op`` at ``seqlen``."""
        for row in self.rows:
            if row.op == op and row.seqlen == seqlen:
                row.note = f"{row.note}; {text}" if row.note else text
        self.write_json()

    # -- derived numbers and outputs -----------------------------------------------------------

    def row(self, op: str, seqlen: int) -> Optional[Row]:
        for row in self.rows:
            if row.op == op and row.seqlen == seqlen and row.status == "ok":
                return row
        return None

    def finish_speedups(self) -> None:
        for row in self.rows:
            dense = self.row(DENSE[row.direction], row.seqlen)
            if row.status == "ok" and dense is not None:
                row.speedup_vs_dense = dense.median_ms / row.median_ms

    def select_targets(self) -> List[Dict[str, Any]]:
        """Per length: select TFLOPS / dense TFLOPS (target >= 0.8), speedup vs the reference (>= 30)."""
        out = []
        for seqlen in sorted({r.seqlen for r in self.rows}):
            sel, dense = self.row("select_blocks", seqlen), self.row("dense_cudnn", seqlen)
            ref = self.row("select_blocks_ref", seqlen)
            if sel is None:
                continue
            out.append({
                "seqlen": seqlen,
                "tflops_ratio_vs_dense": sel.tflops / dense.tflops if dense is not None else None,
                "speedup_vs_reference": ref.median_ms / sel.median_ms if ref is not None else None,
            })
        return out

    def attn_targets(self) -> List[Dict[str, Any]]:
        """Per length, issue 3's forward targets: block_sparse_attn TFLOPS / dense TFLOPS >= 0.6 (the
        indexer's and the hot-block selection), sparse_attn >= 8x dense at 128K and >= 20x at 1M,
        and, where every visible block is selected (S <= topk x block_size), block_sparse_attn no
        slower than 0.8x dense (dense time / its time >= 0.8)."""
        shape_full = Shape(seqlen=1)
        full_len = shape_full.topk * shape_full.block_size
        out = []
        for seqlen in sorted({r.seqlen for r in self.rows}):
            dense = self.row("dense_cudnn", seqlen)
            if dense is None:
                continue
            entry: Dict[str, Any] = {"seqlen": seqlen}
            for op, key in (("block_sparse_attn", "attn_tflops_ratio"), ("block_sparse_attn_hot", "hot_tflops_ratio")):
                row = self.row(op, seqlen)
                entry[key] = row.tflops / dense.tflops if row is not None and row.tflops and dense.tflops else None
            e2e = self.row("sparse_attn", seqlen)
            entry["sparse_attn_speedup"] = dense.median_ms / e2e.median_ms if e2e is not None else None
            attn = self.row("block_sparse_attn", seqlen)
            entry["full_coverage_time_ratio"] = (dense.median_ms / attn.median_ms
                                                 if attn is not None and seqlen <= full_len else None)
            if any(v is not None for k, v in entry.items() if k != "seqlen"):
                out.append(entry)
        return out

    def kl_targets(self) -> List[Dict[str, Any]]:
        """Per length: indexer_kl_loss forward + backward time / block_sparse_attn forward time
        (target <= KL_TARGET), and with ``--kl-dense`` the dense warm-up variant's forward + backward
        time (dense lse given) / the dense cuDNN forward time (target <= KL_DENSE_TARGET, at 32K)."""
        out = []
        for seqlen in sorted({r.seqlen for r in self.rows}):
            kl, attn = self.row("indexer_kl_loss_fwd_bwd", seqlen), self.row("block_sparse_attn", seqlen)
            kl_dense, dense = self.row("indexer_kl_loss_dense_fwd_bwd", seqlen), self.row("dense_cudnn", seqlen)
            entry = {
                "seqlen": seqlen,
                "kl_fwd_bwd_ms": kl.median_ms if kl is not None else None,
                "attn_fwd_ms": attn.median_ms if attn is not None else None,
                "kl_fwd_bwd_over_attn_fwd": (kl.median_ms / attn.median_ms
                                             if kl is not None and attn is not None else None),
                "target": KL_TARGET,
                "dense_kl_fwd_bwd_ms": kl_dense.median_ms if kl_dense is not None else None,
                "dense_fwd_ms": dense.median_ms if dense is not None else None,
                "dense_kl_fwd_bwd_over_dense_fwd": (kl_dense.median_ms / dense.median_ms
                                                    if kl_dense is not None and dense is not None else None),
                "dense_target": KL_DENSE_TARGET,
            }
            if entry["kl_fwd_bwd_over_attn_fwd"] is not None or entry["dense_kl_fwd_bwd_over_dense_fwd"] is not None:
                out.append(entry)
        return out

    def write_json(self) -> None:
        self.finish_speedups()
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "ceilings": self.ceilings, "args": vars(self.args),
               "select_targets": self.select_targets(), "attn_targets": self.attn_targets(),
               "kl_targets": self.kl_targets(),
               "results": [asdict(r) for r in self.rows]}
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out / "results.json")


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------

_HEADER = (f"{'seqlen':>8} {'op':<29} {'median ms':>10} {'min ms':>10} {'spread':>7} {'reps':>4} "
           f"{'TFLOPS':>7} {'floor%':>6} {'vs dense':>9} {'extra MiB':>9}  note")


def _num(x: Optional[float], fmt: str) -> str:
    """``format(x, fmt)``, or "-" right-aligned to the format's width when there is no number."""
    width = int(fmt.split(".")[0] or 0)
    return "-".rjust(width) if x is None else format(x, fmt)


def format_row(r: Row) -> str:
    speed = "-" if r.speedup_vs_dense is None else f"{r.speedup_vs_dense:.2f}x"
    floor_pct = None if r.floor_ms is None or not r.median_ms else 100.0 * r.floor_ms / r.median_ms
    note = r.note if r.status == "ok" else f"{r.status.upper()}: {r.note}"
    return (f"{r.seqlen:>8} {r.op:<29} {_num(r.median_ms, '10.3f')} {_num(r.min_ms, '10.3f')} "
            f"{_num(r.spread_pct, '6.1f')}{'%' if r.spread_pct is not None else ' '} {r.reps:>4} "
            f"{_num(r.tflops, '7.1f')} {_num(floor_pct, '6.1f')} {speed:>9} {_num(r.extra_mib, '9.0f')}  {note}")


def seqlen_label(s: int) -> str:
    return f"{s >> 20}M" if s % (1 << 20) == 0 else f"{s >> 10}K" if s % 1024 == 0 else str(s)


def print_table(runner: Runner) -> None:
    meta, c, a = runner.meta, runner.ceilings, runner.args
    commit = (meta.get("git_commit") or "unknown")[:12] + (" (dirty)" if meta.get("git_dirty") else "")
    print()
    print(f"msa_cuda ops, M3 shape (B=1 Hq=64 Hkv=4 D=Di=128 block 128 topk 16 bf16) on {meta['device']}"
          + ("  [DRY RUN: random times]" if a.dry_run else ""))
    print(f"torch {meta['torch']}, cuDNN {meta.get('cudnn')}, triton {meta.get('triton')}, commit {commit}, "
          f"{meta['date']}")
    ceil = (f"{c['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {c['copy_gbps']:.0f} GB/s copy" if c
            else "not measured")
    print(f"ceilings: {ceil}; select backend: {meta.get('select_backend')}; dense: {meta.get('dense_variant')}")
    print("median of reps timed with CUDA events after an L2 flush; spread = (max-min)/median; "
          "floor% = floor time / median; vs dense = dense median / op median (bwd rows vs dense bwd)")
    print(_HEADER)
    last = None
    for r in sorted(runner.rows, key=lambda r: r.seqlen):
        if last is not None and r.seqlen != last:
            print()
        print(format_row(r))
        last = r.seqlen
    targets = runner.select_targets()
    if targets:
        print()
        print("select targets: TFLOPS ratio vs dense cuDNN >= 0.8, speedup vs reference >= 30x")
        for t in targets:
            ratio, speed = t["tflops_ratio_vs_dense"], t["speedup_vs_reference"]
            r_txt = "-" if ratio is None else f"{ratio:.2f} ({'met' if ratio >= 0.8 else 'NOT met'})"
            s_txt = "-" if speed is None else f"{speed:.1f}x ({'met' if speed >= 30 else 'NOT met'})"
            print(f"{t['seqlen']:>8}  TFLOPS ratio {r_txt:<16}  speedup vs reference {s_txt}")
    attn = runner.attn_targets()
    if attn:
        print()
        print("attention targets: block_sparse_attn TFLOPS ratio vs dense >= 0.6 (indexer and hot selections); "
              "sparse_attn >= 8x dense at 128K, >= 20x at 1M; full coverage (S <= topk x block) >= 0.8x dense")

        def verdict(value: Optional[float], goal: Optional[float], fmt: str) -> str:
            if value is None:
                return "-"
            text = format(value, fmt)
            return text if goal is None else f"{text} ({'met' if value >= goal else 'NOT met'})"

        for t in attn:
            e2e_goal = 8.0 if t["seqlen"] == 131072 else 20.0 if t["seqlen"] == SEQLEN_1M else None
            print(f"{t['seqlen']:>8}  attn {verdict(t['attn_tflops_ratio'], 0.6, '.2f'):<14}  "
                  f"hot {verdict(t['hot_tflops_ratio'], 0.6, '.2f'):<14}  "
                  f"sparse_attn {verdict(t['sparse_attn_speedup'], e2e_goal, '.2f'):<16}  "
                  f"full coverage {verdict(t['full_coverage_time_ratio'], 0.8, '.2f')}")
    kl = runner.kl_targets()
    if kl:
        print()
        print(f"kl target: indexer_kl_loss fwd+bwd time / block_sparse_attn fwd time <= {KL_TARGET} "
              f"(same selection, lse given); dense kl target: dense=True fwd+bwd time / dense cuDNN fwd "
              f"time <= {KL_DENSE_TARGET} at 32K (dense causal lse given)")
        for t in kl:
            ratio = t["kl_fwd_bwd_over_attn_fwd"]
            r_txt = "-" if ratio is None else f"{ratio:.2f} ({'met' if ratio <= KL_TARGET else 'NOT met'})"
            times = ("" if ratio is None
                     else f"  ({t['kl_fwd_bwd_ms']:.3f} ms / {t['attn_fwd_ms']:.3f} ms)")
            dense_ratio = t["dense_kl_fwd_bwd_over_dense_fwd"]
            d_txt = ("" if dense_ratio is None
                     else f"  dense kl/dense fwd {dense_ratio:.2f} "
                          f"({'met' if dense_ratio <= KL_DENSE_TARGET else 'NOT met'}) "
                          f"({t['dense_kl_fwd_bwd_ms']:.3f} ms / {t['dense_fwd_ms']:.3f} ms)")
            print(f"{t['seqlen']:>8}  kl/attn {r_txt}{times}{d_txt}")


def write_plot(runner: Runner) -> Optional[Path]:
    """Speedup over dense cuDNN attention against S (log2), one line per op; None if impossible."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plot: {exc}", flush=True)
        return None
    runner.finish_speedups()
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in runner.rows:
        if r.op not in DENSE.values() and r.speedup_vs_dense is not None:
            series.setdefault(r.op, []).append((r.seqlen, r.speedup_vs_dense))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for op, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        label = f"{op} (vs dense bwd)" if op.endswith("_bwd") else op
        ax.plot(xs, ys, marker="o", linestyle="--" if op.endswith("_bwd") else "-", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    seqlens = sorted({r.seqlen for r in runner.rows})
    if seqlens:
        ax.set_xticks(seqlens)
        ax.set_xticklabels([seqlen_label(s) for s in seqlens])
    ax.set_xlabel("sequence length S (B=1)")
    ax.set_ylabel("speedup vs dense cuDNN causal attention (x)")
    title = f"msa_cuda at M3 shape on {runner.meta['device']}"
    ax.set_title(title + (" [DRY RUN: random times]" if runner.args.dry_run else ""))
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = Path(runner.args.out) / "speedup.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def _sdpa(q, k, v, backend, gqa: bool):
    """Causal SDPA on [B, H, S, D] tensors with exactly one backend allowed."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def dense_calls(q, k, v, dout, group: int, backend, gqa: bool):
    """Forward call, backward setup and backward call of the dense baseline on [B, S, H, D] inputs.

    SDPA takes [B, H, S, D]: the inputs are passed as transposed views. Without ``gqa`` k and v
    are first expanded to Hq heads (here, before any timing).
    """
    qt = q.transpose(1, 2)
    kt, vt = (x.transpose(1, 2) if gqa else x.repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))

    def forward(_):
        return _sdpa(qt, kt, vt, backend, gqa)

    def setup():
        leaves = _leaves(qt, kt, vt)
        return _sdpa(*leaves, backend, gqa), leaves

    def backward(state):
        return torch.autograd.grad(state[0], state[1], dout.transpose(1, 2))

    return forward, setup, backward


def choose_dense_variant(shape: Shape, need_backward: bool) -> Tuple[str, Any, bool]:
    """Pick the dense baseline on a small problem: (label, SDPA backend, uses enable_gqa).

    cuDNN with ``enable_gqa`` first; cuDNN on k/v expanded to Hq heads if cuDNN refuses GQA;
    FlashAttention as a last resort (the label says which one ran). The probe makes the same
    calls as the measurements (:func:`dense_calls`), backward included when it will be timed.
    """
    from torch.nn.attention import SDPBackend

    candidates = [("cuDNN SDPA, enable_gqa", SDPBackend.CUDNN_ATTENTION, True),
                  ("cuDNN SDPA, k/v expanded to Hq", SDPBackend.CUDNN_ATTENTION, False),
                  ("FLASH SDPA (cuDNN failed), enable_gqa", SDPBackend.FLASH_ATTENTION, True)]
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    q, dout = torch.randn(2, 1, shape.seqlen, shape.hq, shape.d, **bf16)
    k, v = torch.randn(2, 1, shape.seqlen, shape.hkv, shape.d, **bf16)
    errors = []
    for label, backend, gqa in candidates:
        try:
            forward, setup, backward = dense_calls(q, k, v, dout, shape.group, backend, gqa)
            forward(None)
            if need_backward:
                backward(setup())
            torch.cuda.synchronize()
            return label, backend, gqa
        except Exception as exc:  # try the next candidate
            errors.append(f"{label}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    print("no dense SDPA variant passed the probe: " + " | ".join(errors), flush=True)
    label, backend, gqa = candidates[0]
    return f"{label} (FAILED the probe)", backend, gqa


def msa_flex_block_mask(block_indices: torch.Tensor, shape: Shape, need_backward: bool):
    """FlexAttention BlockMask of an MSA selection at block_size granularity, and its density.

    Query tile t (queries [t*bs, (t+1)*bs)) of query head h attends, for group g = h // G, the
    union over its queries of the blocks they selected. With Sq = Sk and square tiles, the
    diagonal tile (the local block of every query in the tile, always selected) is the only
    partial block and gets the causal mask_mod; the selected blocks below it are full blocks.

    Returns
    -------
    (BlockMask, float)
        The mask and the fraction of the causal (tile, block) pairs it covers.
    """
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    nb, hkv, bs = shape.num_blocks, shape.hkv, shape.block_size
    dev = block_indices.device
    ids = block_indices[0].to(torch.int64)  # [S, Hkv, topk]
    tile = (torch.arange(shape.seqlen, device=dev) // bs)[:, None, None]
    group = torch.arange(hkv, device=dev)[None, :, None]
    flat = ((group * nb + tile) * nb + ids)[ids >= 0]
    union = torch.zeros(hkv * nb * nb, dtype=torch.bool, device=dev)
    union[flat] = True
    union = union.view(hkv, nb, nb)
    del ids, flat
    full = union & torch.ones(nb, nb, dtype=torch.bool, device=dev).tril(-1)
    density = float(union.sum()) / (hkv * nb * (nb + 1) / 2)
    del union

    def per_query_head(x: torch.Tensor) -> torch.Tensor:  # [Hkv, ...] -> [1, Hq, ...]
        return x.repeat_interleave(shape.group, dim=0).unsqueeze(0).contiguous()

    full_num = per_query_head(full.sum(-1, dtype=torch.int32))
    full_idx = per_query_head(torch.argsort(full.to(torch.int32), dim=-1, descending=True, stable=True)
                              .to(torch.int32))
    del full
    diag_num = torch.ones(1, shape.hq, nb, dtype=torch.int32, device=dev)
    diag_idx = torch.zeros(1, shape.hq, nb, nb, dtype=torch.int32, device=dev)
    diag_idx[..., 0] = torch.arange(nb, dtype=torch.int32, device=dev)

    def causal(b, h, q_pos, kv_pos):
        return q_pos >= kv_pos

    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    extra = {}
    if "seq_lengths" in params:
        extra["seq_lengths"] = (shape.seqlen, shape.seqlen)
    if "compute_q_blocks" in params:
        extra["compute_q_blocks"] = need_backward
    mask = BlockMask.from_kv_blocks(diag_num, diag_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=causal,
                                    **extra)
    return mask, density


_flex_compiled = None


def flex_attention_compiled():
    """``torch.compile(flex_attention)``, built once per process."""
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention)
    return _flex_compiled


# ---------------------------------------------------------------------------------------------
# One sequence length
# ---------------------------------------------------------------------------------------------


def _leaves(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.detach().requires_grad_(True) for t in tensors)


def bench_kl(runner: Runner, shape: Shape, msa, inputs: Tuple[torch.Tensor, ...], sel: Optional[torch.Tensor],
             lse: Optional[torch.Tensor], triples: int, sparse_flops: float, attn_note: str) -> None:
    """The ``kl`` op at one length: the indexer loss on the selection, given the main branch's lse.

    Rows: ``block_sparse_attn`` (its forward, when ``attn`` did not already time it in this run: the
    lse comes from its output), ``indexer_kl_loss`` (loss only, no input needs a gradient),
    ``indexer_kl_loss_fwd_bwd`` (a training call: forward and backward with q_idx, k_idx as leaves;
    q and k carry no gradient; its cost model is the backward's, which already counts both score
    sets once plus the dq_idx and dk_idx products), ``indexer_kl_loss_bwd`` with ``bwd`` (the
    backward alone, after an untimed forward), and with ``--kl-dense`` (S <= KL_DENSE_MAX_SEQLEN on
    the dense kernel, KL_DENSE_REFERENCE_MAX_SEQLEN on the reference, and a call predicted under
    KL_DENSE_MAX_CALL_S) ``indexer_kl_loss_dense_fwd_bwd``, the dense warm-up variant's training
    call (forward + backward given the dense causal lse, :func:`dense_causal_lse`, untimed), next
    to the dense cuDNN forward. The ratios go to :meth:`Runner.kl_targets`.
    """
    args, dry = runner.args, runner.args.dry_run
    q, k, v, q_idx, k_idx = inputs
    S, bs = shape.seqlen, shape.block_size
    if runner.row("block_sparse_attn", S) is None:
        # The ratio's denominator, timed in this run on the same inputs and selection.
        t = runner.measure("block_sparse_attn", shape,
                           lambda _: msa.block_sparse_attn(q, k, v, sel, block_size=bs, return_lse=True,
                                                           validate=False),
                           flops=sparse_flops, min_bytes=attn_fwd_bytes(shape, sparse=True), exponent=1,
                           keep_output=not dry, note=("timed for kl; " + attn_note).strip("; "))
        if t is not None and t.output is not None:
            lse = t.output[1]
        del t
    if lse is None and not dry:
        lse = runner.prepare("lse for kl", S, lambda: msa.block_sparse_attn(
            q, k, v, sel, block_size=bs, return_lse=True, validate=False)[1])
        if lse is None:
            return
    if lse is not None:
        lse = lse.detach()
    kl_backend = "" if dry or runner.meta["kl_kernel"] else "reference-backed"
    note = (kl_backend + "; lse given").strip("; ")
    runner.measure("indexer_kl_loss", shape,
                   lambda _: msa.indexer_kl_loss(q, k, q_idx, k_idx, sel, block_size=bs, lse=lse, validate=False),
                   flops=kl_fwd_flops(shape, triples), min_bytes=kl_fwd_bytes(shape), exponent=1, note=note)

    def leaves():
        return _leaves(q_idx, k_idx)

    def fwd_bwd(ki_leaves, block_indices, dense=False, lse_=None):
        loss = msa.indexer_kl_loss(q, k, *ki_leaves, block_indices, block_size=bs, dense=dense, lse=lse_,
                                   validate=False)
        return torch.autograd.grad(loss, ki_leaves)

    runner.measure("indexer_kl_loss_fwd_bwd", shape, lambda st: fwd_bwd(st, sel, lse_=lse), setup=leaves,
                   flops=kl_bwd_flops(shape, triples), min_bytes=kl_bwd_bytes(shape), exponent=1,
                   note=f"fwd+bwd (vs dense = dense fwd / this); {note}")
    if "bwd" in args.ops:
        def kl_setup():
            ki_leaves = leaves()
            return msa.indexer_kl_loss(q, k, *ki_leaves, sel, block_size=bs, lse=lse, validate=False), ki_leaves

        runner.measure("indexer_kl_loss_bwd", shape, lambda st: torch.autograd.grad(st[0], st[1]),
                       setup=kl_setup, direction="bwd", flops=kl_bwd_flops(shape, triples),
                       min_bytes=kl_bwd_bytes(shape), exponent=1,
                       note=f"backward alone (a fused forward may already hold the gradients); {note}")
    if args.kl_dense:
        # The sparse selection's lse does not apply to the dense support: it gets its own.
        bench_kl_dense(runner, shape, q, k, fwd_bwd, leaves)


def dense_causal_lse(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, str]:
    """The main branch's dense causal lse, float32 [B, Hq, S] (natural log, scale 1 / sqrt(D)), and
    the SDPA backend that computed it: the op's own helper for an lse it is not given."""
    from msa_cuda import _ops

    return _ops._dense_causal_lse_sdpa(q, k, q.shape[-1] ** -0.5)


def dense_lse_error(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: int = 3) -> float:
    """Largest |lse - exact| over all heads of a few query rows (first, middle, last), the exact
    value computed in float32 from the bf16 inputs: guards the lse the dense KL is timed with."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    pos = torch.linspace(0, s - 1, rows, device=q.device).round().long()
    qr = q[:, pos].float().view(b, rows, hkv, hq // hkv, d)
    scores = torch.einsum("brhgd,bkhd->bhgrk", qr, k.float()) * d ** -0.5  # [B, Hkv, G, rows, S]
    scores.masked_fill_(torch.arange(s, device=q.device) > pos[:, None], float("-inf"))
    exact = torch.logsumexp(scores, dim=-1).reshape(b, hq, rows)
    return (lse[:, :, pos] - exact).abs().max().item()


def bench_kl_dense(runner: Runner, shape: Shape, q: torch.Tensor, k: torch.Tensor, fwd_bwd: Callable,
                   leaves: Callable) -> None:
    """``indexer_kl_loss_dense_fwd_bwd``: the dense warm-up variant's training call (forward +
    backward with q_idx, k_idx as leaves), given the dense causal lse, computed once untimed."""
    op, dry = "indexer_kl_loss_dense_fwd_bwd", runner.args.dry_run
    S = shape.seqlen
    kernel = dry or runner.meta.get("kl_dense_kernel", False)
    cap = KL_DENSE_MAX_SEQLEN if kernel else KL_DENSE_REFERENCE_MAX_SEQLEN
    if S > cap:
        runner.skip(op, S, "fwd", f"dense KL only up to S={cap}" + ("" if kernel else " (PyTorch reference)"))
        return
    if op in runner.history:
        s0, ms0 = runner.history[op]
        predicted_s = 1e-3 * ms0 * (S / s0) ** 2
        if predicted_s > KL_DENSE_MAX_CALL_S:
            runner.skip(op, S, "fwd", f"est. {predicted_s:.0f} s/call > {KL_DENSE_MAX_CALL_S:.0f} s")
            return
    lse, lse_note = None, "dense causal lse given"
    if not dry:
        got = runner.prepare("dense lse for dense kl", S, lambda: dense_causal_lse(q, k))
        if got is None:
            runner.skip(op, S, "fwd", "no dense lse (its computation failed)")
            return
        lse, backend = got
        del got
        err = runner.prepare("dense lse check", S, lambda: dense_lse_error(q, k, lse))
        about = [backend, "untimed"]
        if err is not None:
            about.append(f"max |err| {err:.1e} on 3 rows" + (" -- LSE MISMATCH" if err > 1e-2 else ""))
        lse_note = f"dense causal lse given ({', '.join(about)})"
    # Dense support: every causally visible key, B * Hkv * S (S + 1) / 2 triples.
    dense_triples = shape.batch * shape.hkv * S * (S + 1) // 2
    runner.measure(op, shape, lambda st: fwd_bwd(st, None, dense=True, lse_=lse), setup=leaves,
                   flops=kl_bwd_flops(shape, dense_triples), min_bytes=kl_bwd_bytes(shape),
                   fake="dense" if kernel else "ref",
                   note=f"dense=True warm-up variant, fwd+bwd, {lse_note} (vs dense = dense fwd / this)"
                        + ("" if dry else "; SM90 kernel" if kernel else "; PyTorch reference"))


def bench_seqlen(runner: Runner, shape: Shape, msa, ref) -> None:
    """Measure every requested op at one sequence length (all inputs freed on return)."""
    args = runner.args
    ops, dry = set(args.ops), args.dry_run
    bwd = "bwd" in ops
    S, bs, topk, G = shape.seqlen, shape.block_size, shape.topk, shape.group
    bf16 = dict(dtype=torch.bfloat16, device=runner.device)
    q = torch.randn(1, S, shape.hq, shape.d, **bf16)
    k = torch.randn(1, S, shape.hkv, shape.d, **bf16)
    v = torch.randn(1, S, shape.hkv, shape.d, **bf16)
    q_idx = torch.randn(1, S, shape.hkv, shape.di, **bf16)
    k_idx = torch.randn(1, S, shape.di, **bf16)
    dout = torch.randn_like(q) if bwd else None

    # (c) dense causal attention, cuDNN SDPA: the baseline.
    _, backend, gqa = runner.dense
    forward, setup, backward = dense_calls(q, k, v, dout, G, backend, gqa)
    dense_flops = dense_fwd_flops(shape)
    runner.measure("dense_cudnn", shape, forward, flops=dense_flops, min_bytes=attn_fwd_bytes(shape, sparse=False),
                   fake="dense")
    if bwd:
        runner.measure("dense_cudnn_bwd", shape, backward, setup=setup, direction="bwd", flops=BWD_FACTOR * dense_flops,
                       min_bytes=attn_bwd_bytes(shape, sparse=False), fake="dense")
    del forward, setup, backward

    # (a, b) selection: public API, raw kernel op, reference.
    sel_kwargs = dict(block_size=bs, topk=topk)
    sel = None
    if "select" in ops:
        t = runner.measure("select_blocks", shape, lambda _: msa.select_blocks(q_idx, k_idx, **sel_kwargs),
                           flops=select_flops(shape), min_bytes=select_bytes(shape), keep_output=True,
                           note=runner.meta["select_backend"], fake="select")
        sel = None if t is None else t.output
        if dry or runner.meta["raw_kernel_op"]:
            runner.measure("select_blocks_raw", shape,
                           lambda _: torch.ops.msa_cuda_kernels.select_blocks(q_idx, k_idx, None, None, 0, bs, topk,
                                                                              0, 1),
                           flops=select_flops(shape), min_bytes=select_bytes(shape), fake="select")
        else:
            runner.skip("select_blocks_raw", S, "fwd", "torch.ops.msa_cuda_kernels.select_blocks not registered")
        t = runner.measure("select_blocks_ref", shape, lambda _: ref.select_blocks(q_idx, k_idx, **sel_kwargs),
                           flops=select_flops(shape), min_bytes=select_bytes(shape), reps=args.ref_reps,
                           keep_output=sel is not None, note="pure-PyTorch reference")
        if t is not None and sel is not None:
            same = (t.output == sel).all(-1).float().mean().item()
            runner.annotate("select_blocks_ref", S, f"{100 * same:.3f}% of rows equal to select_blocks")
        del t

    # The selection the main-branch ops run on, and its exact work.
    if not ops & {"attn", "hot", "sparse_attn", "kl", "flex"}:
        return
    if dry:
        triples = expected_triples(shape)
    else:
        if sel is None:
            sel = runner.prepare("selection", S, lambda: msa.select_blocks(q_idx, k_idx, **sel_kwargs))
            if sel is None:
                return
        triples = count_triples(sel, S, bs)
        if triples != expected_triples(shape):
            runner.annotate("select_blocks", S, f"SELECTION INVALID: {triples} triples, "
                                                f"expected {expected_triples(shape)}")
    sparse_flops = sparse_fwd_flops(shape, triples)
    reference_note = "reference-backed" if not dry and not runner.meta["attn_kernel"] else ""

    # (d) main branch, full forward, indexer loss through the public API.
    lse = None
    if "attn" in ops:
        t = runner.measure("block_sparse_attn", shape,
                           lambda _: msa.block_sparse_attn(q, k, v, sel, block_size=bs, return_lse=True,
                                                           validate=False),
                           flops=sparse_flops, min_bytes=attn_fwd_bytes(shape, sparse=True), exponent=1,
                           keep_output=not dry, note=reference_note)
        lse = None if t is None or t.output is None else t.output[1]
        del t
        if S <= 32 * bs and not dry:
            # Up to 32 key blocks both forward kernels can run: time each, forced, beside the default.
            for path in ("kv_outer", "query_outer"):
                os.environ["MSA_CUDA_FWD_PATH"] = path
                try:
                    runner.measure(f"block_sparse_attn_{path}", shape,
                                   lambda _: msa.block_sparse_attn(q, k, v, sel, block_size=bs, return_lse=True,
                                                                   validate=False),
                                   flops=sparse_flops, min_bytes=attn_fwd_bytes(shape, sparse=True), exponent=1,
                                   note=f"{path} kernel forced (MSA_CUDA_FWD_PATH)")
                finally:
                    del os.environ["MSA_CUDA_FWD_PATH"]
        if bwd:
            def attn_setup():
                leaves = _leaves(q, k, v)
                return msa.block_sparse_attn(*leaves, sel, block_size=bs, validate=False), leaves

            runner.measure("block_sparse_attn_bwd", shape, lambda st: torch.autograd.grad(st[0], st[1], dout),
                           setup=attn_setup, direction="bwd", flops=BWD_FACTOR * sparse_flops,
                           min_bytes=attn_bwd_bytes(shape, sparse=True), exponent=1, note=reference_note)

            def attn_setup_deterministic():
                leaves = _leaves(q, k, v)
                return msa.block_sparse_attn(*leaves, sel, block_size=bs, validate=False, deterministic=True), leaves

            runner.measure("block_sparse_attn_bwd_deterministic", shape,
                           lambda st: torch.autograd.grad(st[0], st[1], dout), setup=attn_setup_deterministic,
                           direction="bwd", flops=BWD_FACTOR * sparse_flops,
                           min_bytes=attn_bwd_bytes(shape, sparse=True), exponent=1,
                           note=("deterministic=True; " + reference_note).strip("; "))
    if "hot" in ops:
        # The issue's second selection: hot blocks (0, own, previous, recency-biased others) that
        # almost every query picks. Same attended triples as any correct selection.
        hot = None if dry else runner.prepare("hot-block selection", S,
                                              lambda: hot_block_selection(shape, runner.device, args.seed))
        if dry or hot is not None:
            runner.measure("block_sparse_attn_hot", shape,
                           lambda _: msa.block_sparse_attn(q, k, v, hot, block_size=bs, validate=False),
                           flops=sparse_flops, min_bytes=attn_fwd_bytes(shape, sparse=True), exponent=1,
                           note=("hot-block selection; " + reference_note).strip("; "))
        del hot
    if "sparse_attn" in ops:
        # Linear growth while the attention (reference) dominates; the quadratic selection only
        # takes over once both run on kernels, and then the per-call guard still applies.
        runner.measure("sparse_attn", shape, lambda _: msa.sparse_attn(q, k, v, q_idx, k_idx, **sel_kwargs),
                       flops=select_flops(shape) + sparse_flops,
                       min_bytes=select_bytes(shape) + attn_fwd_bytes(shape, sparse=True), exponent=1,
                       note=reference_note)
    if "kl" in ops:
        bench_kl(runner, shape, msa, (q, k, v, q_idx, k_idx), sel, lse, triples, sparse_flops, reference_note)
    del lse

    # (e) FlexAttention with the selection's union block mask.
    if "flex" in ops:
        mask, note = None, "union of the tile's selected blocks"
        if not dry:
            start = time.perf_counter()
            built = runner.prepare("flex block mask", S, lambda: msa_flex_block_mask(sel, shape, bwd))
            if built is None:
                return
            torch.cuda.synchronize()
            mask, density = built
            note = (f"union mask covers {100 * density:.1f}% of causal blocks, "
                    f"built in {time.perf_counter() - start:.2f} s")
        flex = flex_attention_compiled()
        qf, kf, vf = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        runner.measure("flex_msa", shape, lambda _: flex(qf, kf, vf, block_mask=mask, enable_gqa=True),
                       flops=sparse_flops, min_bytes=attn_fwd_bytes(shape, sparse=False), compiles=True,
                       note=note, fake="flex")
        if bwd:
            doutf = dout.transpose(1, 2).contiguous()

            def flex_setup():
                leaves = _leaves(qf, kf, vf)
                return flex(*leaves, block_mask=mask, enable_gqa=True), leaves

            runner.measure("flex_msa_bwd", shape, lambda st: torch.autograd.grad(st[0], st[1], doutf),
                           setup=flex_setup, direction="bwd", flops=BWD_FACTOR * sparse_flops,
                           min_bytes=attn_bwd_bytes(shape, sparse=False), compiles=True, note=note, fake="flex")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def import_msa(dry_run: bool):
    """Import msa_cuda (the installed package, which carries the compiled kernels; the source tree
    when none is installed or MSA_BENCH_SOURCE=1) and its reference.

    In a dry run a failed import is tolerated: nothing from msa_cuda is ever called there.
    """
    if os.environ.get("MSA_BENCH_SOURCE") or importlib.util.find_spec("msa_cuda") is None:
        sys.path.insert(0, str(REPO_ROOT / "python"))
    try:
        import msa_cuda
        from msa_cuda import reference as ref
    except Exception as exc:
        if not dry_run:
            raise
        print(f"dry run: msa_cuda not importable ({exc!r}); using stubs", flush=True)
        return None, None, {"import_error": repr(exc)}
    info = {"path": os.path.dirname(msa_cuda.__file__), "version": msa_cuda.__version__}
    try:
        from msa_cuda import _kernels

        info.update(extension_loaded=_kernels.extension_loaded(),
                    load_error=None if _kernels.load_error() is None else repr(_kernels.load_error()),
                    compiled_variants=_kernels.compiled_variants())
    except Exception as exc:  # the bench still runs, it just cannot tell which path ran
        info["kernel_status_error"] = repr(exc)
    return msa_cuda, ref, info


def kernel_backends(dry_run: bool) -> Dict[str, Any]:
    """Which ops run a compiled kernel on this GPU (else the reference), for the notes."""
    if dry_run:
        return {"select_backend": "dry run", "raw_kernel_op": False, "attn_kernel": False, "kl_kernel": False,
                "kl_dense_kernel": False}
    try:
        from msa_cuda import _kernels

        dev = torch.device("cuda")
        select = _kernels.has_kernel("select_blocks", dev, torch.bfloat16)
        attn = _kernels.has_kernel("block_sparse_attn", dev, torch.bfloat16)
        kl = _kernels.has_kernel("indexer_kl_loss", dev, torch.bfloat16)
        kl_dense = _kernels.has_kernel("indexer_kl_loss_dense", dev, torch.bfloat16)
        raw = _kernels.extension_loaded() and hasattr(torch.ops.msa_cuda_kernels, "select_blocks")
    except Exception as exc:
        return {"select_backend": f"unknown ({exc!r})", "raw_kernel_op": False, "attn_kernel": False,
                "kl_kernel": False, "kl_dense_kernel": False}
    return {"select_backend": "SM90 kernel" if select else "REFERENCE (no kernel on this device/build)",
            "raw_kernel_op": bool(raw), "attn_kernel": attn, "kl_kernel": kl, "kl_dense_kernel": kl_dense}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=DEFAULT_SEQLENS, help="sequence lengths S")
    p.add_argument("--include-1m", action="store_true", help=f"also run S = {SEQLEN_1M}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "out"), help="folder for results.json, speedup.png")
    p.add_argument("--reps", type=int, default=20, help="most timed repetitions per measurement")
    p.add_argument("--ref-reps", type=int, default=3, help="timed repetitions of the reference selection")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls (only the first when a call takes > 1 s)")
    p.add_argument("--budget-s", type=float, default=2.0, help="time the reps of one measurement may take")
    p.add_argument("--max-call-s", type=float, default=60.0,
                   help="skip a measurement whose calls are predicted to take longer")
    p.add_argument("--time-limit-s", type=float, default=480.0,
                   help="start no measurement that would end after this many seconds of run time")
    p.add_argument("--kl-dense", action="store_true",
                   help=f"with kl: also time the dense warm-up loss (dense=True, fwd+bwd, dense causal lse "
                        f"given) for S <= {KL_DENSE_MAX_SEQLEN} ({KL_DENSE_REFERENCE_MAX_SEQLEN} without its "
                        f"kernel; calls over {KL_DENSE_MAX_CALL_S:.0f} s skipped), against the dense cuDNN "
                        f"forward (target <= {KL_DENSE_TARGET}x at 32K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="no GPU: random times, exercises the outputs")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        p.error(f"unknown --ops {unknown}; choose from {','.join(OPS)}")
    if args.include_1m and SEQLEN_1M not in args.seqlens:
        args.seqlens = args.seqlens + [SEQLEN_1M]
    args.seqlens = sorted(set(args.seqlens))
    if min(args.seqlens) < 1 or args.reps < 1 or args.ref_reps < 1 or args.warmup < 1:
        p.error("--seqlens, --reps, --ref-reps and --warmup must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --dry-run", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    msa, ref, msa_info = import_msa(args.dry_run)
    meta = run_metadata(args.dry_run)
    meta["msa_cuda"] = msa_info
    meta.update(kernel_backends(args.dry_run))
    if args.dry_run:
        flush = None
        ceilings = {"matmul_tflops": 800.0, "copy_gbps": 3000.0}
        dense = ("dry run", None, True)
    else:
        flush = L2Flusher(torch.device("cuda"))
        try:
            ceilings = measure_ceilings(flush)
        except Exception as exc:  # the floors are a nicety; the run goes on without them
            print(f"ceilings not measured: {exc!r}", flush=True)
            ceilings = {}
        free_cuda_memory()
        dense = choose_dense_variant(Shape(512), need_backward="bwd" in args.ops)
    meta["dense_variant"] = dense[0]
    runner = Runner(args, meta, ceilings, dense, flush)
    print(f"device {meta['device']}; msa_cuda {msa_info}; select backend: {meta['select_backend']}; "
          f"dense: {dense[0]}", flush=True)
    print(_HEADER, flush=True)
    try:
        for seqlen in args.seqlens:
            bench_seqlen(runner, Shape(seqlen), msa, ref)
            free_cuda_memory()
    finally:
        runner.write_json()
        plot = write_plot(runner)
        print(f"\nwrote {Path(args.out) / 'results.json'}" + (f" and {plot}" if plot else ""), flush=True)
        print_table(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
