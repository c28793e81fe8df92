"""Decoding with a KV cache (MSA_SPEC s.8): :func:`sparse_attn_with_kvcache`.

On an SM90 GPU a step runs the decode kernels (``torch.ops.msa_cuda_kernels.decode_step``): an
append kernel; the decode indexer, split over the sequence (each CTA streams a slice of the
index-key cache and keeps a running top-k per (token, index head)) and a merge of the slices'
lists; the sparse attention, a few CTAs per (token, group) each walking a chunk of the selected
blocks, the last of them merging the chunks. No host synchronization and a launch shape fixed by the tensor shapes, so a step
can be captured in a CUDA graph. Elsewhere (CPU, other GPUs, fp32, non-contiguous caches) the step
runs :func:`msa_cuda.sparse_attn` once per request after a host read of ``cache_seqlens``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _kernels
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
    k_idx_scale_cache: Optional[Tensor] = None,
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

    Inference only: no gradients. On the SM90 kernel path nothing is read on the host, so a step
    can be captured in a CUDA graph and replayed; the values of ``cache_seqlens`` and
    ``block_table`` are then not checked (as in FlashAttention): the kernels clamp lengths to the
    cache capacity and page ids to the pool, so bad values give wrong results, never out-of-bounds
    accesses. The fallback path reads them on the host and raises on bad values.

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
        q_idx's dtype, or ``torch.float8_e4m3fn`` with ``k_idx_scale_cache`` (half the bytes of the
        step's dominant read; build it with :func:`msa_cuda.reference.quantize_index_keys`).
    cache_seqlens : Tensor
        int32 [B]: tokens already in each request's cache.
    k_idx_scale_cache : Tensor, optional
        float32 [B, S_max] / [num_pages, page_size] ([.., 1] accepted): the per-token scales of an
        fp8 ``k_idx_cache`` (scores use ``k_idx_cache * scale``); appended index keys are quantized
        into both (scale = max |k_idx| / 448 per token), in place.
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
        index_scale=index_scale, init_blocks=init_blocks, local_blocks=local_blocks, return_aux=return_aux,
        k_idx_scale_cache=k_idx_scale_cache)
    s_new = q.shape[1]
    appended = k is not None
    if _use_decode_kernel(q, k_cache, v_cache, q_idx, args.k_idx_cache, args.k_idx_scale_cache):
        new = [t.contiguous() for t in (k, v, args.k_idx)] if appended else [None, None, None]
        with torch.no_grad():
            out, lse, block_indices = _kernels.kernel("sparse_attn_with_kvcache")(
                q.contiguous(), k_cache, v_cache, q_idx.contiguous(), args.k_idx_cache, args.k_idx_scale_cache,
                cache_seqlens.contiguous(),
                *new, None if block_table is None else block_table.contiguous(), block_size, topk,
                args.softmax_scale, init_blocks, local_blocks)
        return (out, SparseAttnAux(block_indices, lse)) if return_aux else out
    lengths = _validation.check_kvcache_values(cache_seqlens, block_table, s_new, appended, args.capacity,
                                               args.num_pages)
    with torch.no_grad():
        if appended:
            _ref.append_step_to_kvcache(k_cache, v_cache, args.k_idx_cache, args.k_idx_scale_cache, k, v,
                                        args.k_idx, cache_seqlens, block_table)
        index_keys = args.k_idx_cache
        if args.k_idx_scale_cache is not None:  # dequantized, in q_idx's dtype (float32 on the CPU)
            index_keys = _ref.dequantize_index_keys(index_keys, args.k_idx_scale_cache).to(q_idx.dtype)

        def attend(*tensors):
            return sparse_attn(*tensors, block_size=block_size, topk=topk, softmax_scale=args.softmax_scale,
                               index_scale=args.index_scale, init_blocks=init_blocks, local_blocks=local_blocks,
                               return_aux=True)

        return _ref.decode_per_request(attend, q, k_cache, v_cache, q_idx, index_keys, lengths, block_table,
                                       return_aux)


def _use_decode_kernel(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_idx: Tensor, k_idx_cache: Tensor,
                       k_idx_scale_cache: Optional[Tensor]) -> bool:
    """Whether a step may run the SM90 decode kernels: they append in place, so the caches must be
    contiguous and 16-byte aligned; q_idx is bf16 or fp16 (the validation has checked every shape,
    dtype and the supported sizes)."""
    if not _kernels.has_kernel("sparse_attn_with_kvcache", q.device, q.dtype):
        return False
    if q_idx.dtype not in (torch.bfloat16, torch.float16):
        return False
    caches = (k_cache, v_cache, k_idx_cache) + ((k_idx_scale_cache,) if k_idx_scale_cache is not None else ())
    return all(c.is_contiguous() and c.data_ptr() % 16 == 0 for c in caches)
