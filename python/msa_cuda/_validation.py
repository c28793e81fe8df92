"""Argument validation for the public msa_cuda functions.

Two kinds of checks live here:

* **Metadata checks** (types, dtypes, devices, ranks, shapes, integer and float options). The
  public functions in :mod:`msa_cuda.api` run them before any op call. They read no tensor data,
  so ``torch.compile(fullgraph=True)`` traces them without graph breaks.
* **Value checks** (``cu_seqlens`` contents, ``block_indices`` ranges and uniqueness). They need
  to read device memory, so the op bodies in :mod:`msa_cuda._ops` run them eagerly, before any
  kernel launch (:func:`check_cu_seqlens_values`, :func:`check_block_indices_values`).

Every error is a ``TypeError`` (wrong Python type or tensor dtype) or a ``ValueError`` (wrong
value, shape, rank or device) whose message starts with the argument's name.

Dtypes: q, k, v, q_idx and k_idx must be bfloat16 or float16. float32 and float64 are accepted
only when every tensor is on the CPU, so the reference can be used with ``torch.autograd.gradcheck``
and for exact comparisons; the CUDA kernels never see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import _kernels

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_INDEX_HEAD_DIMS = (64, 128)
SUPPORTED_GROUP_SIZES = (1, 2, 4, 8, 16)
SUPPORTED_BLOCK_SIZES = (64, 128)
MAX_TOPK = 32

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_CPU_ONLY_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Dims:
    """Sizes shared by the tensors of one call.

    For padded inputs ``batch``, ``seqlen_q`` and ``seqlen_k`` are B, Sq and Sk; for varlen inputs
    ``batch`` is the number of sequences (len(cu_seqlens) - 1) and ``seqlen_q``/``seqlen_k`` are
    the token counts Tq/Tk.
    """

    varlen: bool
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: Optional[int]
    heads_kv: int
    head_dim: Optional[int]
    head_dim_idx: Optional[int]


# --------------------------------------------------------------------------------------------
# Scalar options
# --------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """Check that ``value`` is a Python int (not bool) within [low, high]."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[int]) -> int:
    """Check that ``value`` is an int from ``choices``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, one of {tuple(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Check that ``value`` is a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def resolve_scale(name: str, value, default: float) -> float:
    """Return ``default`` when ``value`` is None, else ``float(value)`` checked finite and > 0."""
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float (finite, > 0) or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_selection_options(block_size, topk, init_blocks, local_blocks) -> None:
    """Check block_size, topk, init_blocks and local_blocks of a selection."""
    check_choice("block_size", block_size, SUPPORTED_BLOCK_SIZES)
    check_int("topk", topk, low=1, high=MAX_TOPK)
    check_int("init_blocks", init_blocks, low=0)
    check_int("local_blocks", local_blocks, low=0)
    forced = init_blocks + max(1, local_blocks)
    if forced > topk:
        raise ValueError(
            f"init_blocks + max(1, local_blocks) must be <= topk, got init_blocks={init_blocks}, "
            f"local_blocks={local_blocks} ({forced} forced blocks) with topk={topk}"
        )


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def check_tensor(name: str, x) -> torch.Tensor:
    """Check that ``x`` is a torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_same_device(named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> torch.device:
    """Check that all given tensors (None entries skipped) share the first tensor's device."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}"
            )
    return first.device


def check_float_dtypes(named: Sequence[Tuple[str, torch.Tensor]], *, all_on_cpu: bool) -> None:
    """Check that every tensor is bf16/fp16 (fp32/fp64 allowed only when all inputs are on CPU)
    and that all tensors in ``named`` share one dtype."""
    allowed = _HALF_DTYPES + (_CPU_ONLY_DTYPES if all_on_cpu else ())
    for name, t in named:
        if t.dtype not in allowed:
            if t.dtype in _CPU_ONLY_DTYPES:
                raise TypeError(
                    f"{name} must be torch.bfloat16 or torch.float16 on {t.device.type} "
                    f"(float32/float64 are accepted only when all inputs are on the CPU), got {t.dtype}"
                )
            raise TypeError(
                f"{name} must be torch.bfloat16 or torch.float16"
                f"{' (or float32/float64 on CPU)' if all_on_cpu else ''}, got {t.dtype}"
            )
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have the same dtype as {first_name} ({first.dtype}), got {t.dtype}")


def check_rank(name: str, x: torch.Tensor, ranks: Sequence[int], layout: str) -> None:
    """Check that ``x.dim()`` is one of ``ranks`` (``layout`` describes the expected shape)."""
    if x.dim() not in ranks:
        raise ValueError(f"{name} must have shape {layout} (rank {' or '.join(map(str, ranks))}), got {tuple(x.shape)}")


def check_dim(name: str, x: torch.Tensor, axis: int, expected: int, what: str) -> None:
    """Check that ``x.shape[axis] == expected``; ``what`` names the size (e.g. 'Sq of q')."""
    if x.shape[axis] != expected:
        raise ValueError(f"{name} must have {what} = {expected} in dim {axis % x.dim()}, got shape {tuple(x.shape)}")


def check_cu_seqlens_meta(cu_seqlens_q, cu_seqlens_k) -> Optional[int]:
    """Check the metadata of a cu_seqlens pair; return the number of sequences (None if padded)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"{missing} must be given together with the other cu_seqlens (varlen needs both)")
    if cu_seqlens_q is None:
        return None
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be torch.int32, got {cu.dtype}")
        if cu.dim() != 1:
            raise ValueError(f"{name} must be 1-D [B+1], got shape {tuple(cu.shape)}")
        if cu.shape[0] < 2:
            raise ValueError(f"{name} must have at least 2 entries (B+1 with B >= 1), got {cu.shape[0]}")
        if not cu.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_k must have the same length as cu_seqlens_q (B+1 = {cu_seqlens_q.shape[0]}), "
            f"got {cu_seqlens_k.shape[0]}"
        )
    return cu_seqlens_q.shape[0] - 1


def check_max_seqlen(name: str, value, dims: Dims, which: str) -> int:
    """Check max_seqlen_q/max_seqlen_k; return the value the ops get (-1: compute from cu_seqlens)."""
    padded_len = dims.seqlen_q if which == "q" else dims.seqlen_k
    if value is None:
        return -1 if dims.varlen else padded_len
    check_int(name, value, low=0)
    if not dims.varlen and value < padded_len:
        raise ValueError(f"{name} must be >= the sequence length {padded_len}, got {value}")
    if dims.varlen and value < 1:
        raise ValueError(f"{name} must be >= 1 (the longest sequence), got {value}")
    return value


def _check_seqlens(dims: Dims, q_name: str = "q", k_name: str = "k") -> None:
    """Zero sizes and Sq <= Sk (padded; varlen per-sequence lengths are checked in the ops)."""
    if dims.varlen:
        if dims.seqlen_q == 0:
            raise ValueError(f"{q_name} must have at least one token (Tq = 0 is not supported)")
        if dims.seqlen_k == 0:
            raise ValueError(f"{k_name} must have at least one token (Tk = 0 is not supported)")
        return
    if dims.batch == 0:
        raise ValueError(f"{q_name} must have batch size B >= 1, got B = 0")
    if dims.seqlen_q == 0:
        raise ValueError(f"{q_name} must have Sq >= 1, got Sq = 0")
    if dims.seqlen_k == 0:
        raise ValueError(f"{k_name} must have Sk >= 1, got Sk = 0")
    if dims.seqlen_q > dims.seqlen_k:
        raise ValueError(
            f"{q_name} must have Sq <= Sk (queries are the last Sq of the Sk positions), got Sq = {dims.seqlen_q} "
            f"and Sk = {dims.seqlen_k}"
        )


def _check_query_kv(q, k, v, varlen: bool) -> Tuple[int, int, int, int, int, int]:
    """Check q, k (and v) shapes; return (B, Sq, Sk, Hq, Hkv, D) (B = -1 for varlen)."""
    if varlen:
        check_rank("q", q, (3,), "[Tq, Hq, D] (varlen)")
        check_rank("k", k, (3,), "[Tk, Hkv, D] (varlen)")
        batch, off = -1, 0
    else:
        check_rank("q", q, (4,), "[B, Sq, Hq, D]")
        check_rank("k", k, (4,), "[B, Sk, Hkv, D]")
        batch, off = q.shape[0], 1
        check_dim("k", k, 0, batch, "batch size B of q")
    seqlen_q, heads_q, head_dim = q.shape[off], q.shape[off + 1], q.shape[off + 2]
    seqlen_k, heads_kv = k.shape[off], k.shape[off + 1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q must have head dim D in {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    check_dim("k", k, -1, head_dim, "head dim D of q")
    if q.numel() // head_dim >= 2**31:
        raise ValueError(f"q must have fewer than 2**31 (token, head) rows (32-bit row index), got "
                         f"{q.numel() // head_dim}")
    if heads_kv < 1:
        raise ValueError(f"k must have Hkv >= 1 heads, got {heads_kv}")
    if heads_q % heads_kv != 0:
        raise ValueError(f"q must have Hq divisible by k's Hkv, got Hq = {heads_q} and Hkv = {heads_kv}")
    group = heads_q // heads_kv
    if group not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"q must have Hq / Hkv (query heads per KV head) in {SUPPORTED_GROUP_SIZES}, got "
            f"Hq = {heads_q}, Hkv = {heads_kv} (G = {group})"
        )
    if v is not None:
        if v.dim() != k.dim():
            raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
        for axis in range(k.dim()):
            if v.shape[axis] != k.shape[axis]:
                raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    return batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim


def _check_index_tensors(q_idx, k_idx, varlen: bool, batch: int, seqlen_q: Optional[int],
                         seqlen_k: Optional[int], heads_kv: Optional[int]):
    """Check q_idx/k_idx shapes; return (k_idx with the size-1 head dim squeezed, Sq, Sk, Hkv, Di)."""
    if varlen:
        check_rank("q_idx", q_idx, (3,), "[Tq, Hkv, Di] (varlen)")
        check_rank("k_idx", k_idx, (2, 3), "[Tk, Di] or [Tk, 1, Di] (varlen)")
        off = 0
    else:
        check_rank("q_idx", q_idx, (4,), "[B, Sq, Hkv, Di]")
        check_rank("k_idx", k_idx, (3, 4), "[B, Sk, Di] or [B, Sk, 1, Di]")
        off = 1
        if batch is None:
            batch = q_idx.shape[0]
        check_dim("q_idx", q_idx, 0, batch, "batch size B")
        check_dim("k_idx", k_idx, 0, batch, "batch size B")
    if k_idx.dim() == off + 3:
        if k_idx.shape[off + 1] != 1:
            raise ValueError(
                f"k_idx must have a single index-key head (one head shared by all groups); got shape "
                f"{tuple(k_idx.shape)}"
            )
        k_idx = k_idx.squeeze(off + 1)
    head_dim_idx = q_idx.shape[-1]
    if head_dim_idx not in SUPPORTED_INDEX_HEAD_DIMS:
        raise ValueError(f"q_idx must have index head dim Di in {SUPPORTED_INDEX_HEAD_DIMS}, got {head_dim_idx}")
    check_dim("k_idx", k_idx, -1, head_dim_idx, "index head dim Di of q_idx")
    if seqlen_q is not None:
        check_dim("q_idx", q_idx, off, seqlen_q, "the number of query tokens of q")
    if seqlen_k is not None:
        check_dim("k_idx", k_idx, off, seqlen_k, "the number of key tokens of k")
    if heads_kv is not None:
        check_dim("q_idx", q_idx, off + 1, heads_kv, "Hkv (one index head per KV head of k)")
    elif q_idx.shape[off + 1] < 1:
        raise ValueError(f"q_idx must have Hkv >= 1 index heads, got {q_idx.shape[off + 1]}")
    return k_idx, q_idx.shape[off], k_idx.shape[off], q_idx.shape[off + 1], head_dim_idx


def check_block_indices_meta(block_indices, dims: Dims) -> int:
    """Check block_indices' type, dtype and shape; return topk (its last dim)."""
    check_tensor("block_indices", block_indices)
    if block_indices.dtype != torch.int32:
        raise TypeError(f"block_indices must be torch.int32, got {block_indices.dtype}")
    if dims.varlen:
        check_rank("block_indices", block_indices, (3,), "[Tq, Hkv, topk] (varlen)")
        expected = (dims.seqlen_q, dims.heads_kv)
    else:
        check_rank("block_indices", block_indices, (4,), "[B, Sq, Hkv, topk]")
        expected = (dims.batch, dims.seqlen_q, dims.heads_kv)
    if tuple(block_indices.shape[:-1]) != expected:
        lead = "[Tq, Hkv]" if dims.varlen else "[B, Sq, Hkv]"
        raise ValueError(
            f"block_indices must have leading dims {lead} = {expected}, got shape {tuple(block_indices.shape)}"
        )
    topk = block_indices.shape[-1]
    if topk < 1 or topk > MAX_TOPK:
        raise ValueError(f"block_indices must have a last dim (topk) in [1, {MAX_TOPK}], got {topk}")
    return topk


def check_lse_meta(lse, dims: Dims) -> None:
    """Check a caller-provided lse: fp32 (fp64 on CPU), [B, Hq, Sq] padded or [Hq, Tq] varlen."""
    check_tensor("lse", lse)
    if lse.dtype != torch.float32 and not (lse.dtype == torch.float64 and lse.device.type == "cpu"):
        raise TypeError(f"lse must be torch.float32 (float64 accepted on CPU), got {lse.dtype}")
    if dims.varlen:
        expected, layout = (dims.heads_q, dims.seqlen_q), "[Hq, Tq]"
    else:
        expected, layout = (dims.batch, dims.heads_q, dims.seqlen_q), "[B, Hq, Sq]"
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape {layout} = {expected}, got {tuple(lse.shape)}")


# --------------------------------------------------------------------------------------------
# Per-function metadata checks (called by api.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectArgs:
    k_idx: torch.Tensor
    index_scale: float
    max_seqlen_q: int
    max_seqlen_k: int
    dims: Dims


def validate_select_blocks(q_idx, k_idx, *, block_size, topk, index_scale, init_blocks, local_blocks,
                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> SelectArgs:
    """Metadata checks of :func:`msa_cuda.select_blocks`."""
    check_tensor("q_idx", q_idx)
    check_tensor("k_idx", k_idx)
    num_seqs = check_cu_seqlens_meta(cu_seqlens_q, cu_seqlens_k)
    varlen = num_seqs is not None
    device = check_same_device([("q_idx", q_idx), ("k_idx", k_idx),
                                ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)])
    check_float_dtypes([("q_idx", q_idx), ("k_idx", k_idx)], all_on_cpu=device.type == "cpu")
    check_selection_options(block_size, topk, init_blocks, local_blocks)
    k_idx, seqlen_q, seqlen_k, heads_kv, head_dim_idx = _check_index_tensors(
        q_idx, k_idx, varlen, None, None, None, None)
    dims = Dims(varlen, num_seqs if varlen else q_idx.shape[0], seqlen_q, seqlen_k, None, heads_kv, None,
                head_dim_idx)
    _check_seqlens(dims, "q_idx", "k_idx")
    index_scale = resolve_scale("index_scale", index_scale, 1.0 / math.sqrt(head_dim_idx))
    return SelectArgs(
        k_idx, index_scale,
        check_max_seqlen("max_seqlen_q", max_seqlen_q, dims, "q"),
        check_max_seqlen("max_seqlen_k", max_seqlen_k, dims, "k"),
        dims,
    )


@dataclass(frozen=True)
class AttnArgs:
    softmax_scale: float
    max_seqlen_q: int
    max_seqlen_k: int
    dims: Dims


def _main_dims(q, k, v, cu_seqlens_q, cu_seqlens_k, extra_named) -> Tuple[Dims, torch.device]:
    check_tensor("q", q)
    check_tensor("k", k)
    if v is not None:
        check_tensor("v", v)
    for name, t in extra_named:
        if t is not None:
            check_tensor(name, t)
    num_seqs = check_cu_seqlens_meta(cu_seqlens_q, cu_seqlens_k)
    varlen = num_seqs is not None
    named = [("q", q), ("k", k), ("v", v)] + list(extra_named) + [
        ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)]
    device = check_same_device(named)
    main = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    check_float_dtypes(main, all_on_cpu=device.type == "cpu")
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim = _check_query_kv(q, k, v, varlen)
    dims = Dims(varlen, num_seqs if varlen else batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, None)
    _check_seqlens(dims)
    return dims, device


def validate_block_sparse_attn(q, k, v, block_indices, *, block_size, softmax_scale, cu_seqlens_q,
                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse, validate) -> AttnArgs:
    """Metadata checks of :func:`msa_cuda.block_sparse_attn`."""
    check_tensor("v", v)
    check_tensor("block_indices", block_indices)
    dims, _ = _main_dims(q, k, v, cu_seqlens_q, cu_seqlens_k, [("block_indices", block_indices)])
    check_choice("block_size", block_size, SUPPORTED_BLOCK_SIZES)
    check_block_indices_meta(block_indices, dims)
    check_bool("return_lse", return_lse)
    check_bool("validate", validate)
    softmax_scale = resolve_scale("softmax_scale", softmax_scale, 1.0 / math.sqrt(dims.head_dim))
    return AttnArgs(
        softmax_scale,
        check_max_seqlen("max_seqlen_q", max_seqlen_q, dims, "q"),
        check_max_seqlen("max_seqlen_k", max_seqlen_k, dims, "k"),
        dims,
    )


@dataclass(frozen=True)
class KLArgs:
    k_idx: torch.Tensor
    block_indices: Optional[torch.Tensor]
    softmax_scale: float
    index_scale: float
    max_seqlen_q: int
    max_seqlen_k: int
    dims: Dims


def validate_indexer_kl_loss(q, k, q_idx, k_idx, block_indices, *, block_size, softmax_scale, index_scale,
                             dense, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, validate) -> KLArgs:
    """Metadata checks of :func:`msa_cuda.indexer_kl_loss`."""
    check_bool("dense", dense)
    check_bool("validate", validate)
    if dense:
        block_indices = None  # ignored by the dense warm-up loss
    elif block_indices is None:
        raise ValueError("block_indices must be given unless dense=True (the dense warm-up loss)")
    check_tensor("q_idx", q_idx)
    check_tensor("k_idx", k_idx)
    extra = [("q_idx", q_idx), ("k_idx", k_idx), ("block_indices", block_indices), ("lse", lse)]
    dims, device = _main_dims(q, k, None, cu_seqlens_q, cu_seqlens_k, extra)
    check_float_dtypes([("q_idx", q_idx), ("k_idx", k_idx)], all_on_cpu=device.type == "cpu")
    check_choice("block_size", block_size, SUPPORTED_BLOCK_SIZES)
    k_idx, _, _, _, head_dim_idx = _check_index_tensors(
        q_idx, k_idx, dims.varlen, None if dims.varlen else dims.batch, dims.seqlen_q, dims.seqlen_k,
        dims.heads_kv)
    dims = Dims(dims.varlen, dims.batch, dims.seqlen_q, dims.seqlen_k, dims.heads_q, dims.heads_kv,
                dims.head_dim, head_dim_idx)
    if block_indices is not None:
        check_block_indices_meta(block_indices, dims)
    if lse is not None:
        check_lse_meta(lse, dims)
    softmax_scale = resolve_scale("softmax_scale", softmax_scale, 1.0 / math.sqrt(dims.head_dim))
    index_scale = resolve_scale("index_scale", index_scale, 1.0 / math.sqrt(head_dim_idx))
    return KLArgs(
        k_idx, block_indices, softmax_scale, index_scale,
        check_max_seqlen("max_seqlen_q", max_seqlen_q, dims, "q"),
        check_max_seqlen("max_seqlen_k", max_seqlen_k, dims, "k"),
        dims,
    )


@dataclass(frozen=True)
class SparseAttnArgs:
    k_idx: torch.Tensor
    softmax_scale: float
    index_scale: float
    max_seqlen_q: int
    max_seqlen_k: int
    dims: Dims


def validate_sparse_attn(q, k, v, q_idx, k_idx, *, block_size, topk, softmax_scale, index_scale, init_blocks,
                         local_blocks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         return_aux) -> SparseAttnArgs:
    """Metadata checks of :func:`msa_cuda.sparse_attn`."""
    check_tensor("v", v)
    check_tensor("q_idx", q_idx)
    check_tensor("k_idx", k_idx)
    dims, device = _main_dims(q, k, v, cu_seqlens_q, cu_seqlens_k, [("q_idx", q_idx), ("k_idx", k_idx)])
    check_float_dtypes([("q_idx", q_idx), ("k_idx", k_idx)], all_on_cpu=device.type == "cpu")
    check_selection_options(block_size, topk, init_blocks, local_blocks)
    check_bool("return_aux", return_aux)
    k_idx, _, _, _, head_dim_idx = _check_index_tensors(
        q_idx, k_idx, dims.varlen, None if dims.varlen else dims.batch, dims.seqlen_q, dims.seqlen_k,
        dims.heads_kv)
    dims = Dims(dims.varlen, dims.batch, dims.seqlen_q, dims.seqlen_k, dims.heads_q, dims.heads_kv,
                dims.head_dim, head_dim_idx)
    softmax_scale = resolve_scale("softmax_scale", softmax_scale, 1.0 / math.sqrt(dims.head_dim))
    index_scale = resolve_scale("index_scale", index_scale, 1.0 / math.sqrt(head_dim_idx))
    return SparseAttnArgs(
        k_idx, softmax_scale, index_scale,
        check_max_seqlen("max_seqlen_q", max_seqlen_q, dims, "q"),
        check_max_seqlen("max_seqlen_k", max_seqlen_k, dims, "k"),
        dims,
    )


MAX_DECODE_TOKENS = 16


@dataclass(frozen=True)
class KVCacheArgs:
    k_idx_cache: torch.Tensor  # the size-1 head dim squeezed
    k_idx: Optional[torch.Tensor]
    k_idx_scale_cache: Optional[torch.Tensor]  # fp8 index-key cache: [.., S_max] / [.., page_size]
    softmax_scale: float
    index_scale: float
    capacity: int     # tokens one request's cache can hold
    num_pages: int    # paged: pages in the cache; contiguous: 0


def validate_sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, k_idx_cache, *, cache_seqlens, k, v, k_idx,
                                      block_table, block_size, topk, softmax_scale, index_scale, init_blocks,
                                      local_blocks, return_aux, k_idx_scale_cache=None) -> KVCacheArgs:
    """Metadata checks of :func:`msa_cuda.sparse_attn_with_kvcache`."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("q_idx", q_idx),
                    ("k_idx_cache", k_idx_cache), ("cache_seqlens", cache_seqlens)):
        check_tensor(name, t)
    new = [("k", k), ("v", v), ("k_idx", k_idx)]
    given = [n for n, t in new if t is not None]
    if given and len(given) != 3:
        raise ValueError(f"k, v and k_idx must be given together (to append to the caches), got only {given}")
    for name, t in new:
        if t is not None:
            check_tensor(name, t)
    if block_table is not None:
        check_tensor("block_table", block_table)
    device = check_same_device([("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("q_idx", q_idx),
                                ("k_idx_cache", k_idx_cache), ("cache_seqlens", cache_seqlens), ("k", k),
                                ("v", v), ("k_idx", k_idx), ("block_table", block_table)])
    on_cpu = device.type == "cpu"
    main = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] + ([("k", k), ("v", v)] if given else [])
    check_float_dtypes(main, all_on_cpu=on_cpu)
    fp8_keys = k_idx_cache.dtype == torch.float8_e4m3fn
    check_float_dtypes([("q_idx", q_idx)] + ([] if fp8_keys else [("k_idx_cache", k_idx_cache)])
                       + ([("k_idx", k_idx)] if given else []), all_on_cpu=on_cpu)
    if fp8_keys != (k_idx_scale_cache is not None):
        raise ValueError("k_idx_scale_cache must be given exactly when k_idx_cache is torch.float8_e4m3fn "
                         f"(k_idx_cache is {k_idx_cache.dtype})")
    check_selection_options(block_size, topk, init_blocks, local_blocks)
    check_bool("return_aux", return_aux)

    check_rank("q", q, (4,), "[B, S_new, Hq, D]")
    batch, s_new, heads_q, head_dim = q.shape
    if not 1 <= s_new <= MAX_DECODE_TOKENS:
        raise ValueError(f"q must have 1 to {MAX_DECODE_TOKENS} new tokens per request (dim 1), got {s_new}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q must have head dim D in {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    paged = block_table is not None
    layout = "[num_pages, page_size, Hkv, D] (paged)" if paged else "[B, S_max, Hkv, D]"
    check_rank("k_cache", k_cache, (4,), layout)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have the same shape as k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    heads_kv = k_cache.shape[2]
    check_dim("k_cache", k_cache, 3, head_dim, "head dim D of q")
    if heads_kv < 1 or heads_q % heads_kv != 0 or heads_q // heads_kv not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"q and k_cache must have Hq / Hkv in {SUPPORTED_GROUP_SIZES}, got Hq = {heads_q}, "
                         f"Hkv = {heads_kv}")
    check_rank("k_idx_cache", k_idx_cache, (3, 4), "[.., Di] or [.., 1, Di] over k_cache's first two dims")
    if k_idx_cache.dim() == 4:
        if k_idx_cache.shape[2] != 1:
            raise ValueError(f"k_idx_cache must have a single index-key head, got shape {tuple(k_idx_cache.shape)}")
        k_idx_cache = k_idx_cache.squeeze(2)
    if tuple(k_idx_cache.shape[:2]) != tuple(k_cache.shape[:2]):
        raise ValueError(f"k_idx_cache must match k_cache's first two dims {tuple(k_cache.shape[:2])}, got "
                         f"{tuple(k_idx_cache.shape)}")
    if fp8_keys:
        check_tensor("k_idx_scale_cache", k_idx_scale_cache)
        if k_idx_scale_cache.device != k_idx_cache.device:
            raise ValueError(f"k_idx_scale_cache must be on {k_idx_cache.device}, got {k_idx_scale_cache.device}")
        if k_idx_scale_cache.dtype != torch.float32:
            raise TypeError(f"k_idx_scale_cache must be float32, got {k_idx_scale_cache.dtype}")
        if k_idx_scale_cache.dim() == 3 and k_idx_scale_cache.shape[2] == 1:
            k_idx_scale_cache = k_idx_scale_cache.squeeze(2)
        if tuple(k_idx_scale_cache.shape) != tuple(k_cache.shape[:2]):
            raise ValueError(f"k_idx_scale_cache must be {tuple(k_cache.shape[:2])} (one scale per cached token), "
                             f"got {tuple(k_idx_scale_cache.shape)}")
        if block_table is None and k_cache.shape[1] % 4 != 0:
            # The decode kernels load 64 scales per TMA box; a box must start 16-byte aligned.
            raise ValueError(f"with an fp8 index-key cache, a contiguous cache's S_max must be a multiple of 4, "
                             f"got {k_cache.shape[1]}")
    check_rank("q_idx", q_idx, (4,), "[B, S_new, Hkv, Di]")
    if tuple(q_idx.shape[:3]) != (batch, s_new, heads_kv):
        raise ValueError(f"q_idx must be [B, S_new, Hkv, Di] = [{batch}, {s_new}, {heads_kv}, Di], got "
                         f"{tuple(q_idx.shape)}")
    head_dim_idx = q_idx.shape[3]
    if head_dim_idx not in SUPPORTED_INDEX_HEAD_DIMS:
        raise ValueError(f"q_idx must have index head dim Di in {SUPPORTED_INDEX_HEAD_DIMS}, got {head_dim_idx}")
    check_dim("k_idx_cache", k_idx_cache, 2, head_dim_idx, "index head dim Di of q_idx")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape [B] = [{batch}], got {tuple(cache_seqlens.shape)}")
    if given:
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != (batch, s_new, heads_kv, head_dim):
                raise ValueError(f"{name} must be [B, S_new, Hkv, D] = [{batch}, {s_new}, {heads_kv}, {head_dim}], "
                                 f"got {tuple(t.shape)}")
        if k_idx.dim() == 4 and k_idx.shape[2] == 1:
            k_idx = k_idx.squeeze(2)
        if tuple(k_idx.shape) != (batch, s_new, head_dim_idx):
            raise ValueError(f"k_idx must be [B, S_new, Di] = [{batch}, {s_new}, {head_dim_idx}], got "
                             f"{tuple(k_idx.shape)}")
    if paged:
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        check_rank("block_table", block_table, (2,), "[B, pages]")
        check_dim("block_table", block_table, 0, batch, "batch size B of q")
        page_size = k_cache.shape[1]
        if page_size % block_size != 0:
            raise ValueError(f"k_cache's page size must be a multiple of block_size ({block_size}), got {page_size}")
        capacity, num_pages = block_table.shape[1] * page_size, k_cache.shape[0]
    else:
        check_dim("k_cache", k_cache, 0, batch, "batch size B of q")
        capacity, num_pages = k_cache.shape[1], 0
    softmax_scale = resolve_scale("softmax_scale", softmax_scale, 1.0 / math.sqrt(head_dim))
    index_scale = resolve_scale("index_scale", index_scale, 1.0 / math.sqrt(head_dim_idx))
    return KVCacheArgs(k_idx_cache, k_idx, k_idx_scale_cache, softmax_scale, index_scale, capacity, num_pages)


def check_kvcache_values(cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor], s_new: int,
                         appended: bool, capacity: int, num_pages: int) -> list:
    """Value checks of a decoding step (host read); returns every request's length after appending.

    Each request needs S_new <= L_b (its queries are the last S_new of its L_b tokens) and
    L_b <= the cache capacity; the pages holding its L_b tokens must exist.
    """
    lengths = (cache_seqlens.to("cpu", torch.int64) + (s_new if appended else 0)).tolist()
    for b, length in enumerate(lengths):
        if length < s_new:
            raise ValueError(f"cache_seqlens[{b}] must leave at least S_new = {s_new} cached tokens to attend from "
                             f"(the new queries are the last S_new positions), got {length - (s_new if appended else 0)}"
                             f"{' before appending ' + str(s_new) if appended else ''}")
        if length > capacity:
            raise ValueError(f"cache_seqlens[{b}] (+ appended tokens) = {length} exceeds the cache capacity {capacity}")
    if block_table is not None:
        page_size = capacity // block_table.shape[1]
        table = block_table.to("cpu", torch.int64)
        for b, length in enumerate(lengths):
            used = table[b, :-(-length // page_size)]
            if bool(((used < 0) | (used >= num_pages)).any()):
                raise ValueError(f"block_table[{b}] must name pages in [0, {num_pages}) for its {length} tokens, got "
                                 f"{used.tolist()}")
    return lengths


# --------------------------------------------------------------------------------------------
# Value checks (called eagerly inside the op bodies, before any kernel launch)
# --------------------------------------------------------------------------------------------


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_cu_seqlens_values(cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                            total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int) -> Tuple[int, int]:
    """Check the contents of a cu_seqlens pair and return (max_seqlen_q, max_seqlen_k).

    Checks: both start at 0, are non-decreasing, end at the token counts ``total_q``/``total_k``,
    every sequence has Sq_b <= Sk_b, and given maxima (>= 0; -1 means "not given") are at least the
    true maxima. Returns the true maxima. Padded inputs (both None) return the given values.

    This reads the tensors on the host (one device-to-host copy). During CUDA-graph capture the
    values cannot be read; the checks are skipped and the given maxima must be provided.
    """
    if cu_seqlens_q is None:
        return max_seqlen_q, max_seqlen_k
    if cu_seqlens_q.device.type == "cuda" and _capturing():
        if max_seqlen_q < 0 or max_seqlen_k < 0:
            raise ValueError("max_seqlen_q and max_seqlen_k must be given for varlen calls under CUDA-graph capture")
        return max_seqlen_q, max_seqlen_k
    both = torch.stack([cu_seqlens_q, cu_seqlens_k]).to("cpu", torch.int64)
    true_max = []
    for row, name, total, given in ((both[0], "cu_seqlens_q", total_q, max_seqlen_q),
                                    (both[1], "cu_seqlens_k", total_k, max_seqlen_k)):
        if row[0].item() != 0:
            raise ValueError(f"{name} must start at 0, got {row[0].item()}")
        lengths = row[1:] - row[:-1]
        if bool((lengths < 0).any()):
            bad = int(torch.nonzero(lengths < 0)[0, 0])
            raise ValueError(f"{name} must be non-decreasing, got {row[bad].item()} then {row[bad + 1].item()} "
                             f"at positions {bad} and {bad + 1}")
        if row[-1].item() != total:
            what = "Tq (q's token count)" if name == "cu_seqlens_q" else "Tk (k's token count)"
            raise ValueError(f"{name} must end at {what} = {total}, got {row[-1].item()}")
        longest = int(lengths.max())
        if given >= 0 and given < longest:
            arg = "max_seqlen_q" if name == "cu_seqlens_q" else "max_seqlen_k"
            raise ValueError(f"{arg} must be >= the longest sequence in {name} ({longest}), got {given}")
        true_max.append(longest)
    len_q = both[0, 1:] - both[0, :-1]
    len_k = both[1, 1:] - both[1, :-1]
    if bool((len_q > len_k).any()):
        bad = int(torch.nonzero(len_q > len_k)[0, 0])
        raise ValueError(
            f"cu_seqlens_q must give every sequence Sq <= Sk (queries are the last Sq positions), sequence "
            f"{bad} has Sq = {len_q[bad].item()} and Sk = {len_k[bad].item()}"
        )
    return true_max[0], true_max[1]


def check_block_indices_values(block_indices: torch.Tensor, block_size: int, seqlen_k: int,
                               cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor]) -> None:
    """Check that every entry of ``block_indices`` is -1 or a block id of its sequence,
    ``[0, ceil(Sk_b / block_size))``, and that ids (ignoring -1) are unique per (query, group) row.

    ``seqlen_k`` is Sk for padded inputs (ignored for varlen, where cu_seqlens give Sk_b). Call
    after :func:`check_cu_seqlens_values`. Runs on the tensor's device with one host sync.
    Skipped during CUDA-graph capture (values cannot be read then).
    """
    if block_indices.numel() == 0:
        return
    if block_indices.device.type == "cuda" and _capturing():
        return
    if _check_kernel_applies(block_indices, cu_seqlens_q, cu_seqlens_k):
        # One pass on the GPU; the PyTorch pass only runs to name the offending entry.
        contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
        flags = _kernels.kernel("check_block_indices")(
            block_indices.contiguous(), contiguous(cu_seqlens_q), contiguous(cu_seqlens_k), seqlen_k,
            block_size).cpu()
        if not bool(flags.any()):
            return
    check_block_indices_values_torch(block_indices, block_size, seqlen_k, cu_seqlens_q, cu_seqlens_k)


def _check_kernel_applies(block_indices: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                          cu_seqlens_k: Optional[torch.Tensor]) -> bool:
    """Whether the GPU check takes this selection: the public ops' layouts (a direct op call with
    other dtypes or topk keeps the PyTorch pass), on an SM90 GPU with the extension (no fallback
    warning: the PyTorch pass is not a slow path here)."""
    if block_indices.dtype != torch.int32 or not 1 <= block_indices.shape[-1] <= MAX_TOPK:
        return False
    for cu in (cu_seqlens_q, cu_seqlens_k):
        if cu is not None and (cu.dtype != torch.int32 or cu.device != block_indices.device):
            return False
    return _kernels.has_kernel("check_block_indices", block_indices.device, warn=False)


def check_block_indices_values_torch(block_indices: torch.Tensor, block_size: int, seqlen_k: int,
                                     cu_seqlens_q: Optional[torch.Tensor],
                                     cu_seqlens_k: Optional[torch.Tensor]) -> None:
    """:func:`check_block_indices_values` in PyTorch ops on the tensor's device (a sort of the
    ids, one host sync); raises the ValueError that names the first offending entry."""
    ids = block_indices.to(torch.int64)
    if cu_seqlens_q is None:
        num_blocks = torch.tensor((seqlen_k + block_size - 1) // block_size, device=ids.device)
        limit = num_blocks
    else:
        cu_q = cu_seqlens_q.to(torch.int64)
        cu_k = cu_seqlens_k.to(torch.int64)
        num_blocks_seq = (cu_k[1:] - cu_k[:-1] + block_size - 1) // block_size
        token = torch.arange(ids.shape[0], device=ids.device)
        seq_of_token = torch.searchsorted(cu_q[1:], token, right=True)
        limit = num_blocks_seq[seq_of_token].view(-1, 1, 1)
    out_of_range = (ids < -1) | (ids >= limit)
    ordered = torch.sort(ids, dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    flags = torch.stack([out_of_range.any(), repeated.any()]).cpu()
    if bool(flags[0]):
        where = tuple(int(i) for i in torch.nonzero(out_of_range)[0].cpu())
        bound = int(limit.expand_as(ids)[where])
        raise ValueError(
            f"block_indices must hold -1 or block ids in [0, {bound}) (the number of key blocks of that "
            f"sequence with block_size={block_size}); got {int(ids[where])} at index {list(where)}"
        )
    if bool(flags[1]):
        row = tuple(int(i) for i in torch.nonzero(repeated)[0, :-1].cpu())
        raise ValueError(
            f"block_indices must not repeat a block id within one (query, group) row; row {list(row)} is "
            f"{ids[row].tolist()}"
        )
