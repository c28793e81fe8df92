"""Pure-PyTorch reference of MiniMax Sparse Attention (MSA).

This module is the executable form of ``MSA_SPEC.md``: every public function here mirrors a
public entry point of ``msa_cuda`` and defines what the CUDA kernels must compute. It depends on
nothing but PyTorch, so ``import msa_cuda.reference`` works without the compiled extension.

Conventions (spec sections 2-7)
-------------------------------
* Padded layout: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``q_idx [B, Sq, Hkv, Di]``,
  ``k_idx [B, Sk, Di]`` (or ``[B, Sk, 1, Di]``), ``block_indices [B, Sq, Hkv, topk]`` int32,
  ``lse [B, Hq, Sq]``.
* Varlen layout (``cu_seqlens_q`` / ``cu_seqlens_k`` given, int32 ``[B + 1]``): the batch
  dimension is dropped (``q [Tq, Hq, D]``, ``lse [Hq, Tq]``, ...).
* Query ``i`` of a sequence with ``Sq`` queries and ``Sk`` keys sits at position
  ``p(i) = Sk - Sq + i`` (bottom-right alignment); its local block is ``p(i) // block_size``.
* Query head ``h`` belongs to KV group ``h // G`` with ``G = Hq // Hkv``.
* Arithmetic is float32 (float64 when an input is float64, so that ``gradcheck`` works).
* Inputs are assumed valid (``Sq <= Sk``, ids in range, ...): validation lives in the public API.

Memory: every function works on chunks of queries sized from a byte budget, so a 32K x 32K
problem never materialises an ``Sq x Sk`` tensor. When gradients are needed each chunk runs under
``torch.utils.checkpoint``, so the autograd graph keeps only the chunk's inputs and the backward
pass recomputes one chunk at a time.
"""

import math
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SparseAttnAux",
    "query_positions",
    "num_blocks",
    "forced_mask",
    "select_blocks",
    "block_scores",
    "check_selection",
    "block_sparse_attn",
    "indexer_kl_loss",
    "sparse_attn",
    "sparse_attn_with_kvcache",
    "append_to_kvcache",
    "kvcache_sequence",
]

# Byte budget of one chunk's [chunk, Hkv, Sk] token-score tensor (selection and checking).
_SCORE_CHUNK_BYTES = 256 << 20
# Byte budget of one chunk's gathered keys/values and [chunk, Hq, keys] logits (attention, KL).
_GATHER_CHUNK_BYTES = 1 << 30

_Bounds = List[Tuple[int, int, int, int]]


class SparseAttnAux(NamedTuple):
    """Auxiliary outputs of :func:`sparse_attn`.

    Attributes
    ----------
    block_indices : torch.Tensor
        int32 ``[B, Sq, Hkv, topk]`` (varlen ``[Tq, Hkv, topk]``): the selection used.
    lse : torch.Tensor
        float32 ``[B, Hq, Sq]`` (varlen ``[Hq, Tq]``): natural-log logsumexp of the main branch.
    """

    block_indices: torch.Tensor
    lse: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Small public helpers
# ----------------------------------------------------------------------------------------------


def query_positions(sq: int, sk: int, device=None) -> torch.Tensor:
    """Absolute positions of a sequence's queries (bottom-right alignment).

    Parameters
    ----------
    sq, sk : int
        Number of queries and keys of the sequence (``sq <= sk``).
    device : torch.device, optional

    Returns
    -------
    torch.Tensor
        int64 ``[sq]`` with ``p(i) = sk - sq + i``.
    """
    return torch.arange(sq, device=device, dtype=torch.int64) + (sk - sq)


def num_blocks(sk: int, block_size: int) -> int:
    """Number of key blocks covering ``sk`` keys (the last block may be partial)."""
    return (sk + block_size - 1) // block_size


def forced_mask(local_block: torch.Tensor, nblk: int, *, init_blocks: int = 0,
                local_blocks: int = 1) -> torch.Tensor:
    """Which blocks are forced into the selection.

    Forced blocks of a query whose local block is ``loc`` are
    ``[0, min(init_blocks, loc + 1))`` and ``[max(0, loc - L + 1), loc]`` with
    ``L = max(1, local_blocks)`` (the local block itself is always forced).

    Parameters
    ----------
    local_block : torch.Tensor
        Integer ``[...]``: each query's local block ``p(i) // block_size``.
    nblk : int
        Number of blocks of the sequence.
    init_blocks, local_blocks : int

    Returns
    -------
    torch.Tensor
        bool ``[..., nblk]``.
    """
    b = torch.arange(nblk, device=local_block.device)
    loc = local_block[..., None]
    recent = max(1, local_blocks)
    return (b <= loc) & ((b < init_blocks) | (b > loc - recent))


# ----------------------------------------------------------------------------------------------
# Layout plumbing: padded batches are flattened to the varlen form, processed per sequence.
# ----------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _bounds(q_like: torch.Tensor, k_like: torch.Tensor, cu_seqlens_q, cu_seqlens_k) -> _Bounds:
    """Per-sequence ``(q_start, q_end, k_start, k_end)`` rows in the flattened token dims."""
    if cu_seqlens_q is None:
        batch, sq, sk = q_like.shape[0], q_like.shape[1], k_like.shape[1]
        return [(b * sq, (b + 1) * sq, b * sk, (b + 1) * sk) for b in range(batch)]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _flat(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    """Merge the batch and sequence dims of a padded tensor (varlen tensors pass through)."""
    return x if varlen else x.reshape(-1, *x.shape[2:])


def _index_keys(k_idx: torch.Tensor, varlen: bool) -> torch.Tensor:
    """Drop the optional size-1 head dim of ``k_idx`` (``[.., 1, Di]`` -> ``[.., Di]``)."""
    return k_idx.squeeze(-2) if k_idx.dim() == (3 if varlen else 4) else k_idx


def _flat_lse(lse: torch.Tensor, varlen: bool) -> torch.Tensor:
    """``[B, Hq, Sq]`` -> ``[Hq, B * Sq]`` (varlen ``[Hq, Tq]`` passes through)."""
    return lse if varlen else lse.permute(1, 0, 2).reshape(lse.shape[1], -1)


def _chunks(n: int, rows: int) -> Iterator[Tuple[int, int]]:
    """``[start, end)`` ranges of at most ``rows`` covering ``range(n)``."""
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _rows(bytes_per_row: int, budget: int) -> int:
    """Rows per chunk so that a chunk stays within ``budget`` bytes."""
    return max(1, budget // max(1, bytes_per_row))


def _cat(parts: Sequence[torch.Tensor], dim: int, empty: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` that returns ``empty`` when there is nothing to concatenate."""
    return torch.cat(list(parts), dim) if parts else empty


def _run(fn: Callable, *args):
    """Call ``fn(*args)``, checkpointed when autograd will need its graph."""
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if needs_grad:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


# ----------------------------------------------------------------------------------------------
# Shared numerical kernels (one chunk of queries of one sequence)
# ----------------------------------------------------------------------------------------------


def _chunk_block_scores(qi: torch.Tensor, ki: torch.Tensor, pos: torch.Tensor,
                        block_size: int, scale: float) -> torch.Tensor:
    """Block scores ``S(i, b)`` of a chunk of queries.

    Parameters
    ----------
    qi : ``[C, H, Di]`` index queries (compute dtype).
    ki : ``[Sk, Di]`` index keys of the sequence (compute dtype).
    pos : int64 ``[C]`` query positions.

    Returns
    -------
    ``[C, H, nblk]``: max over keys ``j <= p(i)`` of the block of ``scale * qi . ki[j]``;
    ``-inf`` for blocks without a visible key.
    """
    sk = ki.shape[0]
    nblk = num_blocks(sk, block_size)
    s = torch.einsum("chd,kd->chk", qi, ki) * scale
    hidden = torch.arange(sk, device=ki.device) > pos[:, None]
    s = s.masked_fill(hidden[:, None, :], -math.inf)
    s = F.pad(s, (0, nblk * block_size - sk), value=-math.inf)
    return s.view(s.shape[0], s.shape[1], nblk, block_size).amax(-1)


def _select_from_scores(scores: torch.Tensor, loc: torch.Tensor, topk: int, init_blocks: int,
                        local_blocks: int) -> torch.Tensor:
    """Top-k selection of one chunk from its block scores.

    Parameters
    ----------
    scores : ``[C, H, nblk]`` block scores.
    loc : int64 ``[C]`` local block of each query.

    Returns
    -------
    int32 ``[C, H, topk]``: ascending ids as a prefix of ``min(topk, loc + 1)`` slots, then -1.
    """
    nblk = scores.shape[-1]
    visible = torch.arange(nblk, device=scores.device) <= loc[:, None]
    forced = forced_mask(loc, nblk, init_blocks=init_blocks, local_blocks=local_blocks)
    # Forced blocks rank first, hidden blocks last; the stable sort puts lower ids first on ties.
    rank = scores.masked_fill(forced[:, None], math.inf).masked_fill(~visible[:, None], -math.inf)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :topk]
    count = (loc + 1).clamp(max=topk)
    keep = torch.arange(order.shape[-1], device=order.device) < count[:, None, None]
    chosen = torch.where(keep, order, nblk).sort(dim=-1).values
    chosen = torch.where(chosen == nblk, -1, chosen)
    return F.pad(chosen, (0, topk - chosen.shape[-1]), value=-1).to(torch.int32)


def _support(sel: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Which keys of the selected blocks a query may see.

    Parameters
    ----------
    sel : integer ``[C, H, topk]`` block ids (-1 = empty slot, any order).
    pos : int64 ``[C]`` query positions.

    Returns
    -------
    bool ``[C, H, topk * block_size]``: key ``sel[c, h, t] * block_size + o`` is valid when the
    slot is used (id >= 0) and the key's position is ``<= p(i)`` (hence also ``< Sk``). The key
    order matches :func:`_gather_blocks`.
    """
    sel = sel.long()
    key = sel[..., None] * block_size + torch.arange(block_size, device=sel.device)
    return ((sel >= 0)[..., None] & (key <= pos[:, None, None, None])).flatten(-2)


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Regroup a sequence's keys by head and block for :func:`_gather_blocks`.

    ``x [Sk, H, D]`` -> ``[H * nblk, block_size, D]`` (zero-padded to whole blocks); row
    ``h * nblk + b`` holds block ``b`` of head ``h``.
    """
    sk, h, d = x.shape
    nblk = num_blocks(sk, block_size)
    x = F.pad(x, (0, 0, 0, 0, 0, nblk * block_size - sk))
    return x.view(nblk, block_size, h, d).permute(2, 0, 1, 3).reshape(h * nblk, block_size, d)


def _gather_blocks(xb: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Keys of the selected blocks, whole blocks at a time.

    Parameters
    ----------
    xb : ``[H * nblk, block_size, D]`` from :func:`_blocked`.
    sel : integer ``[C, H, topk]``; ids outside ``[0, nblk)`` (such as -1) fetch an arbitrary
        block, which :func:`_support` marks invalid.

    Returns
    -------
    ``[C, H, topk * block_size, D]``.
    """
    c, h, topk = sel.shape
    nblk = xb.shape[0] // h
    rows = sel.long().clamp(0, nblk - 1) + torch.arange(h, device=sel.device)[:, None] * nblk
    return xb.index_select(0, rows.flatten()).view(c, h, topk * xb.shape[1], xb.shape[2])


def _dense_support(pos: torch.Tensor, sk: int) -> torch.Tensor:
    """bool ``[C, 1, Sk]``: the whole causal history ``j <= p(i)`` (dense KL warm-up)."""
    return (torch.arange(sk, device=pos.device) <= pos[:, None])[:, None, :]


def _support_dot(qg: torch.Tensor, keys: torch.Tensor, sel: Optional[torch.Tensor]
                 ) -> torch.Tensor:
    """Dot products of grouped queries with their support keys.

    Parameters
    ----------
    qg : ``[C, H, G, D]`` queries, grouped by KV head.
    keys : ``[H * nblk, block_size, D]`` from :func:`_blocked`, or ``[Sk, H, D]`` when ``sel``
        is None.
    sel : integer ``[C, H, topk]`` selected blocks, or None for all ``Sk`` keys (dense).

    Returns
    -------
    ``[C, H, G, N]`` with ``N = topk * block_size`` (``Sk`` when dense).
    """
    if sel is None:
        return torch.einsum("chgd,khd->chgk", qg, keys)
    return torch.einsum("chgd,chnd->chgn", qg, _gather_blocks(keys, sel))


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to ``valid``, safe for rows with no valid entry.

    Returns
    -------
    prob : like ``logits``; 0 on invalid entries and on empty rows.
    log_norm : ``logits.shape[:-1] + (1,)``; the logsumexp of valid entries, 0 for empty rows.
    nonempty : bool, like ``log_norm``.

    Gradients are finite everywhere (empty rows get zero gradient).
    """
    x = logits.masked_fill(~valid, -math.inf)
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    denom = torch.where(nonempty, denom, torch.ones_like(denom))
    return e / denom, m + denom.log(), nonempty


def _attn_chunk(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, sel: torch.Tensor,
                pos: torch.Tensor, block_size: int, scale: float
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of a chunk of queries of one sequence.

    Parameters
    ----------
    q : ``[C, Hq, D]``; kb, vb : ``[Hkv * nblk, block_size, D]`` (:func:`_blocked`; compute
        dtype).
    sel : integer ``[C, Hkv, topk]``; pos : int64 ``[C]``.

    Returns
    -------
    out : ``[C, Hq, D]``; lse : ``[C, Hq]`` (``-inf`` for rows with no visible key).
    """
    c, hq, d = q.shape
    hkv = sel.shape[1]
    valid = _support(sel, pos, block_size)
    logits = _support_dot(q.view(c, hkv, hq // hkv, d), kb, sel) * scale
    prob, log_norm, nonempty = _masked_softmax(logits, valid[:, :, None, :])
    out = torch.einsum("chgn,chnd->chgd", prob, _gather_blocks(vb, sel))
    lse = torch.where(nonempty, log_norm, -math.inf)
    return out.reshape(c, hq, d), lse.reshape(c, hq)


def _kl_teacher(q: torch.Tensor, keys: torch.Tensor, sel: Optional[torch.Tensor],
                valid: torch.Tensor, lse: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Teacher distribution ``P`` of a chunk (no gradient).

    Parameters
    ----------
    q : ``[C, Hq, D]`` (compute dtype).
    keys, sel : as for :func:`_support_dot` (``sel`` None = dense).
    valid : the support mask, ``[C, Hkv, N]`` (:func:`_support`) or ``[C, 1, Sk]`` when dense.
    lse : ``[C, Hq]`` main-branch logsumexp to use instead of renormalising, or None.

    Returns
    -------
    ``[C, Hkv, N]``: mean over the G heads of each group of the per-head softmax over the support.
    """
    c, hq, d = q.shape
    hkv = keys.shape[1] if sel is None else sel.shape[1]
    with torch.no_grad():
        logits = _support_dot(q.view(c, hkv, hq // hkv, d), keys, sel) * scale
        mask = valid[:, :, None, :]
        if lse is None:
            prob = _masked_softmax(logits, mask)[0]
        else:
            lse = lse.reshape(c, hkv, hq // hkv, 1)
            prob = torch.where(mask & torch.isfinite(lse), torch.exp(logits - lse), 0.0)
        return prob.mean(2)


def _kl_student(qi: torch.Tensor, ki: torch.Tensor, sel: Optional[torch.Tensor],
                valid: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum over a chunk's (query, group) pairs of ``KL(P || Q)``; differentiable in qi, ki.

    Parameters
    ----------
    qi : ``[C, Hkv, Di]``.
    ki, sel : index keys repeated over the groups, as for :func:`_support_dot`.
    valid : the support mask; teacher : ``[C, Hkv, N]`` (``P``).

    Returns
    -------
    0-dim tensor: ``sum P * (log P - log Q)`` with ``0 * log 0 = 0``.
    """
    s = _support_dot(qi[:, :, None, :], ki, sel)[:, :, 0] * scale
    log_norm = _masked_softmax(s, valid)[1]
    log_q = torch.where(valid, s - log_norm, 0.0)
    return (torch.xlogy(teacher, teacher) - teacher * log_q).sum()


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _index_inputs(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, index_scale):
    """Flattened compute-dtype index tensors, sequence bounds and the index scale."""
    varlen = cu_seqlens_q is not None
    k_idx = _index_keys(k_idx, varlen)
    bounds = _bounds(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k)
    dtype = _compute_dtype(q_idx, k_idx)
    qi = _flat(q_idx, varlen).to(dtype)
    ki = _flat(k_idx, varlen).to(dtype)
    scale = 1.0 / math.sqrt(q_idx.shape[-1]) if index_scale is None else float(index_scale)
    return qi, ki, bounds, scale, varlen


def _score_chunks(qi, ki, bounds, block_size, scale):
    """Yield ``(seq, q_start, c0, c1, pos, scores)`` for every query chunk of every sequence.

    ``scores [c1 - c0, H, nblk]`` are the block scores of queries ``q_start + c0 .. q_start + c1``
    of sequence ``seq``; ``pos`` their positions.
    """
    for seq, (qs, qe, ks, ke) in enumerate(bounds):
        sk = ke - ks
        rows = _rows(qi.shape[1] * num_blocks(sk, block_size) * block_size * qi.element_size(),
                     _SCORE_CHUNK_BYTES)
        pos = query_positions(qe - qs, sk, qi.device)
        for c0, c1 in _chunks(qe - qs, rows):
            scores = _chunk_block_scores(qi[qs + c0:qs + c1], ki[ks:ke], pos[c0:c1], block_size,
                                         scale)
            yield seq, qs, c0, c1, pos[c0:c1], scores


@torch.no_grad()
def block_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int = 128,
                 index_scale: Optional[float] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                 cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block scores ``S(i, b)`` of spec section 4.

    Parameters
    ----------
    q_idx : ``[B, Sq, Hkv, Di]`` (varlen ``[Tq, Hkv, Di]``).
    k_idx : ``[B, Sk, Di]`` or ``[B, Sk, 1, Di]`` (varlen ``[Tk, Di]`` or ``[Tk, 1, Di]``).
    block_size : int
    index_scale : float, optional
        Defaults to ``1 / sqrt(Di)``.
    cu_seqlens_q, cu_seqlens_k : int32 ``[B + 1]``, optional (varlen).

    Returns
    -------
    torch.Tensor
        float32 (float64 for float64 inputs) ``[B, Sq, Hkv, nblk]`` (varlen
        ``[Tq, Hkv, nblk_max]``): max over keys ``j <= p(i)`` of block ``b`` of the scaled index
        score; ``-inf`` for blocks without a visible key and for blocks past a varlen sequence's
        block count.
    """
    qi, ki, bounds, scale, varlen = _index_inputs(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k,
                                                  index_scale)
    nblk = max((num_blocks(ke - ks, block_size) for _, _, ks, ke in bounds), default=0)
    out = qi.new_full((qi.shape[0], qi.shape[1], nblk), -math.inf)
    for _, qs, c0, c1, _, scores in _score_chunks(qi, ki, bounds, block_size, scale):
        out[qs + c0:qs + c1, :, :scores.shape[-1]] = scores
    return out if varlen else out.view(*q_idx.shape[:3], nblk)


@torch.no_grad()
def select_blocks(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int = 128,
                  topk: int = 16, index_scale: Optional[float] = None, init_blocks: int = 0,
                  local_blocks: int = 1, cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                  max_seqlen_k: Optional[int] = None) -> torch.Tensor:
    """Select the key blocks of every (query, group) (spec section 4).

    Forced blocks (see :func:`forced_mask`) are always selected; the remaining
    ``min(topk, loc + 1) - |forced|`` slots go to the visible non-forced blocks with the highest
    block score, ties broken toward the lower block id.

    Parameters
    ----------
    q_idx : ``[B, Sq, Hkv, Di]`` (varlen ``[Tq, Hkv, Di]``).
    k_idx : ``[B, Sk, Di]`` or ``[B, Sk, 1, Di]`` (varlen ``[Tk, Di]`` or ``[Tk, 1, Di]``).
    block_size, topk, init_blocks, local_blocks : int
        ``init_blocks + max(1, local_blocks) <= topk`` is assumed.
    index_scale : float, optional
        Defaults to ``1 / sqrt(Di)``.
    cu_seqlens_q, cu_seqlens_k : int32 ``[B + 1]``, optional (varlen).
    max_seqlen_q, max_seqlen_k : int, optional
        Accepted for API parity; unused.

    Returns
    -------
    torch.Tensor
        int32 ``[B, Sq, Hkv, topk]`` (varlen ``[Tq, Hkv, topk]``): ascending block ids as a
        prefix, the remaining slots -1.
    """
    qi, ki, bounds, scale, varlen = _index_inputs(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k,
                                                  index_scale)
    out = torch.full((qi.shape[0], qi.shape[1], topk), -1, dtype=torch.int32, device=qi.device)
    for _, qs, c0, c1, pos, scores in _score_chunks(qi, ki, bounds, block_size, scale):
        out[qs + c0:qs + c1] = _select_from_scores(scores, pos // block_size, topk, init_blocks,
                                                   local_blocks)
    return out if varlen else out.view(*q_idx.shape[:3], topk)


_MAX_MESSAGES = 20


@torch.no_grad()
def check_selection(block_indices: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, *,
                    block_size: int = 128, topk: int = 16, index_scale: Optional[float] = None,
                    init_blocks: int = 0, local_blocks: int = 1,
                    cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None,
                    rel_tol: float = 1e-3) -> List[str]:
    """Check a selection against the correctness rule of spec section 4.

    Per (query, group) row the rule is: ids unique, ascending, a prefix of the slots (then -1),
    within ``[0, local]``; every forced block present; ``min(topk, local + 1)`` ids; and every
    selected non-forced block scores at least the best non-selected visible non-forced block
    minus ``rel_tol * range``, where ``range`` is max - min of that row's finite block scores.

    Parameters
    ----------
    block_indices : integer ``[B, Sq, Hkv, topk]`` (varlen ``[Tq, Hkv, topk]``).
    q_idx, k_idx, block_size, topk, index_scale, init_blocks, local_blocks, cu_seqlens_q,
    cu_seqlens_k :
        As for :func:`select_blocks`.
    rel_tol : float

    Returns
    -------
    list of str
        Human-readable violations, at most about 20 (a final line counts those not shown);
        empty when the selection is correct.
    """
    qi, ki, bounds, scale, varlen = _index_inputs(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k,
                                                  index_scale)
    expected = (qi.shape[0], qi.shape[1], topk)
    sel_all = _flat(block_indices, varlen)
    if tuple(sel_all.shape) != expected:
        return [f"block_indices has shape {tuple(block_indices.shape)}; expected "
                f"{expected if varlen else (*q_idx.shape[:3], topk)}"]
    sel_all = sel_all.long()
    messages: List[str] = []
    totals: dict = {}
    for seq, qs, c0, c1, pos, scores in _score_chunks(qi, ki, bounds, block_size, scale):
        found = _row_violations(sel_all[qs + c0:qs + c1], scores, pos // block_size, topk,
                                init_blocks, local_blocks, rel_tol)
        for kind, (bad, describe) in found.items():
            rows = bad.nonzero()
            totals[kind] = totals.get(kind, 0) + rows.shape[0]
            for r, g in rows[:max(0, _MAX_MESSAGES - len(messages))].tolist():
                where = (f"{'sequence' if varlen else 'batch'} {seq} query {c0 + r} "
                         f"(position {int(pos[r])}) group {g}")
                messages.append(f"{where}: {kind}: {describe(r, g)}")
    shown = len(messages)
    if sum(totals.values()) > shown:
        counts = ", ".join(f"{kind}: {n}" for kind, n in totals.items() if n)
        messages.append(f"... {sum(totals.values()) - shown} more violations (totals: {counts})")
    return messages


def _row_violations(sel, scores, loc, topk, init_blocks, local_blocks, rel_tol):
    """Violations of a chunk's rows.

    Parameters
    ----------
    sel : int64 ``[C, H, topk]``; scores : ``[C, H, nblk]``; loc : int64 ``[C]``.

    Returns
    -------
    dict mapping a violation kind to ``(bad, describe)``: ``bad`` is bool ``[C, H]`` and
    ``describe(row, group)`` formats one offending row.
    """
    nblk = scores.shape[-1]
    used = sel != -1
    blocks = torch.arange(nblk, device=sel.device)
    visible = (blocks <= loc[:, None])[:, None, :]
    forced = forced_mask(loc, nblk, init_blocks=init_blocks, local_blocks=local_blocks)[:, None]
    in_range = used & (sel >= 0) & (sel <= loc[:, None, None])
    # Membership of each block in the row's selection (out-of-range ids land in a spare column).
    member = torch.zeros(*sel.shape[:2], nblk + 1, dtype=torch.bool, device=sel.device)
    member.scatter_(-1, torch.where(in_range, sel, nblk), True)
    member = member[..., :nblk]
    unused = torch.iinfo(torch.int64).max
    ordered = torch.where(used, sel, unused).sort(-1).values
    duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != unused)).any(-1)
    pairs = used[..., 1:] & used[..., :-1]
    count = used.sum(-1)
    want = (loc + 1).clamp(max=topk)[:, None]
    free = visible & ~forced
    best_unselected = torch.where(free & ~member, scores, -math.inf).amax(-1)
    worst_selected = torch.where(free & member, scores, math.inf).amin(-1)
    finite = visible & torch.isfinite(scores)
    spread = (torch.where(finite, scores, -math.inf).amax(-1)
              - torch.where(finite, scores, math.inf).amin(-1)).nan_to_num(0.0, 0.0, 0.0)
    missing = forced & ~member

    def row(r, g):
        return sel[r, g].tolist()

    def missing_blocks(r, g):
        return f"{missing[r, g].nonzero().flatten().tolist()} missing from {row(r, g)}"

    def worse(r, g):
        lo = int(torch.where(free[r, 0] & member[r, g], scores[r, g], math.inf).argmin())
        hi = int(torch.where(free[r, 0] & ~member[r, g], scores[r, g], -math.inf).argmax())
        return (f"selected block {lo} scores {float(scores[r, g, lo]):.6g} < unselected block "
                f"{hi} at {float(scores[r, g, hi]):.6g} (tolerance "
                f"{rel_tol * float(spread[r, g]):.3g}) in {row(r, g)}")

    return {
        "id outside [0, local block]": ((used & ~in_range).any(-1), row),
        "-1 before a block id": ((~used[..., :-1] & used[..., 1:]).any(-1), row),
        "duplicate ids": (duplicate, row),
        "ids not ascending": ((pairs & (sel[..., 1:] < sel[..., :-1])).any(-1), row),
        "wrong count": (count != want,
                        lambda r, g: f"{int(count[r, g])} ids, expected {int(want[r, 0])}: "
                                     f"{row(r, g)}"),
        "forced block missing": (missing.any(-1), missing_blocks),
        "worse block selected": (worst_selected < best_unselected - rel_tol * spread, worse),
    }


# ----------------------------------------------------------------------------------------------
# Main branch
# ----------------------------------------------------------------------------------------------


def block_sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      block_indices: torch.Tensor, *, block_size: int = 128,
                      softmax_scale: Optional[float] = None,
                      cu_seqlens_q: Optional[torch.Tensor] = None,
                      cu_seqlens_k: Optional[torch.Tensor] = None,
                      max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                      return_lse: bool = False):
    """Exact softmax attention over the selected blocks (spec section 5).

    Query ``i``, head ``h`` attends to the keys ``j`` of the blocks listed in
    ``block_indices[i, h // G]`` with ``j <= p(i)``. Entries -1 are ignored and the ids need not
    be sorted. Differentiable in ``q``, ``k``, ``v`` through plain autograd.

    Parameters
    ----------
    q : ``[B, Sq, Hq, D]`` (varlen ``[Tq, Hq, D]``).
    k, v : ``[B, Sk, Hkv, D]`` (varlen ``[Tk, Hkv, D]``).
    block_indices : integer ``[B, Sq, Hkv, topk]`` (varlen ``[Tq, Hkv, topk]``).
    block_size : int
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    cu_seqlens_q, cu_seqlens_k : int32 ``[B + 1]``, optional (varlen).
    max_seqlen_q, max_seqlen_k : int, optional
        Accepted for API parity; unused.
    return_lse : bool

    Returns
    -------
    out : ``q.dtype`` ``[B, Sq, Hq, D]`` (varlen ``[Tq, Hq, D]``); 0 for rows with no visible key.
    lse : float32 (float64 for float64 inputs) ``[B, Hq, Sq]`` (varlen ``[Hq, Tq]``), natural
        log; ``-inf`` for rows with no visible key. Only when ``return_lse``.
    """
    varlen = cu_seqlens_q is not None
    bounds = _bounds(q, k, cu_seqlens_q, cu_seqlens_k)
    dtype = _compute_dtype(q, k, v)
    qf, kf, vf = (_flat(x, varlen).to(dtype) for x in (q, k, v))
    sel = _flat(block_indices, varlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    hq, hkv, d = qf.shape[1], kf.shape[1], qf.shape[2]
    n = sel.shape[-1] * block_size
    rows = _rows(qf.element_size() * (2 * hkv * n * d + 4 * hq * n) + 9 * hkv * n,
                 _GATHER_CHUNK_BYTES)
    outs, lses = [], []
    for qs, qe, ks, ke in bounds:
        pos = query_positions(qe - qs, ke - ks, qf.device)
        kb, vb = _blocked(kf[ks:ke], block_size), _blocked(vf[ks:ke], block_size)
        for c0, c1 in _chunks(qe - qs, rows):
            o, l = _run(_attn_chunk, qf[qs + c0:qs + c1], kb, vb, sel[qs + c0:qs + c1],
                        pos[c0:c1], block_size, scale)
            outs.append(o)
            lses.append(l)
    out = _cat(outs, 0, qf.new_zeros(0, hq, d)).to(q.dtype)
    lse = _cat(lses, 0, qf.new_zeros(0, hq)).t()
    if not varlen:
        out = out.view(q.shape)
        lse = lse.reshape(hq, q.shape[0], q.shape[1]).permute(1, 0, 2).contiguous()
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Indexer distillation loss
# ----------------------------------------------------------------------------------------------


def indexer_kl_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                    block_indices: Optional[torch.Tensor], *, block_size: int = 128,
                    softmax_scale: Optional[float] = None, index_scale: Optional[float] = None,
                    dense: bool = False, lse: Optional[torch.Tensor] = None,
                    cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None,
                    max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None) -> torch.Tensor:
    """Indexer distillation loss (spec section 7), without the coefficient.

    Support ``T(i, g)``: the keys ``j <= p(i)`` of the blocks in ``block_indices[i, g]``
    (``dense=True``: all keys ``j <= p(i)``). Teacher ``P(i, g, j)``: mean over the G heads of
    group ``g`` of ``softmax_T(softmax_scale * q_h . k_j)``, a constant (``q`` and ``k`` get no
    gradient). Student ``Q(i, g, j) = softmax_T(index_scale * q_idx[i, g] . k_idx[j])``.
    ``loss = sum over (i, g) of KL(P || Q) / (number of (i, g) pairs)``; pairs with an empty
    support contribute 0 but are counted. Gradients reach ``q_idx`` and ``k_idx`` only, with
    ``d loss / d s(i, j) = (Q - P) / pairs``.

    Parameters
    ----------
    q : ``[B, Sq, Hq, D]``; k : ``[B, Sk, Hkv, D]`` (varlen ``[Tq, Hq, D]``, ``[Tk, Hkv, D]``).
    q_idx : ``[B, Sq, Hkv, Di]``; k_idx : ``[B, Sk, Di]`` or ``[B, Sk, 1, Di]`` (varlen without B).
    block_indices : integer ``[B, Sq, Hkv, topk]`` (varlen ``[Tq, Hkv, topk]``); ignored (may
        be None) when ``dense``.
    block_size : int
    softmax_scale, index_scale : float, optional
        Default ``1 / sqrt(D)`` and ``1 / sqrt(Di)``.
    dense : bool
        Use the whole causal history as the support (warm-up variant).
    lse : float ``[B, Hq, Sq]`` (varlen ``[Hq, Tq]``), optional
        Main-branch logsumexp; when given, the teacher's per-head probabilities are
        ``exp(softmax_scale * q_h . k_j - lse[h, i])`` on the support instead of a renormalised
        softmax (0 where ``lse`` is ``-inf``).
    cu_seqlens_q, cu_seqlens_k : int32 ``[B + 1]``, optional (varlen).
    max_seqlen_q, max_seqlen_k : int, optional
        Accepted for API parity; unused.

    Returns
    -------
    torch.Tensor
        0-dim float32 (float64 for float64 inputs) loss.
    """
    varlen = cu_seqlens_q is not None
    qi, ki, bounds, iscale, _ = _index_inputs(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k,
                                              index_scale)
    dtype = _compute_dtype(q, k, q_idx, k_idx)
    qi, ki = qi.to(dtype), ki.to(dtype)
    qf, kf = (_flat(x, varlen).detach().to(dtype) for x in (q, k))
    lse_f = None if lse is None else _flat_lse(lse, varlen).detach().to(dtype)
    sel = None if dense else _flat(block_indices, varlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    hq, hkv, d, di = qf.shape[1], kf.shape[1], qf.shape[2], qi.shape[2]
    pairs = qi.shape[0] * hkv
    total = qi.new_zeros(())
    for qs, qe, ks, ke in bounds:
        sk = ke - ks
        n = sk if dense else sel.shape[-1] * block_size
        gathered = 0 if dense else hkv * n * (d + di)
        rows = _rows(qf.element_size() * (gathered + 4 * hq * n + 4 * hkv * n) + 9 * hkv * n,
                     _GATHER_CHUNK_BYTES)
        pos = query_positions(qe - qs, sk, qf.device)
        keys, index_keys = kf[ks:ke], ki[ks:ke, None, :].expand(-1, hkv, -1)
        if not dense:
            keys, index_keys = _blocked(keys, block_size), _blocked(index_keys, block_size)
        for c0, c1 in _chunks(qe - qs, rows):
            a, b = qs + c0, qs + c1
            chunk_sel = None if dense else sel[a:b]
            if dense:
                valid = _dense_support(pos[c0:c1], sk)
            else:
                valid = _support(chunk_sel, pos[c0:c1], block_size)
            teacher = _kl_teacher(qf[a:b], keys, chunk_sel, valid,
                                  None if lse_f is None else lse_f[:, a:b].t(), scale)
            total = total + _run(_kl_student, qi[a:b], index_keys, chunk_sel, valid, teacher,
                                 iscale)
    return total / max(pairs, 1)


# ----------------------------------------------------------------------------------------------
# Full forward
# ----------------------------------------------------------------------------------------------


def sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                k_idx: torch.Tensor, *, block_size: int = 128, topk: int = 16,
                softmax_scale: Optional[float] = None, index_scale: Optional[float] = None,
                init_blocks: int = 0, local_blocks: int = 1,
                cu_seqlens_q: Optional[torch.Tensor] = None,
                cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                max_seqlen_k: Optional[int] = None, return_aux: bool = False):
    """MSA forward: :func:`select_blocks` then :func:`block_sparse_attn`.

    The selection is integer, so ``q_idx`` and ``k_idx`` get no gradient from the output;
    ``q``, ``k``, ``v`` get exact gradients through the selected set.

    Parameters
    ----------
    q, k, v, block_size, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k :
        As for :func:`block_sparse_attn`.
    q_idx, k_idx, topk, index_scale, init_blocks, local_blocks :
        As for :func:`select_blocks`.
    return_aux : bool

    Returns
    -------
    out : ``q.dtype`` ``[B, Sq, Hq, D]`` (varlen ``[Tq, Hq, D]``).
    aux : :class:`SparseAttnAux` (``block_indices``, ``lse``), only when ``return_aux``.
    """
    block_indices = select_blocks(q_idx.detach(), k_idx.detach(), block_size=block_size,
                                  topk=topk, index_scale=index_scale, init_blocks=init_blocks,
                                  local_blocks=local_blocks, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k)
    out, lse = block_sparse_attn(q, k, v, block_indices, block_size=block_size,
                                 softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                 cu_seqlens_k=cu_seqlens_k, return_lse=True)
    return (out, SparseAttnAux(block_indices, lse)) if return_aux else out


# ----------------------------------------------------------------------------------------------
# Decoding with a KV cache (MSA_SPEC s.8)
# ----------------------------------------------------------------------------------------------


def kvcache_sequence(cache: torch.Tensor, b: int, length: int,
                     block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first ``length`` tokens of request ``b`` of a cache.

    Parameters
    ----------
    cache : contiguous ``[B, S_max, ...]``, or paged ``[num_pages, page_size, ...]`` with
        ``block_table``.
    block_table : int32 ``[B, pages]``, optional
        Page ids of each request, in order.

    Returns
    -------
    ``[length, ...]`` (a view for a contiguous cache, a copy for a paged one).
    """
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    pages = block_table[b, :-(-length // page_size)].long()
    return cache.index_select(0, pages).flatten(0, 1)[:length]


def append_to_kvcache(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor,
                      block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write ``new`` ``[B, S_new, ...]`` into ``cache`` at positions ``cache_seqlens[b] + i``, in place.

    Reads no tensor data on the host (usable under CUDA-graph capture). Returns ``cache``.
    """
    batch, s_new = new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(s_new, device=new.device)
    if block_table is None:
        rows = torch.arange(batch, device=new.device)[:, None].expand(batch, s_new)
        cache[rows, pos] = new.to(cache.dtype)
    else:
        page_size = cache.shape[1]
        pages = torch.gather(block_table.long(), 1, pos // page_size)
        cache[pages, pos % page_size] = new.to(cache.dtype)
    return cache


FP8_INDEX_KEY_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_index_keys(k_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index keys ``[..., Di]`` -> (``float8_e4m3fn [..., Di]``, ``float32 [...]`` per-token scales).

    ``scale = max |k_idx| * (1 / 448)`` per token (in float32; 1 for an all-zero token), keys
    stored as ``k_idx / scale`` rounded to nearest; :func:`dequantize_index_keys` inverts it up to that
    rounding. This is the format of the fp8 index-key cache of :func:`sparse_attn_with_kvcache`
    (the decode kernels quantize appended keys the same way).
    """
    x = k_idx.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax * (1.0 / FP8_INDEX_KEY_MAX), torch.ones_like(amax))
    return (x / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequantize_index_keys(keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 index keys ``keys * scale`` from an fp8 index-key cache and its per-token scales."""
    return keys.float() * scale.float()[..., None]


def append_step_to_kvcache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_idx_cache: torch.Tensor,
                           k_idx_scale_cache: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                           k_idx: torch.Tensor, cache_seqlens: torch.Tensor,
                           block_table: Optional[torch.Tensor] = None) -> None:
    """A decoding step's append: k, v and k_idx at ``cache_seqlens`` (:func:`append_to_kvcache`);
    into an fp8 index-key cache (``k_idx_scale_cache`` given, shaped like the cache's first two
    dims) k_idx goes quantized by :func:`quantize_index_keys`, its scales beside it."""
    for cache, new in ((k_cache, k), (v_cache, v)):
        append_to_kvcache(cache, new, cache_seqlens, block_table)
    if k_idx_scale_cache is None:
        append_to_kvcache(k_idx_cache, k_idx, cache_seqlens, block_table)
        return
    keys, scales = quantize_index_keys(k_idx)
    append_to_kvcache(k_idx_cache, keys, cache_seqlens, block_table)
    append_to_kvcache(k_idx_scale_cache, scales, cache_seqlens, block_table)


def sparse_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             q_idx: torch.Tensor, k_idx_cache: torch.Tensor, *,
                             k_idx_scale_cache: Optional[torch.Tensor] = None,
                             cache_seqlens: torch.Tensor, k: Optional[torch.Tensor] = None,
                             v: Optional[torch.Tensor] = None, k_idx: Optional[torch.Tensor] = None,
                             block_table: Optional[torch.Tensor] = None, block_size: int = 128,
                             topk: int = 16, softmax_scale: Optional[float] = None,
                             index_scale: Optional[float] = None, init_blocks: int = 0,
                             local_blocks: int = 1, return_aux: bool = False):
    """MSA decoding step: append (optional), then select and attend for the new tokens.

    Request ``b`` holds ``L_b = cache_seqlens[b]`` tokens (``+ S_new`` once ``k, v, k_idx`` are
    appended in place at ``cache_seqlens[b]``); its ``S_new`` queries are the last ``S_new``
    positions of those ``L_b`` (bottom-right alignment, as in a chunked prefill), so the result is
    :func:`sparse_attn` of the request's queries against its first ``L_b`` cached tokens.

    Parameters
    ----------
    q : ``[B, S_new, Hq, D]``; q_idx : ``[B, S_new, Hkv, Di]``.
    k_cache, v_cache : ``[B, S_max, Hkv, D]``, or ``[num_pages, page_size, Hkv, D]`` with ``block_table``.
    k_idx_cache : ``[B, S_max, Di]`` / ``[num_pages, page_size, Di]`` (a size-1 head dim before Di
        is accepted); q_idx's dtype, or ``float8_e4m3fn`` with ``k_idx_scale_cache``.
    k_idx_scale_cache : float32 ``[B, S_max]`` / ``[num_pages, page_size]``, only with an fp8
        ``k_idx_cache``: the per-token scales (:func:`quantize_index_keys`). Scores use the keys
        ``k_idx_cache * scale``; appended keys are quantized.
    cache_seqlens : int32 ``[B]``.
    k, v : ``[B, S_new, Hkv, D]``; k_idx : ``[B, S_new, Di]`` (or ``[B, S_new, 1, Di]``), optional,
        all three or none.
    block_table : int32 ``[B, pages]``, optional (paged caches).
    block_size, topk, softmax_scale, index_scale, init_blocks, local_blocks : as for :func:`sparse_attn`.
    return_aux : bool

    Returns
    -------
    out : ``[B, S_new, Hq, D]``; aux (``block_indices [B, S_new, Hkv, topk]``, ``lse [B, Hq, S_new]``)
    when ``return_aux``.
    """
    squeeze = (lambda t: t.squeeze(-2) if t is not None and t.dim() == 4 else t)
    k_idx_cache, k_idx = squeeze(k_idx_cache), squeeze(k_idx)
    s_new = q.shape[1]
    appended = k is not None
    fp8 = k_idx_scale_cache is not None
    if fp8:
        k_idx_scale_cache = k_idx_scale_cache.reshape(k_idx_cache.shape[:2])
    if appended:
        append_step_to_kvcache(k_cache, v_cache, k_idx_cache, k_idx_scale_cache, k, v, k_idx, cache_seqlens,
                               block_table)
    lengths = (cache_seqlens.long() + (s_new if appended else 0)).tolist()
    if fp8:  # the scores' keys, in float32 (q_idx follows)
        k_idx_cache = dequantize_index_keys(k_idx_cache, k_idx_scale_cache)
        q_idx = q_idx.float()

    def attend(*tensors):
        return sparse_attn(*tensors, block_size=block_size, topk=topk, softmax_scale=softmax_scale,
                           index_scale=index_scale, init_blocks=init_blocks, local_blocks=local_blocks,
                           return_aux=True)

    return decode_per_request(attend, q, k_cache, v_cache, q_idx, k_idx_cache, lengths, block_table, return_aux)


def decode_per_request(attend: Callable, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       q_idx: torch.Tensor, k_idx_cache: torch.Tensor, lengths: Sequence[int],
                       block_table: Optional[torch.Tensor], return_aux: bool):
    """A decoding step as one prefill call per request on its first ``lengths[b]`` cached tokens.

    ``attend(q, k, v, q_idx, k_idx)`` is a sparse_attn with ``return_aux=True`` (this module's, or
    the public one, which runs the kernels); ``k_idx_cache`` has no head dim.
    """
    outs, sels, lses = [], [], []
    for b, length in enumerate(lengths):
        keys, values, index_keys = (kvcache_sequence(c, b, length, block_table)[None]
                                    for c in (k_cache, v_cache, k_idx_cache))
        out, aux = attend(q[b:b + 1], keys, values, q_idx[b:b + 1], index_keys)
        outs.append(out)
        sels.append(aux.block_indices)
        lses.append(aux.lse)
    out = torch.cat(outs)
    if return_aux:
        return out, SparseAttnAux(torch.cat(sels), torch.cat(lses))
    return out

