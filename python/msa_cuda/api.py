"""Public functions of msa_cuda: MiniMax Sparse Attention (MSA) for Hopper GPUs.

Each function checks its arguments (:mod:`msa_cuda._validation`), resolves defaults, and calls one
or two torch.library custom ops (:mod:`msa_cuda._ops`), so it works under
``torch.compile(fullgraph=True)`` and with autograd. The ops run the CUDA kernels on SM90 GPUs
when the compiled extension provides them, and :mod:`msa_cuda.reference` otherwise (CPU tensors,
other GPUs, ops without a kernel yet, or ``MSA_CUDA_FORCE_REFERENCE=1``).

Shapes (the spec's names): B batch, Sq/Sk query/key lengths (Sq <= Sk, queries are the last Sq
positions), Tq/Tk total tokens of a varlen batch, Hq query heads, Hkv KV heads (G = Hq / Hkv in
{1, 2, 4, 8, 16}), D head dim in {64, 128}, Di index head dim in {64, 128}.

Dtypes: floating inputs are bfloat16 or float16. float32 and float64 are also accepted when every
input is on the CPU (for exact reference comparisons and ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers torch.ops.msa_cuda.*)
from . import _validation
from .reference import SparseAttnAux

__all__ = ["select_blocks", "block_sparse_attn", "indexer_kl_loss", "sparse_attn", "SparseAttnAux"]


def select_blocks(
    q_idx: Tensor,
    k_idx: Tensor,
    *,
    block_size: int = 128,
    topk: int = 16,
    index_scale: Optional[float] = None,
    init_blocks: int = 0,
    local_blocks: int = 1,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> Tensor:
    """Select the key blocks each (query token, KV group) attends to (the MSA routing branch).

    Token scores are ``index_scale * dot(q_idx[i, g], k_idx[j])`` (fp32 accumulation); a block's
    score is the max over its causally visible keys. The local block, the first ``init_blocks``
    blocks and the ``max(1, local_blocks)`` most recent blocks are always kept; the remaining slots
    go to the best-scoring visible blocks (ties toward the lower id).

    Parameters
    ----------
    q_idx : Tensor
        Index queries, [B, Sq, Hkv, Di] (varlen: [Tq, Hkv, Di]); bfloat16 or float16.
    k_idx : Tensor
        Index keys shared by all groups, [B, Sk, Di] or [B, Sk, 1, Di] (varlen: [Tk, Di] or
        [Tk, 1, Di]); same dtype as ``q_idx``.
    block_size : int, default 128
        Tokens per key block, 64 or 128.
    topk : int, default 16
        Blocks kept per (query, group), 1 to 32.
    index_scale : float, optional
        Scale of the index scores, finite and > 0. Default ``1 / sqrt(Di)``. The selection does not
        depend on it (any positive scale gives the same blocks).
    init_blocks : int, default 0
        Number of leading blocks (attention sinks) always selected, >= 0.
    local_blocks : int, default 1
        Number of most recent blocks always selected, counting the query's own block; values
        below 1 act as 1. ``init_blocks + max(1, local_blocks)`` must be <= ``topk``.
    cu_seqlens_q, cu_seqlens_k : Tensor, optional
        Varlen boundaries, int32 [B + 1], starting at 0, non-decreasing, ending at Tq / Tk. Give
        both or neither. Default None (padded batch).
    max_seqlen_q, max_seqlen_k : int, optional
        Longest query / key sequence (varlen). Default None: computed from ``cu_seqlens_*``.

    Returns
    -------
    Tensor
        int32 [B, Sq, Hkv, topk] (varlen: [Tq, Hkv, topk]): selected block ids in ascending order,
        padded with -1 when fewer than ``topk`` blocks are visible.

    Example
    -------
    >>> import torch, msa_cuda
    >>> q_idx = torch.randn(1, 300, 2, 64, dtype=torch.bfloat16)
    >>> k_idx = torch.randn(1, 300, 64, dtype=torch.bfloat16)
    >>> ids = msa_cuda.select_blocks(q_idx, k_idx, block_size=64, topk=3)
    >>> ids.shape, ids.dtype
    (torch.Size([1, 300, 2, 3]), torch.int32)
    >>> ids[0, 0, 0].tolist()  # the first query sees only block 0
    [0, -1, -1]
    """
    args = _validation.validate_select_blocks(
        q_idx, k_idx, block_size=block_size, topk=topk, index_scale=index_scale, init_blocks=init_blocks,
        local_blocks=local_blocks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return torch.ops.msa_cuda.select_blocks(
        q_idx, args.k_idx, cu_seqlens_q, cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k, block_size, topk,
        args.index_scale, init_blocks, local_blocks)


def block_sparse_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    *,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    validate: bool = True,
    deterministic: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact softmax attention over the selected key blocks (the MSA main branch).

    Query head h of group g = h // G attends to the keys of the blocks in ``block_indices[.., g, :]``
    that are causally visible (key position <= the query's position ``Sk - Sq + i``). A row with no
    visible key gives out = 0 and lse = -inf. Differentiable in ``q``, ``k`` and ``v`` (also through
    ``lse``).

    On an SM90 GPU with bf16/fp16 inputs both directions run the msa_cuda kernels: the forward picks
    a query-outer kernel for sequences of at most 32 key blocks and at most 2 x topk of them, and a
    KV-outer kernel (plan, main, combine) otherwise (``MSA_CUDA_FWD_PATH=kv_outer|query_outer``
    forces one); the backward accumulates dq, dk, dv in fp32 with atomics, so gradients can differ
    run to run in the last bits unless ``deterministic=True``. The forward is bitwise reproducible
    either way.

    Parameters
    ----------
    q : Tensor
        Queries, [B, Sq, Hq, D] (varlen: [Tq, Hq, D]); bfloat16 or float16.
    k, v : Tensor
        Keys and values, [B, Sk, Hkv, D] (varlen: [Tk, Hkv, D]); same dtype as ``q``.
    block_indices : Tensor
        int32 [B, Sq, Hkv, topk] (varlen: [Tq, Hkv, topk]), 1 <= topk <= 32. Entries are -1
        (ignored) or block ids in [0, ceil(Sk_b / block_size)), unique per row, any order.
    block_size : int, default 128
        Tokens per key block, 64 or 128.
    softmax_scale : float, optional
        Scale of q.k, finite and > 0. Default ``1 / sqrt(D)``.
    cu_seqlens_q, cu_seqlens_k : Tensor, optional
        Varlen boundaries, int32 [B + 1]. Default None (padded batch).
    max_seqlen_q, max_seqlen_k : int, optional
        Longest query / key sequence (varlen). Default None: computed from ``cu_seqlens_*``.
    return_lse : bool, default False
        Also return the natural-log logsumexp of the scaled scores.
    validate : bool, default True
        Check ``block_indices`` values (range and uniqueness; ValueError otherwise). Costs one
        device-to-host sync; pass False only for selections known to be valid.
    deterministic : bool, default False
        Bitwise identical gradients run to run: the backward sorts its work lists and accumulates
        in 64-bit fixed point (scaled from bounds on each gradient) instead of fp32. Costs twice
        the accumulator memory (8 bytes per element of k and v and of one 4096-token query chunk
        of q), 64-bit atomics and one host read of the bounds' inputs (max |x| of dout, q, k, v and
        delta, copied together: one sync).

    Returns
    -------
    out : Tensor
        Same shape and dtype as ``q``.
    lse : Tensor
        Only with ``return_lse=True``: float32 [B, Hq, Sq] (varlen: [Hq, Tq]).

    Example
    -------
    >>> import torch, msa_cuda
    >>> q = torch.randn(1, 200, 4, 64, dtype=torch.bfloat16)
    >>> k, v = torch.randn(2, 1, 200, 2, 64, dtype=torch.bfloat16)
    >>> ids = torch.tensor([0, 1, 2, -1], dtype=torch.int32).expand(1, 200, 2, 4)
    >>> out, lse = msa_cuda.block_sparse_attn(q, k, v, ids, block_size=64, return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 200, 4, 64]), torch.Size([1, 4, 200]))
    """
    args = _validation.validate_block_sparse_attn(
        q, k, v, block_indices, block_size=block_size, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse,
        validate=validate)
    _validation.check_bool("deterministic", deterministic)
    out, lse = torch.ops.msa_cuda.block_sparse_attn(
        q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k, block_size,
        args.softmax_scale, validate, deterministic)
    return (out, lse) if return_lse else out


def indexer_kl_loss(
    q: Tensor,
    k: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    block_indices: Optional[Tensor],
    *,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
    index_scale: Optional[float] = None,
    dense: bool = False,
    lse: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    validate: bool = True,
) -> Tensor:
    """Indexer distillation loss: mean over (query token, group) of KL(P || Q).

    On the support T = the causally visible keys of the selected blocks (``dense=True``: the
    whole causal history), the teacher P is the mean over the group's G heads of the main branch's
    softmax (a constant), and the student Q is the softmax of the index scores. Gradients reach
    only ``q_idx`` and ``k_idx``; ``q`` and ``k`` get none. Multiply by your loss coefficient.

    Parameters
    ----------
    q : Tensor
        Main queries, [B, Sq, Hq, D] (varlen: [Tq, Hq, D]); bfloat16 or float16.
    k : Tensor
        Main keys, [B, Sk, Hkv, D] (varlen: [Tk, Hkv, D]); same dtype as ``q``.
    q_idx : Tensor
        Index queries, [B, Sq, Hkv, Di] (varlen: [Tq, Hkv, Di]); bfloat16 or float16.
    k_idx : Tensor
        Index keys, [B, Sk, Di] or [B, Sk, 1, Di] (varlen: [Tk, Di] or [Tk, 1, Di]); same dtype
        as ``q_idx``.
    block_indices : Tensor or None
        The selection, int32 [B, Sq, Hkv, topk] (varlen: [Tq, Hkv, topk]), entries as in
        :func:`block_sparse_attn`. May be None only with ``dense=True``, where it is ignored.
    block_size : int, default 128
        Tokens per key block, 64 or 128.
    softmax_scale : float, optional
        Main-branch scale, finite and > 0. Default ``1 / sqrt(D)``.
    index_scale : float, optional
        Index-score scale, finite and > 0. Default ``1 / sqrt(Di)``.
    dense : bool, default False
        Use the dense warm-up support (all causally visible keys) instead of the selection.
    lse : Tensor, optional
        The main branch's logsumexp on the same support, float32 [B, Hq, Sq] (varlen: [Hq, Tq]),
        e.g. from ``block_sparse_attn(..., return_lse=True)``; saves recomputing it. With
        ``dense=True`` it is the dense causal attention's lse (natural log); without it the op
        computes it (one PyTorch flash-attention forward when Sq = Sk in a padded batch, else a slow
        float32 pass). Default None.
    cu_seqlens_q, cu_seqlens_k : Tensor, optional
        Varlen boundaries, int32 [B + 1]. Default None (padded batch).
    max_seqlen_q, max_seqlen_k : int, optional
        Longest query / key sequence (varlen). Default None: computed from ``cu_seqlens_*``.
    validate : bool, default True
        Check ``block_indices`` values (range and uniqueness; ValueError otherwise). Costs one
        pass over the ids on the GPU and a device-to-host sync (about 0.1 ms of check plus the
        sync's stall at 32K, M3 shape); pass False in a training step whose selection comes from
        :func:`select_blocks` or ``sparse_attn``'s ``aux.block_indices``.

    Returns
    -------
    Tensor
        float32 scalar.

    Example
    -------
    >>> import torch, msa_cuda
    >>> q = torch.randn(1, 200, 4, 64, dtype=torch.bfloat16)
    >>> k = torch.randn(1, 200, 2, 64, dtype=torch.bfloat16)
    >>> q_idx = torch.randn(1, 200, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    >>> k_idx = torch.randn(1, 200, 64, dtype=torch.bfloat16, requires_grad=True)
    >>> ids = msa_cuda.select_blocks(q_idx.detach(), k_idx.detach(), block_size=64, topk=2)
    >>> loss = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, ids, block_size=64)
    >>> loss.backward()  # fills q_idx.grad and k_idx.grad
    """
    args = _validation.validate_indexer_kl_loss(
        q, k, q_idx, k_idx, block_indices, block_size=block_size, softmax_scale=softmax_scale,
        index_scale=index_scale, dense=dense, lse=lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, validate=validate)
    # The gradients are computed together with the loss when they will be needed.
    need_grad = torch.is_grad_enabled() and (q_idx.requires_grad or k_idx.requires_grad)
    loss, _, _ = torch.ops.msa_cuda.indexer_kl_loss(
        q, k, q_idx, args.k_idx, args.block_indices, lse, cu_seqlens_q, cu_seqlens_k, args.max_seqlen_q,
        args.max_seqlen_k, block_size, args.softmax_scale, args.index_scale, dense, need_grad, validate)
    return loss


def sparse_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    *,
    block_size: int = 128,
    topk: int = 16,
    softmax_scale: Optional[float] = None,
    index_scale: Optional[float] = None,
    init_blocks: int = 0,
    local_blocks: int = 1,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_aux: bool = False,
    deterministic: bool = False,
) -> Union[Tensor, Tuple[Tensor, SparseAttnAux]]:
    """MiniMax Sparse Attention: :func:`select_blocks` then :func:`block_sparse_attn`.

    Differentiable in ``q``, ``k`` and ``v`` (not through the selection; ``q_idx`` and ``k_idx``
    get no gradient here: train them with :func:`indexer_kl_loss`, e.g. on ``aux.block_indices``
    and ``aux.lse``).

    Parameters
    ----------
    q : Tensor
        Queries, [B, Sq, Hq, D] (varlen: [Tq, Hq, D]); bfloat16 or float16.
    k, v : Tensor
        Keys and values, [B, Sk, Hkv, D] (varlen: [Tk, Hkv, D]); same dtype as ``q``.
    q_idx : Tensor
        Index queries, [B, Sq, Hkv, Di] (varlen: [Tq, Hkv, Di]); bfloat16 or float16.
    k_idx : Tensor
        Index keys, [B, Sk, Di] or [B, Sk, 1, Di] (varlen: [Tk, Di] or [Tk, 1, Di]); same dtype
        as ``q_idx``.
    block_size : int, default 128
        Tokens per key block, 64 or 128.
    topk : int, default 16
        Blocks kept per (query, group), 1 to 32.
    softmax_scale : float, optional
        Main-branch scale, finite and > 0. Default ``1 / sqrt(D)``.
    index_scale : float, optional
        Index-score scale, finite and > 0. Default ``1 / sqrt(Di)``.
    init_blocks : int, default 0
        Leading blocks always selected, >= 0.
    local_blocks : int, default 1
        Most recent blocks always selected (values below 1 act as 1);
        ``init_blocks + max(1, local_blocks) <= topk``.
    cu_seqlens_q, cu_seqlens_k : Tensor, optional
        Varlen boundaries, int32 [B + 1]. Default None (padded batch).
    max_seqlen_q, max_seqlen_k : int, optional
        Longest query / key sequence (varlen). Default None: computed from ``cu_seqlens_*``.
    return_aux : bool, default False
        Also return a :class:`SparseAttnAux` with ``block_indices`` (int32, as from
        :func:`select_blocks`) and ``lse`` (float32 [B, Hq, Sq] / [Hq, Tq]).
    deterministic : bool, default False
        Bitwise reproducible gradients, as in :func:`block_sparse_attn`.

    Returns
    -------
    out : Tensor
        Same shape and dtype as ``q``.
    aux : SparseAttnAux
        Only with ``return_aux=True``.

    Example
    -------
    >>> import torch, msa_cuda
    >>> q = torch.randn(1, 300, 4, 64, dtype=torch.bfloat16)
    >>> k, v = torch.randn(2, 1, 300, 2, 64, dtype=torch.bfloat16)
    >>> q_idx = torch.randn(1, 300, 2, 64, dtype=torch.bfloat16)
    >>> k_idx = torch.randn(1, 300, 64, dtype=torch.bfloat16)
    >>> out, aux = msa_cuda.sparse_attn(q, k, v, q_idx, k_idx, block_size=64, topk=2, return_aux=True)
    >>> out.shape, aux.block_indices.shape
    (torch.Size([1, 300, 4, 64]), torch.Size([1, 300, 2, 2]))
    """
    args = _validation.validate_sparse_attn(
        q, k, v, q_idx, k_idx, block_size=block_size, topk=topk, softmax_scale=softmax_scale,
        index_scale=index_scale, init_blocks=init_blocks, local_blocks=local_blocks, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_aux=return_aux)
    _validation.check_bool("deterministic", deterministic)
    block_indices = torch.ops.msa_cuda.select_blocks(
        q_idx.detach(), args.k_idx.detach(), cu_seqlens_q, cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k,
        block_size, topk, args.index_scale, init_blocks, local_blocks)
    # The selection comes from select_blocks, so its values need no validation.
    out, lse = torch.ops.msa_cuda.block_sparse_attn(
        q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k, block_size,
        args.softmax_scale, False, deterministic)
    if return_aux:
        return out, SparseAttnAux(block_indices=block_indices, lse=lse)
    return out
