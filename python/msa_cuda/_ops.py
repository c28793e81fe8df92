"""torch.library custom ops behind the public msa_cuda functions.

Ops (namespace ``msa_cuda``); every tensor argument has already passed the metadata checks of
:mod:`msa_cuda._validation`, scales are resolved, and ``k_idx`` has no head dim ([B, Sk, Di] or
[Tk, Di]). Integer ``max_seqlen_*`` of -1 means "not given" (varlen only); the op computes it.

- ``select_blocks(q_idx, k_idx, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q, max_seqlen_k,
  block_size, topk, index_scale, init_blocks, local_blocks) -> block_indices`` (int32, no autograd)
- ``block_sparse_attn(q, k, v, block_indices, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q,
  max_seqlen_k, block_size, softmax_scale, validate, deterministic) -> (out, lse)``; autograd to
  q, k, v (deterministic: bitwise reproducible backward)
- ``block_sparse_attn_backward(grad_out, grad_lse?, q, k, v, block_indices, out, lse, cu_seqlens_q?,
  cu_seqlens_k?, max_seqlen_q, max_seqlen_k, block_size, softmax_scale, deterministic=False)
  -> (dq, dk, dv)``
- ``indexer_kl_loss(q, k, q_idx, k_idx, block_indices?, lse?, cu_seqlens_q?, cu_seqlens_k?,
  max_seqlen_q, max_seqlen_k, block_size, softmax_scale, index_scale, dense, need_grad)
  -> (loss, dloss/dq_idx, dloss/dk_idx)`` (0-dim float32 loss; with need_grad the gradients, computed
  with the loss, in float32, else empty); autograd to q_idx, k_idx only (it scales the gradients)
- ``indexer_kl_loss_backward(grad_loss, q, k, q_idx, k_idx, block_indices?, lse?, cu_seqlens_q?,
  cu_seqlens_k?, max_seqlen_q, max_seqlen_k, block_size, softmax_scale, index_scale, dense)
  -> (dq_idx, dk_idx)``

lse and the loss are float32, or float64 when an input is float64 (CPU gradcheck use only).

Dispatch inside every op body: data-dependent validation first (cu_seqlens values, block_indices
range/uniqueness), then the compiled kernel when :func:`msa_cuda._kernels.has_kernel` allows it,
else :mod:`msa_cuda.reference` on the inputs' device. Today ``select_blocks`` and the
``block_sparse_attn`` forward and backward and ``indexer_kl_loss`` on the selected support have
kernels (adapters ``_select_blocks_kernel``, ``_block_sparse_attn_kernel``, the branch in
``block_sparse_attn_backward``, ``_indexer_kl_kernel``); an op gains one
by listing it in ``_kernels._KERNEL_OPS`` and branching to its adapter. Backward ops without a
kernel recompute the forward with the reference and differentiate it.

Data-dependent checks need host reads (one sync per call with cu_seqlens or validate=True). They
are skipped while a CUDA graph is being captured (device memory cannot be read then).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _kernels, _validation
from . import reference as _ref

__all__ = [
    "select_blocks",
    "block_sparse_attn",
    "block_sparse_attn_backward",
    "indexer_kl_loss",
    "indexer_kl_loss_backward",
]

_NS = "msa_cuda"


def _opt(x: int) -> Optional[int]:
    """-1 (not given) -> None for the reference's Optional[int] arguments."""
    return None if x < 0 else x


def _seq_checks(q_like: Tensor, k_like: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                max_seqlen_k: int) -> Tuple[int, int]:
    """Value checks of cu_seqlens; returns (max_seqlen_q, max_seqlen_k) (true maxima for varlen)."""
    return _validation.check_cu_seqlens_values(
        cu_seqlens_q, cu_seqlens_k, q_like.shape[0], k_like.shape[0], max_seqlen_q, max_seqlen_k)


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside an op body (for the reference-recompute backward ops).

    The dispatcher runs custom-op bodies below the Autograd keys (they are in the thread-local
    exclude set), so ``torch.enable_grad()`` alone records no graph there.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


def _use_kernel(op_name: str, x: Tensor) -> bool:
    return _kernels.has_kernel(op_name, x.device, x.dtype)


# ============================================================================================
# select_blocks
# ============================================================================================


def _select_blocks_kernel(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_size, topk,
                          init_blocks, local_blocks):
    # The kernel reads no index_scale: the selection is invariant to a positive scale.
    return _kernels.kernel("select_blocks")(
        q_idx.contiguous(), k_idx.contiguous(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_size, topk,
        init_blocks, max(1, local_blocks))


@torch.library.custom_op(f"{_NS}::select_blocks", mutates_args=())
def select_blocks(q_idx: Tensor, k_idx: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, block_size: int, topk: int, index_scale: float,
                  init_blocks: int, local_blocks: int) -> Tensor:
    max_seqlen_q, max_seqlen_k = _seq_checks(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if _use_kernel("select_blocks", q_idx):
        return _select_blocks_kernel(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_size, topk,
                                     init_blocks, local_blocks)
    with torch.no_grad():
        out = _ref.select_blocks(
            q_idx, k_idx, block_size=block_size, topk=topk, index_scale=index_scale, init_blocks=init_blocks,
            local_blocks=local_blocks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=_opt(max_seqlen_q), max_seqlen_k=_opt(max_seqlen_k))
    return out.to(torch.int32).contiguous()


@select_blocks.register_fake
def _(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, index_scale,
      init_blocks, local_blocks):
    return q_idx.new_empty((*q_idx.shape[:-1], topk), dtype=torch.int32)


# ============================================================================================
# block_sparse_attn (+ backward)
# ============================================================================================


def _block_sparse_attn_kernel(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size,
                              softmax_scale):
    # Out-of-range ids (possible with validate=False) are skipped by the kernel, like -1.
    return _kernels.kernel("block_sparse_attn")(
        q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous(), cu_seqlens_q, cu_seqlens_k,
        max_seqlen_k, block_size, softmax_scale)


def _real_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """dtype of lse and of the loss: float64 when an input is float64 (CPU gradcheck), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _lse_shape(q: Tensor, varlen: bool):
    if varlen:
        return (q.shape[1], q.shape[0])  # [Hq, Tq]
    return (q.shape[0], q.shape[2], q.shape[1])  # [B, Hq, Sq]


@torch.library.custom_op(f"{_NS}::block_sparse_attn", mutates_args=())
def block_sparse_attn(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens_q: Optional[Tensor],
                      cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, block_size: int,
                      softmax_scale: float, validate: bool, deterministic: bool) -> Tuple[Tensor, Tensor]:
    max_seqlen_q, max_seqlen_k = _seq_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if validate:
        _validation.check_block_indices_values(
            block_indices, block_size, k.shape[-3], cu_seqlens_q, cu_seqlens_k)
    if _use_kernel("block_sparse_attn", q):
        return _block_sparse_attn_kernel(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k,
                                         block_size, softmax_scale)
    with torch.no_grad():
        out, lse = _ref.block_sparse_attn(
            q, k, v, block_indices, block_size=block_size, softmax_scale=softmax_scale,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=_opt(max_seqlen_q),
            max_seqlen_k=_opt(max_seqlen_k), return_lse=True)
    return out.to(q.dtype).contiguous(), lse.to(_real_dtype(q)).contiguous()


@block_sparse_attn.register_fake
def _(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, softmax_scale,
      validate, deterministic):
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=_real_dtype(q))
    return out, lse


def _block_sparse_attn_backward_reference(grad_out, grad_lse, q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, block_size, softmax_scale):
    """Recompute the forward with the reference and differentiate it."""
    with _autograd_inside_op():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, lse = _ref.block_sparse_attn(
            q_, k_, v_, block_indices, block_size=block_size, softmax_scale=softmax_scale,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=_opt(max_seqlen_q),
            max_seqlen_k=_opt(max_seqlen_k), return_lse=True)
        outputs, grads = [out], [grad_out.to(out.dtype)]
        if grad_lse is not None:
            # Rows with no visible key have lse = -inf and carry no gradient.
            grad_lse = torch.where(torch.isneginf(lse.detach()), 0.0, grad_lse.to(lse.dtype))
            outputs.append(lse)
            grads.append(grad_lse)
        dq, dk, dv = torch.autograd.grad(outputs, (q_, k_, v_), grads, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.to(t.dtype).contiguous()
                 for g, t in ((dq, q), (dk, k), (dv, v)))


@torch.library.custom_op(f"{_NS}::block_sparse_attn_backward", mutates_args=())
def block_sparse_attn_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                               block_indices: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor],
                               cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                               block_size: int, softmax_scale: float, deterministic: bool = False
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    # Inputs were validated by the forward op.
    if _use_kernel("block_sparse_attn_backward", q) and lse.dtype == torch.float32:
        _, max_seqlen_k = _seq_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _kernels.kernel("block_sparse_attn_backward")(
            grad_out.to(q.dtype).contiguous(), None if grad_lse is None else grad_lse.to(torch.float32).contiguous(),
            q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous(), out.contiguous(),
            lse.contiguous(), cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size, softmax_scale, deterministic)
    return _block_sparse_attn_backward_reference(grad_out, grad_lse, q, k, v, block_indices, cu_seqlens_q,
                                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size,
                                                 softmax_scale)


@block_sparse_attn_backward.register_fake
def _(grad_out, grad_lse, q, k, v, block_indices, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, block_size, softmax_scale, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    (q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, softmax_scale,
     _validate, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, block_indices, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.params = (max_seqlen_q, max_seqlen_k, block_size, softmax_scale, deterministic)


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, block_indices, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, block_size, softmax_scale, deterministic = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.msa_cuda.block_sparse_attn_backward(
        grad_out, grad_lse, q, k, v, block_indices, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, block_size, softmax_scale, deterministic)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None, None, None, None, None, None, None, None)


block_sparse_attn.register_autograd(_attn_backward, setup_context=_attn_setup_context)


# ============================================================================================
# indexer_kl_loss (+ backward)
# ============================================================================================


def _kl_reference(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  block_size, softmax_scale, index_scale, dense):
    return _ref.indexer_kl_loss(
        q, k, q_idx, k_idx, block_indices, block_size=block_size, softmax_scale=softmax_scale,
        index_scale=index_scale, dense=dense, lse=lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=_opt(max_seqlen_q), max_seqlen_k=_opt(max_seqlen_k))


def _kl_kernel_applies(q, k, q_idx, k_idx, lse, dense) -> bool:
    """A kernel covers the support (selected, or dense) with one dtype for all four tensors."""
    if not _use_kernel("indexer_kl_loss_dense" if dense else "indexer_kl_loss", q):
        return False
    if not (k.dtype == q_idx.dtype == k_idx.dtype == q.dtype) or (lse is not None and lse.dtype != torch.float32):
        return False
    g = q.shape[-2] // k.shape[-2]
    return q.shape[-1] in (64, 128) and q_idx.shape[-1] in (64, 128) and g in (1, 2, 4, 8, 16)


def _dense_causal_lse(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale) -> Tensor:
    """The dense causal (bottom-right aligned) lse of the main branch, float32 [B, Hq, Sq] /
    [Hq, Tq]: the dense KL's teacher normaliser when the caller passes none. Equal lengths in a
    padded batch use PyTorch's flash attention (one dense forward); otherwise query chunks in
    float32 (slow; pass ``lse`` from your dense attention instead)."""
    hq = q.shape[-2]
    if cu_seqlens_q is None and q.shape[1] == k.shape[1]:
        return _dense_causal_lse_sdpa(q, k, softmax_scale)[0]
    if cu_seqlens_q is None:
        return torch.stack([_dense_causal_lse_one(q[b], k[b], softmax_scale) for b in range(q.shape[0])])
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = [_dense_causal_lse_one(q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], softmax_scale)
             for b in range(len(bq) - 1)]
    return torch.cat(parts, dim=1) if parts else q.new_empty((hq, 0), dtype=torch.float32)


def _dense_causal_lse_sdpa(q, k, softmax_scale) -> Tuple[Tensor, str]:
    """A padded batch with Sq = Sk (SDPA's top-left causal mask is then the bottom-right one):
    float32 [B, Hq, S] and the backend that computed it. One KV group at a time, its G query heads
    against k expanded to G heads (k also stands in for v, on which the lse does not depend),
    through FlashAttention's forward, or the memory-efficient one if FlashAttention refuses."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    parts, backend = [], "FlashAttention"
    for h in range(hkv):
        qh = q[:, :, h * g:(h + 1) * g].transpose(1, 2)  # [B, G, S, D]
        kh = k[:, :, h:h + 1].expand(b, s, g, d).contiguous().transpose(1, 2)
        try:
            if backend != "FlashAttention":
                raise RuntimeError("FlashAttention refused an earlier group")
            out = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, kh, 0.0, True, False,
                                                                     scale=softmax_scale)
        except RuntimeError:
            backend = "memory-efficient attention"
            out = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, kh, None, True, 0.0, True,
                                                                         scale=softmax_scale)
        parts.append(out[1][:, :, :s].float())  # the efficient kernel pads the lse's length to 32
        del out, kh
    return torch.cat(parts, dim=1).contiguous(), backend


def _dense_causal_lse_one(q, k, softmax_scale) -> Tensor:
    """[Hq, Sq] float32 for one sequence (q [Sq, Hq, D], k [Sk, Hkv, D]), in query chunks of at
    most ~1 GiB of scores."""
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    out = torch.empty((hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0:
        return out
    kf = k.float().permute(1, 2, 0)  # [Hkv, D, Sk]
    chunk = max(1, (1 << 28) // max(1, hq * sk))
    keys = torch.arange(sk, device=q.device)
    for start in range(0, sq, chunk):
        qc = q[start:start + chunk].float()  # [c, Hq, D]
        c = qc.shape[0]
        s = torch.matmul(qc.reshape(c, hkv, hq // hkv, d).permute(1, 2, 0, 3), kf.unsqueeze(1)) * softmax_scale
        pos = sk - sq + start + torch.arange(c, device=q.device)
        s = s.masked_fill(keys.view(1, 1, 1, sk) > pos.view(1, 1, c, 1), float("-inf"))
        out[:, start:start + c] = torch.logsumexp(s, dim=-1).reshape(hq, c)
    return out


def _indexer_kl_kernel(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, block_size, softmax_scale, index_scale, dense):
    """(loss, d loss / d q_idx, d loss / d k_idx), the gradients in float32."""
    q, k = q.contiguous(), k.contiguous()
    if dense:
        if lse is None:
            lse = _dense_causal_lse(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale)
        return _kernels.kernel("indexer_kl_loss_dense")(
            q, k, q_idx.contiguous(), k_idx.contiguous(), lse.contiguous(), cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, block_size, softmax_scale, index_scale)
    block_indices = block_indices.contiguous()
    if lse is None:
        # The teacher's normaliser is the main branch's lse on the same support; it does not depend
        # on v, so k stands in for it.
        _, lse = _block_sparse_attn_kernel(q, k, k, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k,
                                           block_size, softmax_scale)
    return _kernels.kernel("indexer_kl_loss")(
        q, k, q_idx.contiguous(), k_idx.contiguous(), block_indices, lse.contiguous(), cu_seqlens_q, cu_seqlens_k,
        max_seqlen_k, block_size, softmax_scale, index_scale)


def _kl_reference_with_grads(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, block_size, softmax_scale, index_scale, dense):
    """Reference loss and its gradients for q_idx and k_idx (in the loss dtype)."""
    with _autograd_inside_op():
        q_idx_ = q_idx.detach().requires_grad_(True)
        k_idx_ = k_idx.detach().requires_grad_(True)
        loss = _kl_reference(q.detach(), k.detach(), q_idx_, k_idx_, block_indices,
                             None if lse is None else lse.detach(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, block_size, softmax_scale, index_scale, dense)
        grads = torch.autograd.grad(loss, (q_idx_, k_idx_), allow_unused=True)
    return loss.detach(), tuple(torch.zeros_like(t, dtype=loss.dtype) if g is None else g.to(loss.dtype)
                                for g, t in zip(grads, (q_idx, k_idx)))


@torch.library.custom_op(f"{_NS}::indexer_kl_loss", mutates_args=())
def indexer_kl_loss(q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, block_indices: Optional[Tensor],
                    lse: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, block_size: int, softmax_scale: float,
                    index_scale: float, dense: bool, need_grad: bool, validate: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dq_idx, dloss/dk_idx); the gradients are computed with the loss (it is a scalar,
    so the backward only scales them) when need_grad, else they are empty."""
    max_seqlen_q, max_seqlen_k = _seq_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if dense:
        block_indices = None
    elif validate:
        _validation.check_block_indices_values(block_indices, block_size, k.shape[-3], cu_seqlens_q, cu_seqlens_k)
    real = _real_dtype(q, k, q_idx, k_idx)
    if _kl_kernel_applies(q, k, q_idx, k_idx, lse, dense):
        # The kernel always produces the gradients: they cost a fraction of the teacher.
        loss, dq_idx, dk_idx = _indexer_kl_kernel(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q,
                                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, softmax_scale,
                                                  index_scale, dense)
    elif need_grad:
        loss, (dq_idx, dk_idx) = _kl_reference_with_grads(
            q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            block_size, softmax_scale, index_scale, dense)
    else:
        with torch.no_grad():
            loss = _kl_reference(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, block_size, softmax_scale, index_scale, dense)
    loss = loss.to(real).reshape(()).clone()
    if not need_grad:
        return loss, q_idx.new_empty((0,), dtype=real), q_idx.new_empty((0,), dtype=real)
    return loss, dq_idx.to(real).contiguous(), dk_idx.to(real).contiguous()


@indexer_kl_loss.register_fake
def _(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size,
      softmax_scale, index_scale, dense, need_grad, validate):
    real = _real_dtype(q, k, q_idx, k_idx)
    if not need_grad:
        return q_idx.new_empty((), dtype=real), q_idx.new_empty((0,), dtype=real), q_idx.new_empty((0,), dtype=real)
    return (q_idx.new_empty((), dtype=real), q_idx.new_empty(q_idx.shape, dtype=real),
            k_idx.new_empty(k_idx.shape, dtype=real))


def _scaled_grads(grad_loss: Tensor, dq_unit: Tensor, dk_unit: Tensor, q_idx: Tensor, k_idx: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """d loss / d q_idx and d loss / d k_idx times the incoming gradient, in q_idx's / k_idx's dtype."""
    grad_loss = grad_loss.to(dq_unit.dtype)
    return (grad_loss * dq_unit).to(q_idx.dtype).contiguous(), (grad_loss * dk_unit).to(k_idx.dtype).contiguous()


@torch.library.custom_op(f"{_NS}::indexer_kl_loss_backward", mutates_args=())
def indexer_kl_loss_backward(grad_loss: Tensor, q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor,
                             block_indices: Optional[Tensor], lse: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                             cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, block_size: int,
                             softmax_scale: float, index_scale: float, dense: bool) -> Tuple[Tensor, Tensor]:
    """Recomputes the gradients (used when the forward ran without need_grad)."""
    # Inputs were validated by the forward op.
    if dense:
        block_indices = None
    if _kl_kernel_applies(q, k, q_idx, k_idx, lse, dense):
        max_seqlen_q, max_seqlen_k = _seq_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        _, dq_idx, dk_idx = _indexer_kl_kernel(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, block_size, softmax_scale, index_scale,
                                               dense)
    else:
        _, (dq_idx, dk_idx) = _kl_reference_with_grads(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q,
                                                       cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size,
                                                       softmax_scale, index_scale, dense)
    return _scaled_grads(grad_loss, dq_idx, dk_idx, q_idx, k_idx)


@indexer_kl_loss_backward.register_fake
def _(grad_loss, q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      block_size, softmax_scale, index_scale, dense):
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape)


def _kl_setup_context(ctx, inputs, output):
    (q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size,
     softmax_scale, index_scale, dense, need_grad, _validate) = inputs
    _, dq_idx, dk_idx = output
    ctx.mark_non_differentiable(dq_idx, dk_idx)
    ctx.save_for_backward(q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, dq_idx, dk_idx)
    ctx.params = (max_seqlen_q, max_seqlen_k, block_size, softmax_scale, index_scale, dense, need_grad)


def _kl_backward(ctx, grad_loss, _grad_dq_idx, _grad_dk_idx):
    q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, dq_unit, dk_unit = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, block_size, softmax_scale, index_scale, dense, need_grad = ctx.params
    needs = ctx.needs_input_grad
    dq_idx = dk_idx = None
    if needs[2] or needs[3]:
        if need_grad:  # computed by the forward: d loss / d x scaled by the incoming gradient
            dq_idx, dk_idx = _scaled_grads(grad_loss, dq_unit, dk_unit, q_idx, k_idx)
        else:
            dq_idx, dk_idx = torch.ops.msa_cuda.indexer_kl_loss_backward(
                grad_loss, q, k, q_idx, k_idx, block_indices, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, block_size, softmax_scale, index_scale, dense)
    # No gradient reaches q, k (the teacher is a constant) or lse.
    return (None, None, dq_idx if needs[2] else None, dk_idx if needs[3] else None,
            None, None, None, None, None, None, None, None, None, None, None, None)


indexer_kl_loss.register_autograd(_kl_backward, setup_context=_kl_setup_context)
