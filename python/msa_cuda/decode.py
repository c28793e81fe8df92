"""Decoding with a KV cache (MSA_SPEC s.8): :func:`sparse_attn_with_kvcache`.

Today a decoding step appends in place on the device, then runs :func:`msa_cuda.sparse_attn`
once per request on that request's cached tokens (so on an SM90 GPU the prefill kernels select
and attend), after one host read of ``cache_seqlens``. The SM90 decode kernels (a split-K decode
indexer with a fused top-k and a split-K sparse decode attention, with a fixed launch shape for
CUDA-graph capture) are issue 5's remaining work; this function fixes the API and the semantics
they are tested against.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _validation
from . import reference as _ref
from .api import sparse_attn
from .reference import SparseAttnAux

__all__ = ["sparse_attn_with_kvcache"]


def sparse_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_idx: Tensor,
    k_idx_cache: Tensor,
    *,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    k_idx: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    block_size: int = 128,
    topk: int = 16,
    softmax_scale: Optional[float] = None,
    index_scale: Optional[float] = None,
    init_blocks: int = 0,
    local_blocks: int = 1,
    return_aux: bool = False,
) -> Union[Tensor, Tuple[Tensor, SparseAttnAux]]:
    """One MSA decoding step over a KV cache: append (optional), select, attend.

    Request ``b`` holds ``L_b = cache_seqlens[b]`` tokens, or ``cache_seqlens[b] + S_new`` when
    ``k``, ``v`` and ``k_idx`` are given: they are written into the caches in place at positions
    ``cache_seqlens[b] ..`` first (as FlashAttention's ``flash_attn_with_kvcache`` does;
    ``cache_seqlens`` itself is not changed). The ``S_new`` queries are the last ``S_new`` positions
    of the ``L_b`` tokens (bottom-right alignment), so every new token follows the prefill rule: the
    indexer scores the index-key cache, keeps the local block plus the best ``topk - 1`` blocks, and
    the main branch attends over them with the causal mask inside the local block. Requests of
    different lengths share one batch; lengths shorter than one block are fine.

    Inference only: no gradients. One host read of ``cache_seqlens`` (and ``block_table``) per
    call, so a step cannot be captured in a CUDA graph yet (the decode kernels will not read it).

    Parameters
    ----------
    q : Tensor
        New queries, [B, S_new, Hq, D], 1 <= S_new <= 16 (speculative decoding); bf16 or fp16.
    k_cache, v_cache : Tensor
        Contiguous [B, S_max, Hkv, D], or paged [num_pages, page_size, Hkv, D] with ``block_table``
        (page_size a multiple of block_size); q's dtype.
    q_idx : Tensor
        Index queries of the new tokens, [B, S_new, Hkv, Di].
    k_idx_cache : Tensor
        Index-key cache, [B, S_max, Di] or paged [num_pages, page_size, Di] ([.., 1, Di] accepted);
        q_idx's dtype.
    cache_seqlens : Tensor
        int32 [B]: tokens already in each request's cache.
    k, v : Tensor, optional
        [B, S_new, Hkv, D]: the new tokens' keys and values, appended in place.
    k_idx : Tensor, optional
        [B, S_new, Di] (or [B, S_new, 1, Di]): the new tokens' index keys, appended in place.
        k, v and k_idx come together or not at all.
    block_table : Tensor, optional
        int32 [B, pages]: page ids of each request's cache, in order (paged caches).
    block_size, topk, softmax_scale, index_scale, init_blocks, local_blocks
        As for :func:`msa_cuda.sparse_attn`.
    return_aux : bool, default False
        Also return ``SparseAttnAux(block_indices [B, S_new, Hkv, topk], lse [B, Hq, S_new])``.

    Returns
    -------
    out : Tensor
        [B, S_new, Hq, D], q's dtype.
    aux : SparseAttnAux
        Only with ``return_aux=True``.

    Example
    -------
    >>> import torch, msa_cuda
    >>> k_cache, v_cache = torch.randn(2, 2, 512, 2, 64, dtype=torch.bfloat16)
    >>> k_idx_cache = torch.randn(2, 512, 64, dtype=torch.bfloat16)
    >>> lens = torch.tensor([100, 300], dtype=torch.int32)
    >>> q, k, v = torch.randn(3, 2, 1, 8, 64, dtype=torch.bfloat16)[0], *torch.randn(2, 2, 1, 2, 64, dtype=torch.bfloat16)
    >>> q_idx, k_idx = torch.randn(2, 1, 2, 64, dtype=torch.bfloat16), torch.randn(2, 1, 64, dtype=torch.bfloat16)
    >>> out = msa_cuda.sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, k_idx_cache, cache_seqlens=lens,
    ...                                        k=k, v=v, k_idx=k_idx, block_size=64, topk=4)
    >>> out.shape
    torch.Size([2, 1, 8, 64])
    """
    args = _validation.validate_sparse_attn_with_kvcache(
        q, k_cache, v_cache, q_idx, k_idx_cache, cache_seqlens=cache_seqlens, k=k, v=v, k_idx=k_idx,
        block_table=block_table, block_size=block_size, topk=topk, softmax_scale=softmax_scale,
        index_scale=index_scale, init_blocks=init_blocks, local_blocks=local_blocks, return_aux=return_aux)
    s_new = q.shape[1]
    appended = k is not None
    lengths = _validation.check_kvcache_values(cache_seqlens, block_table, s_new, appended, args.capacity,
                                               args.num_pages)
    with torch.no_grad():
        if appended:
            for cache, new in ((k_cache, k), (v_cache, v), (args.k_idx_cache, args.k_idx)):
                _ref.append_to_kvcache(cache, new, cache_seqlens, block_table)

        def attend(*tensors):
            return sparse_attn(*tensors, block_size=block_size, topk=topk, softmax_scale=args.softmax_scale,
                               index_scale=args.index_scale, init_blocks=init_blocks, local_blocks=local_blocks,
                               return_aux=True)

        return _ref.decode_per_request(attend, q, k_cache, v_cache, q_idx, args.k_idx_cache, lengths, block_table,
                                       return_aux)
