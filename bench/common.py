"""Shared pieces of the msa_cuda benchmarks: timing, memory, cost models, run metadata.

Timing (:func:`time_op`) follows the project's measuring method: one timed warm-up call (it
also absorbs compilation and handle creation, and tells how long a call takes), more warm-up
calls when they are cheap, then repetitions timed with CUDA events, each preceded by a write of
a 256 MiB buffer so that no rep finds its inputs in the 50-60 MB L2. The median is the number
reported; min, max and the spread are kept to judge noise.

Cost models (spec sections 4, 5, 7 and 9; M3 shape Hq=64, Hkv=4, D=Di=128, block 128, topk 16):

- selection: ``2 * Hkv * Di * S^2 / 2`` (causal index scores ``q_idx . k_idx``; the block max
  and top-k are not counted);
- dense causal attention forward: ``4 * Hq * D * S^2 / 2`` (QK^T and PV over the causal half);
- sparse attention forward: ``4 * D * G * T`` where ``T`` counts the attended
  (query, group, key) triples, i.e. per (query, group) the causally visible keys of its selected
  blocks (:func:`count_triples`);
- indexer KL loss forward: ``(2 * G * D + 2 * Di) * T`` (teacher scores of the G heads plus the
  student index scores on the same support); backward: ``(2 * G * D + 6 * Di) * T`` (both score
  sets recomputed, plus the two products that give dq_idx and dk_idx);
- any attention backward: 2.5 x its forward (five matrix products against two).

Byte models give the fewest bytes each op must move (every input read once, every output written
once); with the measured matrix-product rate and copy bandwidth (:func:`measure_ceilings`) they
give a floor time ``max(flops / rate, bytes / bandwidth)`` for each op.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

FLUSH_BYTES = 256 << 20  # larger than the L2 of any Hopper part (50 MB H100, 60 MB H200)
BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs for attention


# ---------------------------------------------------------------------------------------------
# Shapes and cost models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Problem shape of one benchmark size (B=1, self-attention: Sq = Sk = seqlen)."""

    seqlen: int
    hq: int = 64
    hkv: int = 4
    d: int = 128
    di: int = 128
    block_size: int = 128
    topk: int = 16
    batch: int = 1
    elt: int = 2  # bytes per element of q, k, v, q_idx, k_idx (bf16)

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def num_blocks(self) -> int:
        return -(-self.seqlen // self.block_size)


def select_flops(s: Shape) -> float:
    """Index scoring of the selection: ``2 * Hkv * Di * S^2 / 2`` per batch entry."""
    return s.batch * 2.0 * s.hkv * s.di * s.seqlen ** 2 / 2


def dense_fwd_flops(s: Shape) -> float:
    """Dense causal attention forward: ``4 * Hq * D * S^2 / 2`` per batch entry."""
    return s.batch * 4.0 * s.hq * s.d * s.seqlen ** 2 / 2


def sparse_fwd_flops(s: Shape, triples: int) -> float:
    """Sparse attention forward: ``4 * D * G`` per attended (query, group, key) triple."""
    return 4.0 * s.d * s.group * triples


def kl_fwd_flops(s: Shape, triples: int) -> float:
    """Indexer KL loss forward: teacher (G heads) and student scores on the support."""
    return (2.0 * s.group * s.d + 2.0 * s.di) * triples


def kl_bwd_flops(s: Shape, triples: int) -> float:
    """Indexer KL loss backward: both score sets recomputed, plus dq_idx and dk_idx products."""
    return (2.0 * s.group * s.d + 6.0 * s.di) * triples


def _tokens_bytes(s: Shape) -> Dict[str, int]:
    """Bytes of each tensor of the problem."""
    n = s.batch * s.seqlen
    return {
        "q": n * s.hq * s.d * s.elt,
        "kv": n * s.hkv * s.d * s.elt,  # one of k or v
        "q_idx": n * s.hkv * s.di * s.elt,
        "k_idx": n * s.di * s.elt,
        "indices": n * s.hkv * s.topk * 4,
        "lse": n * s.hq * 4,
    }


def select_bytes(s: Shape) -> int:
    """Read q_idx and k_idx, write the int32 selection."""
    t = _tokens_bytes(s)
    return t["q_idx"] + t["k_idx"] + t["indices"]


def attn_fwd_bytes(s: Shape, sparse: bool) -> int:
    """Read q, k, v (and the selection), write out and lse."""
    t = _tokens_bytes(s)
    return 2 * t["q"] + 2 * t["kv"] + t["lse"] + (t["indices"] if sparse else 0)


def attn_bwd_bytes(s: Shape, sparse: bool) -> int:
    """Read q, k, v, out, dout, lse (and the selection), write dq, dk, dv."""
    t = _tokens_bytes(s)
    return 4 * t["q"] + 4 * t["kv"] + t["lse"] + (t["indices"] if sparse else 0)


def kl_fwd_bytes(s: Shape) -> int:
    """Read q, k, q_idx, k_idx, the selection and lse; the loss is a scalar."""
    t = _tokens_bytes(s)
    return t["q"] + t["kv"] + t["q_idx"] + t["k_idx"] + t["indices"] + t["lse"]


def kl_bwd_bytes(s: Shape) -> int:
    """The forward's reads, plus writing dq_idx and dk_idx."""
    t = _tokens_bytes(s)
    return kl_fwd_bytes(s) + t["q_idx"] + t["k_idx"]


def expected_triples(s: Shape) -> int:
    """Attended (query, group, key) triples of any correct selection with Sq = Sk.

    Query i (position i, local block i // block_size) selects ``min(topk, local + 1)`` blocks:
    its local block, where it sees ``i - local * block_size + 1`` keys, and older blocks, which
    are whole and fully visible.
    """
    pos = torch.arange(s.seqlen, dtype=torch.int64)
    loc = pos // s.block_size
    count = torch.clamp(loc + 1, max=s.topk)
    per_query = (count - 1) * s.block_size + (pos - loc * s.block_size + 1)
    return int(per_query.sum()) * s.hkv * s.batch


@torch.no_grad()
def hot_block_selection(s: Shape, device, seed: int = 0, recency_blocks: float = 8.0,
                        chunk_rows: int = 4096) -> torch.Tensor:
    """A hot-block selection: every query takes block 0, its own block and the previous one, and
    fills the other slots with recency-biased picks (Gumbel top-k over visible blocks with
    log-weight ``-(local - b) / recency_blocks``), so blocks 0 and the most recent ones are chosen
    by almost every query: the load a KV-outer kernel must split across CTAs.

    Returns int32 ``[B, S, Hkv, topk]``: ascending ids, ``min(topk, local + 1)`` of them, -1 padded;
    a valid selection (same attended triples as :func:`expected_triples`).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    nblk = (s.seqlen + s.block_size - 1) // s.block_size
    blocks = torch.arange(nblk, device=device)
    out = torch.empty(s.batch, s.seqlen, s.hkv, s.topk, dtype=torch.int32, device=device)
    for start in range(0, s.seqlen, chunk_rows):
        pos = torch.arange(start, min(s.seqlen, start + chunk_rows), device=device)
        local = (pos // s.block_size)[:, None, None]  # [rows, 1, 1]
        noise = torch.rand(s.batch * len(pos), s.hkv, nblk, device=device, generator=gen)
        noise = noise.view(s.batch, len(pos), s.hkv, nblk)
        score = -(local - blocks).float() / recency_blocks - torch.log(-torch.log(noise.clamp_min(1e-20)))
        forced = (blocks == 0) | (blocks == local) | (blocks == local - 1)
        score = torch.where(forced, torch.inf, score)
        score = torch.where(blocks > local, -torch.inf, score)
        top = score.topk(min(s.topk, nblk), dim=-1)
        ids = torch.where(torch.isneginf(top.values), nblk, top.indices)  # invisible -> past the end
        ids = ids.sort(dim=-1).values
        ids = torch.where(ids >= nblk, -1, ids).to(torch.int32)
        chunk = out[:, start:start + len(pos)]
        chunk.fill_(-1)
        chunk[..., :ids.shape[-1]] = ids
    return out


@torch.no_grad()
def count_triples(block_indices: torch.Tensor, seqlen_k: int, block_size: int,
                  chunk_rows: int = 1 << 16) -> int:
    """Count the (query, group, key) triples a selection attends to, on its device.

    Parameters
    ----------
    block_indices : int32 [B, Sq, Hkv, topk]
        Block ids, -1 for unused slots; queries are the last Sq of ``seqlen_k`` positions.
    seqlen_k : int
        Number of keys Sk (>= Sq).
    block_size : int
    chunk_rows : int
        Queries per chunk (bounds the int64 temporaries).

    Returns
    -------
    int
        Sum over (batch, query, group, slot) of the keys of the block at positions <= the
        query's position: ``clamp(p - b * block_size + 1, 0, block_size)`` for ids b >= 0.
    """
    sq = block_indices.shape[1]
    total = torch.zeros((), dtype=torch.int64, device=block_indices.device)
    for c0 in range(0, sq, chunk_rows):
        c1 = min(sq, c0 + chunk_rows)
        ids = block_indices[:, c0:c1].to(torch.int64)
        pos = torch.arange(c0, c1, device=ids.device, dtype=torch.int64) + (seqlen_k - sq)
        visible = (pos[None, :, None, None] - ids * block_size + 1).clamp(0, block_size)
        total += torch.where(ids >= 0, visible, 0).sum()
    return int(total)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Result of :func:`time_op`: per-rep times in ms and the extra memory of one call."""

    times_ms: List[float]
    first_call_ms: float
    extra_bytes: int
    output: Any = field(default=None, repr=False)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent."""
        return 100.0 * (self.max_ms - self.min_ms) / self.median_ms if self.median_ms > 0 else 0.0


class L2Flusher:
    """Writes a 256 MiB device buffer, evicting whatever the L2 holds."""

    def __init__(self, device: torch.device, nbytes: int = FLUSH_BYTES):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or a tuple/list of them, else 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


def rep_count(call_ms: float, reps: int, budget_s: float, max_call_s: float) -> int:
    """Timed repetitions for a call of ``call_ms``: as many as fit ``budget_s``, at most ``reps``,
    at least 3 (fewer only when three calls would take more than ``max_call_s``)."""
    n = min(reps, max(3, int(1e3 * budget_s / max(call_ms, 1e-3))))
    if n * call_ms > 1e3 * max_call_s:
        n = max(1, int(1e3 * max_call_s / call_ms))
    return n


def time_op(fn: Callable[[Any], Any], flush: L2Flusher, *, setup: Optional[Callable[[], Any]] = None,
            reps: int = 20, warmup: int = 2, budget_s: float = 2.0, max_call_s: float = 60.0,
            compiles: bool = False, keep_output: bool = False) -> Timing:
    """Time ``fn(setup())`` with CUDA events; only ``fn`` lies between the events.

    Parameters
    ----------
    fn : callable
        Takes the object ``setup`` returned (None without ``setup``); its return value is dropped
        unless ``keep_output`` (then the warm-up call's is kept).
    flush : L2Flusher
        Run before each timed call, after ``setup``.
    setup : callable, optional
        Untimed preparation run before every call, e.g. a forward pass whose backward ``fn``
        times.
    reps : int
        Most timed repetitions.
    warmup : int
        Warm-up calls, timed to size the run. The second call always sizes it when it is cheap
        (the first carries one-time costs); more follow only while a call takes under a second.
    budget_s : float
        Time the repetitions may take: ``reps`` is cut to ``budget_s / call time``, but not below
        3 unless three calls would take more than ``max_call_s``.
    max_call_s : float
        When a warm-up call takes longer, its time is the only sample.
    compiles : bool
        ``fn`` compiles on its first call: a second warm-up call, whatever the first took, sizes
        the run (and is the only sample if it takes longer than ``max_call_s``).
    keep_output : bool
        Return the first call's output in ``Timing.output``.

    Returns
    -------
    Timing
        ``extra_bytes`` is the peak allocation during the first call beyond what was allocated
        before it and beyond its output: the op's workspace.
    """
    def run_once(state):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(state)
        end.record()
        return out, start, end

    state = setup() if setup is not None else None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, start, end = run_once(state)
    torch.cuda.synchronize()
    first_ms = start.elapsed_time(end)
    extra = max(0, torch.cuda.max_memory_allocated() - base - tensor_bytes(out))
    kept = out if keep_output else None
    del out, state

    def warm_call() -> float:
        state = setup() if setup is not None else None
        _, start, end = run_once(state)
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    # Size the run on a call without one-time costs in it (compilation, module load, plan and
    # handle creation), whenever one more call is cheap next to the per-call limit.
    call_ms, warm_calls = first_ms, 0
    if compiles or first_ms < 250 * max_call_s:
        call_ms, warm_calls = warm_call(), 1
    if call_ms > 1e3 * max_call_s:
        return Timing([call_ms], first_ms, extra, kept)
    if call_ms < 1e3:
        for _ in range(warmup - 1 - warm_calls):
            call_ms = warm_call()

    n = rep_count(call_ms, reps, budget_s, max_call_s)
    events = []
    for _ in range(n):
        state = setup() if setup is not None else None
        _, start, end = run_once(state)
        events.append((start, end))
        del state
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in events], first_ms, extra, kept)


def event_times(fn: Callable[[], Any], reps: int, warmup: int = 3) -> List[float]:
    """CUDA-event times (ms) of `reps` calls of fn after `warmup` untimed ones, no L2 flush: for
    same-process comparisons of one op under two settings (bench/knob_sweep.py,
    bench/validate_cost.py)."""
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return times


def measure_ceilings(flush: L2Flusher) -> Dict[str, float]:
    """Measure the two ceilings of the card: bf16 matrix-product rate and copy bandwidth.

    Returns ``{"matmul_tflops": ..., "copy_gbps": ...}``: an 8192^3 bf16 product on random data,
    and a 1 GiB device-to-device copy counting bytes read plus bytes written (medians).
    """
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm = time_op(lambda _: a @ b, flush, reps=20, warmup=3)
    del a, b
    src = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    cp = time_op(lambda _: dst.copy_(src), flush, reps=20, warmup=3)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2.0 * n ** 3 / (mm.median_ms * 1e-3) / 1e12,
            "copy_gbps": nbytes / (cp.median_ms * 1e-3) / 1e9}


def floor_ms(flops: float, nbytes: float, ceilings: Dict[str, float]) -> Optional[float]:
    """Lower bound on an op's time from its FLOPs and bytes and the measured ceilings (None without)."""
    if not ceilings:
        return None
    return 1e3 * max(flops / (ceilings["matmul_tflops"] * 1e12), nbytes / (ceilings["copy_gbps"] * 1e9))


def free_cuda_memory() -> None:
    """Return cached blocks to the driver (call after ``del`` of the tensors of a size)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata(dry_run: bool) -> Dict[str, Any]:
    """Device, library versions, git commit and date of this run."""
    meta: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "dry_run": dry_run,
    }
    status = _git("status", "--porcelain")
    if status is not None:
        meta["git_dirty"] = bool(status)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if dry_run or not torch.cuda.is_available():
        meta["device"] = "none (dry run)" if dry_run else "none"
        return meta
    props = torch.cuda.get_device_properties(0)
    meta.update({
        "device": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2 ** 30, 1),
        "cudnn": torch.backends.cudnn.version(),
    })
    return meta

