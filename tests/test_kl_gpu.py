"""The SM90 indexer distillation loss (KL) against the reference (MSA_SPEC s.7).

msa_cuda.indexer_kl_loss on CUDA bf16/fp16 inputs (dense=False: the kernel path, which computes
the loss and, when q_idx or k_idx needs it, dq_idx and dk_idx in the forward) is compared with
msa_cuda.reference.indexer_kl_loss run in float64 on the same inputs upcast, with autograd for the
gradients. The loss is checked relative to |reference loss| (with a small floor), the gradients as
the maximum error relative to the largest reference gradient; the allocator is poisoned before
every kernel call so unwritten outputs show. Covered: D, Di, block_size, G and dtype; selections
from select_blocks and caller-made ones (unsorted, -1 padded, blocks past the query, rows whose
support is empty); lse given and lse None; Sq < Sk with a padded batch; varlen; no-grad calls and
inputs without requires_grad; scaling by the incoming gradient; an M3-like shape.

The dense warm-up variant (dense=True: the support is the whole causal history; its kernel is
torch.ops.msa_cuda_kernels.indexer_kl_dense) is compared the same way, with lse None (the op
computes the dense causal lse) or the dense causal lse computed here in float64: dtype x D x Di x
block_size, every G, Sq < Sk with a padded batch, varlen (a sequence shorter than one block),
Sq = Sk = 2500 at M3-like heads (rows split over several key chunks), autograd behaviour, and
equality with the selected-support kernel on a selection of every block.
"""

import itertools

import pytest
import torch

import msa_cuda
from msa_cuda import reference as ref

from gpu_utils import poison_allocator, random_selection, requires_sm90

pytestmark = [pytest.mark.gpu, requires_sm90]

DEVICE = "cuda"
LOSS_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}
LOSS_FLOOR = 1e-2  # |reference loss| below this is compared at this scale


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _inputs(b, sq, sk, hq, hkv, d, di, dtype, seed, k_idx_head=False):
    """q [b, sq, hq, d], k [b, sk, hkv, d], q_idx [b, sq, hkv, di], k_idx [b, sk, (1,) di].

    Index tensors are scaled by 2 so that the student distribution is far from uniform. b=None
    drops the batch dim (varlen: sq, sk are then the token totals)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    lead = () if b is None else (b,)
    mk = lambda *s: torch.randn(*lead, *s, device=DEVICE, dtype=dtype, generator=g)  # noqa: E731
    q, k = mk(sq, hq, d), mk(sk, hkv, d)
    q_idx = 2 * mk(sq, hkv, di)
    k_idx = 2 * (mk(sk, 1, di) if k_idx_head else mk(sk, di))
    return q, k, q_idx, k_idx


def _selection_with_empty_first_rows(b, sq, sk, hkv, topk, block_size, seed):
    """Caller-made selection: distinct random block ids per (token, group), shuffled, -1 padded,
    some past the query (invisible). Row 0 of every (batch, group) names only blocks past its
    query (empty support), or nothing when there are none."""
    sel = random_selection(b, sq, sk, hkv, topk, block_size, seed, device="cpu")
    nblk = -(-sk // block_size)
    local = (sk - sq) // block_size  # local block of query 0
    future = torch.arange(local + 1, nblk, dtype=torch.int32).flip(0)[:topk]
    sel[:, 0] = -1
    sel[:, 0, :, :len(future)] = future
    return sel.to(DEVICE)


def _lse(q, k, sel, block_size, **kw):
    """The main branch's lse on the selection (the kernel forward), as a caller would pass it."""
    return msa_cuda.block_sparse_attn(q, k, torch.randn_like(k), sel, block_size=block_size, return_lse=True,
                                      **kw)[1]


# ---------------------------------------------------------------------------------------------
# Kernel path, reference, comparison
# ---------------------------------------------------------------------------------------------


def _kernel(q, k, q_idx, k_idx, sel, block_size, grad_scale=1.0, **kw):
    """Loss and (dq_idx, dk_idx) of the public op on the device inputs, via .backward()."""
    qi, ki = (t.detach().clone().requires_grad_(True) for t in (q_idx, k_idx))
    poison_allocator(4 * (q.numel() + q_idx.numel() + k_idx.numel()))
    loss = msa_cuda.indexer_kl_loss(q, k, qi, ki, sel, block_size=block_size, **kw)
    (loss * grad_scale if grad_scale != 1.0 else loss).backward()
    return loss.detach(), qi.grad, ki.grad


def _reference(q, k, q_idx, k_idx, sel, block_size, lse=None, **kw):
    """Loss and (dq_idx, dk_idx) of the reference in float64 on the upcast inputs."""
    qi, ki = (t.detach().double().requires_grad_(True) for t in (q_idx, k_idx))
    loss = ref.indexer_kl_loss(q.double(), k.double(), qi, ki, sel, block_size=block_size,
                               lse=None if lse is None else lse.double(), **kw)
    dqi, dki = torch.autograd.grad(loss, (qi, ki), allow_unused=True)
    dqi = torch.zeros_like(qi) if dqi is None else dqi
    dki = torch.zeros_like(ki) if dki is None else dki
    return loss.detach(), dqi, dki


def _assert_loss_close(got, want, dtype, what="loss"):
    assert got.dtype == torch.float32 and got.dim() == 0, f"{what}: {got.dtype} {tuple(got.shape)}"
    assert torch.isfinite(got), f"{what}: non-finite ({got.item()})"
    err = abs(got.item() - want.item())
    scale = max(abs(want.item()), LOSS_FLOOR)
    assert err <= LOSS_TOL[dtype] * scale, f"{what}: {got.item():.6g} vs reference {want.item():.6g}"


def _assert_grad_close(name, got, want, like, dtype, tol=None):
    assert got is not None, f"{name}: no gradient"
    assert got.dtype == like.dtype and got.shape == like.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite"
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    tol = GRAD_TOL[dtype] if tol is None else tol
    assert err <= tol * max(scale, 1e-12), f"{name}: max abs error {err:.3e} vs max |ref| {scale:.3e}"


def _check(q, k, q_idx, k_idx, sel, block_size, with_lse=False, **kw):
    """Kernel path vs float64 reference: loss, dq_idx, dk_idx; lse given to both, or to neither."""
    dtype = q.dtype
    lse = _lse(q, k, sel, block_size, **kw) if with_lse else None
    loss, dqi, dki = _kernel(q, k, q_idx, k_idx, sel, block_size, lse=lse, **kw)
    ref_loss, ref_dqi, ref_dki = _reference(q, k, q_idx, k_idx, sel, block_size, lse=lse, **kw)
    _assert_loss_close(loss, ref_loss, dtype)
    _assert_grad_close("dq_idx", dqi, ref_dqi, q_idx, dtype)
    _assert_grad_close("dk_idx", dki, ref_dki, k_idx, dtype)


# ---------------------------------------------------------------------------------------------
# Shapes and selections
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("di", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
def test_kl_selected_by_the_indexer(dtype, d, di, block_size):
    # G = 4; lse None: the op runs the attention forward for it.
    sq = sk = 517
    q, k, q_idx, k_idx = _inputs(1, sq, sk, 8, 2, d, di, dtype, seed=d + di + block_size)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=3)
    _check(q, k, q_idx, k_idx, sel, block_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g_size,topk", [(1, 1), (2, 8), (4, 16), (8, 3), (16, 8)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_group_sizes(dtype, g_size, topk, with_lse):
    hkv = 2 if g_size < 16 else 1
    sq = sk = 333
    q, k, q_idx, k_idx = _inputs(1, sq, sk, hkv * g_size, hkv, 128, 128, dtype, seed=g_size * 7 + topk)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=64, topk=topk)
    _check(q, k, q_idx, k_idx, sel, 64, with_lse=with_lse)


@pytest.mark.parametrize("sq,sk", [(1, 1), (37, 37), (113, 203), (130, 259), (256, 256)])
@pytest.mark.parametrize("topk", [1, 3, 16])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_caller_selections(sq, sk, topk, with_lse):
    # Unsorted ids, -1 padding, blocks past the query, empty-support rows (0 in the sum, counted
    # in the mean), rows with no id at all.
    dtype, block_size = torch.bfloat16, 64
    q, k, q_idx, k_idx = _inputs(2, sq, sk, 8, 2, 128, 64, dtype, seed=sq + sk + topk)
    sel = _selection_with_empty_first_rows(2, sq, sk, 2, topk, block_size, seed=sq * topk)
    _check(q, k, q_idx, k_idx, sel, block_size, with_lse=with_lse)


def test_kl_every_support_empty():
    # Only blocks past each query, or nothing: the loss is 0 and both gradients are exactly 0.
    sq = sk = 200
    block_size = 64
    q, k, q_idx, k_idx = _inputs(2, sq, sk, 8, 2, 64, 64, torch.float16, seed=11)
    sel = torch.full((2, sq, 2, 4), -1, dtype=torch.int32)
    pos = torch.arange(sq)
    future = (pos // block_size + 1)[:, None] + torch.arange(2)  # the next two blocks
    nblk = -(-sk // block_size)
    sel[:, :, :, :2] = torch.where(future < nblk, future, -1).to(torch.int32)[None, :, None, :]
    sel = sel.to(DEVICE)
    for lse in (None, _lse(q, k, sel, block_size)):
        loss, dqi, dki = _kernel(q, k, q_idx, k_idx, sel, block_size, lse=lse)
        assert loss.item() == 0.0
        for name, grad, like in (("dq_idx", dqi, q_idx), ("dk_idx", dki, k_idx)):
            assert grad.dtype == like.dtype and grad.shape == like.shape
            assert (grad == 0).all(), f"{name}: nonzero gradient without support"


@pytest.mark.parametrize("sq,sk", [(200, 517), (1, 700), (77, 129)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_chunked_prefill_batch(sq, sk, with_lse):
    # Sq < Sk (bottom-right aligned), B = 2 padded; k_idx with its size-1 head dim.
    dtype, block_size = torch.bfloat16, 128
    q, k, q_idx, k_idx = _inputs(2, sq, sk, 16, 2, 128, 128, dtype, seed=sq + sk, k_idx_head=True)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=3)
    _check(q, k, q_idx, k_idx, sel, block_size, with_lse=with_lse)


@pytest.mark.parametrize("lens_q,lens_k", [([1, 200, 77], [1, 200, 77]), ([1, 200, 77], [5, 333, 77])])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_varlen(lens_q, lens_k, with_lse):
    dtype, block_size, topk = torch.float16, 64, 4
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=DEVICE)
    q, k, q_idx, k_idx = _inputs(None, sum(lens_q), sum(lens_k), 16, 4, 64, 128, dtype, seed=sum(lens_k))
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=topk, **varlen)
    _check(q, k, q_idx, k_idx, sel, block_size, with_lse=with_lse, **varlen)


@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_m3_shape_many_tiles(with_lse):
    # Hq=64, Hkv=4 (G=16), D=Di=128, block 128, topk 16, S=4096; block 0 forced (hot): long
    # per-block query lists.
    s, block_size = 4096, 128
    q, k, q_idx, k_idx = _inputs(1, s, s, 64, 4, 128, 128, torch.bfloat16, seed=21)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=16, init_blocks=1)
    _check(q, k, q_idx, k_idx, sel, block_size, with_lse=with_lse)


# ---------------------------------------------------------------------------------------------
# Autograd behaviour
# ---------------------------------------------------------------------------------------------


def _small_problem(dtype=torch.bfloat16, seed=5):
    q, k, q_idx, k_idx = _inputs(2, 333, 333, 16, 4, 128, 64, dtype, seed=seed)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=64, topk=3)
    return q, k, q_idx, k_idx, sel


@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_no_grad_paths(with_lse):
    q, k, q_idx, k_idx, sel = _small_problem()
    lse = _lse(q, k, sel, 64) if with_lse else None
    loss_with_grad, _, _ = _kernel(q, k, q_idx, k_idx, sel, 64, lse=lse)
    # Grad mode off, inputs requiring grad.
    qi, ki = (t.clone().requires_grad_(True) for t in (q_idx, k_idx))
    with torch.no_grad():
        poison_allocator(4 * q.numel())
        loss = msa_cuda.indexer_kl_loss(q, k, qi, ki, sel, block_size=64, lse=lse)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss_with_grad, rtol=1e-4, atol=1e-6)
    # Grad mode on, no input requiring grad.
    poison_allocator(4 * q.numel())
    loss = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, sel, block_size=64, lse=lse)
    assert not loss.requires_grad and q_idx.grad is None and k_idx.grad is None
    torch.testing.assert_close(loss, loss_with_grad, rtol=1e-4, atol=1e-6)
    ref_loss = _reference(q, k, q_idx, k_idx, sel, 64, lse=lse)[0]
    _assert_loss_close(loss, ref_loss, torch.bfloat16)


@pytest.mark.parametrize("which", ["q_idx", "k_idx"])
def test_kl_grad_of_one_index_input(which):
    # Only one of q_idx, k_idx requires grad; q and k require grad but get none.
    q, k, q_idx, k_idx, sel = _small_problem(torch.float16, seed=8)
    qm, km = (t.clone().requires_grad_(True) for t in (q, k))
    qi = q_idx.clone().requires_grad_(which == "q_idx")
    ki = k_idx.clone().requires_grad_(which == "k_idx")
    poison_allocator(4 * q.numel())
    msa_cuda.indexer_kl_loss(qm, km, qi, ki, sel, block_size=64).backward()
    assert qm.grad is None and km.grad is None
    _, ref_dqi, ref_dki = _reference(q, k, q_idx, k_idx, sel, 64)
    if which == "q_idx":
        assert ki.grad is None
        _assert_grad_close("dq_idx", qi.grad, ref_dqi, q_idx, torch.float16)
    else:
        assert qi.grad is None
        _assert_grad_close("dk_idx", ki.grad, ref_dki, k_idx, torch.float16)


@pytest.mark.parametrize("scale", [3.0, -0.5])
def test_kl_gradient_scaled_by_incoming_gradient(scale):
    q, k, q_idx, k_idx, sel = _small_problem(seed=9)
    lse = _lse(q, k, sel, 64)
    loss1, dqi1, dki1 = _kernel(q, k, q_idx, k_idx, sel, 64, lse=lse)
    loss3, dqi3, dki3 = _kernel(q, k, q_idx, k_idx, sel, 64, grad_scale=scale, lse=lse)
    torch.testing.assert_close(loss3, loss1, rtol=1e-4, atol=1e-6)
    for name, got, base, like in (("dq_idx", dqi3, dqi1, q_idx), ("dk_idx", dki3, dki1, k_idx)):
        _assert_grad_close(name, got, scale * base.double(), like, torch.bfloat16, tol=1e-2)


# ---------------------------------------------------------------------------------------------
# Dense warm-up variant: against the selected-support kernel on every block
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_warmup(with_lse):
    # 300 keys in 5 blocks of 64: a topk-8 selection holds every visible block, so its lse is the
    # dense causal lse and the sparse (kernel) loss equals the dense one.
    dtype, block_size = torch.bfloat16, 64
    q, k, q_idx, k_idx = _inputs(1, 300, 300, 8, 2, 64, 64, dtype, seed=13)
    full = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=8)
    lse = _lse(q, k, full, block_size) if with_lse else None
    qi, ki = (t.clone().requires_grad_(True) for t in (q_idx, k_idx))
    loss = msa_cuda.indexer_kl_loss(q, k, qi, ki, None, block_size=block_size, dense=True, lse=lse)
    loss.backward()
    ref_loss, ref_dqi, ref_dki = _reference(q, k, q_idx, k_idx, None, block_size, lse=lse, dense=True)
    _assert_loss_close(loss.detach(), ref_loss, dtype, "dense loss")
    _assert_grad_close("dq_idx", qi.grad, ref_dqi, q_idx, dtype)
    _assert_grad_close("dk_idx", ki.grad, ref_dki, k_idx, dtype)
    sparse_loss, dqi, dki = _kernel(q, k, q_idx, k_idx, full, block_size, lse=lse)
    _assert_loss_close(sparse_loss, ref_loss, dtype, "sparse loss on every block")
    _assert_grad_close("dq_idx (every block)", dqi, ref_dqi, q_idx, dtype)
    _assert_grad_close("dk_idx (every block)", dki, ref_dki, k_idx, dtype)


def test_kl_kernel_is_the_path_taken():
    """The comparisons above test the kernel, not the reference falling back."""
    from msa_cuda import _kernels

    assert _kernels.has_kernel("indexer_kl_loss", DEVICE, torch.bfloat16)
    assert _kernels.has_kernel("indexer_kl_loss", DEVICE, torch.float16)


# ---------------------------------------------------------------------------------------------
# Dense warm-up kernel (dense=True on CUDA bf16/fp16)
# ---------------------------------------------------------------------------------------------


def _varlen(lens_q, lens_k):
    """cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k of per-sequence lengths."""
    cu = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32,  # noqa: E731
                                   device=DEVICE)
    return dict(cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), max_seqlen_q=max(lens_q),
                max_seqlen_k=max(lens_k))


def _dense_lse_one(q, k, scale, rows=256):
    """float64 [Hq, Sq]: lse[h, i] = logsumexp over j <= Sk - Sq + i of scale * q[i, h] . k[j, h // G],
    for one sequence (q [Sq, Hq, D], k [Sk, Hkv, D]), in chunks of rows."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    keys = k.double().repeat_interleave(hq // hkv, dim=1).permute(1, 2, 0)  # [Hq, D, Sk]
    key_pos = torch.arange(sk, device=q.device)
    out = torch.empty(hq, sq, dtype=torch.float64, device=q.device)
    for r0 in range(0, sq, rows):
        r1 = min(r0 + rows, sq)
        s = torch.matmul(q[r0:r1].double().transpose(0, 1), keys) * scale  # [Hq, r, Sk]
        pos = torch.arange(r0, r1, device=q.device) + (sk - sq)  # bottom-right aligned
        s.masked_fill_((key_pos[None, :] > pos[:, None])[None], float("-inf"))
        out[:, r0:r1] = torch.logsumexp(s, dim=-1)
    return out


def _dense_lse(q, k, cu_seqlens_q=None, cu_seqlens_k=None, **_):
    """The main branch's dense causal lse as a caller passes it: float32 [B, Hq, Sq] (varlen
    [Hq, Tq]), computed in float64 with the default softmax scale 1 / sqrt(D)."""
    scale = q.shape[-1] ** -0.5
    if cu_seqlens_q is None:
        return torch.stack([_dense_lse_one(q[b], k[b], scale) for b in range(q.shape[0])]).float()
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = [_dense_lse_one(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], scale) for i in range(len(cq) - 1)]
    return torch.cat(parts, dim=1).float().contiguous()


def _check_dense(q, k, q_idx, k_idx, block_size, with_lse, sel=None, **kw):
    """Dense kernel path vs the float64 dense reference: loss, dq_idx, dk_idx; the dense causal lse
    given to both, or to neither. ``sel`` (ignored with dense=True) goes to the public op only."""
    dtype = q.dtype
    lse = _dense_lse(q, k, **kw) if with_lse else None
    loss, dqi, dki = _kernel(q, k, q_idx, k_idx, sel, block_size, dense=True, lse=lse, **kw)
    ref_loss, ref_dqi, ref_dki = _reference(q, k, q_idx, k_idx, None, block_size, lse=lse, dense=True, **kw)
    _assert_loss_close(loss, ref_loss, dtype, "dense loss")
    _assert_grad_close("dq_idx", dqi, ref_dqi, q_idx, dtype)
    _assert_grad_close("dk_idx", dki, ref_dki, k_idx, dtype)
    return loss, dqi, dki


def test_kl_dense_kernel_is_the_path_taken():
    """The dense comparisons below test the kernel, not the reference falling back."""
    from msa_cuda import _kernels

    assert hasattr(torch.ops.msa_cuda_kernels, "indexer_kl_dense")
    assert _kernels.has_kernel("indexer_kl_loss_dense", DEVICE, torch.bfloat16)
    assert _kernels.has_kernel("indexer_kl_loss_dense", DEVICE, torch.float16)


def test_kl_dense_lse_helper_matches_the_attention_kernel():
    """The test's dense lse is the main branch's: on a selection of every block (5 blocks), the
    attention kernel's lse equals it."""
    q, k, q_idx, k_idx = _inputs(2, 131, 300, 8, 2, 64, 64, torch.bfloat16, seed=3)
    full = torch.arange(5, dtype=torch.int32, device=DEVICE).expand(2, 131, 2, 5).contiguous()
    torch.testing.assert_close(_lse(q, k, full, 64), _dense_lse(q, k), rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("di", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_shapes(dtype, d, di, block_size, with_lse):
    # G = 4, B = 2, 517 tokens (not a multiple of either block).
    q, k, q_idx, k_idx = _inputs(2, 517, 517, 8, 2, d, di, dtype, seed=3 * d + di + block_size + with_lse)
    _check_dense(q, k, q_idx, k_idx, block_size, with_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g_size", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_group_sizes(dtype, g_size, with_lse):
    hkv = 2 if g_size < 16 else 1
    q, k, q_idx, k_idx = _inputs(1, 333, 333, hkv * g_size, hkv, 128, 64, dtype, seed=g_size * 5 + with_lse)
    _check_dense(q, k, q_idx, k_idx, 64, with_lse)


@pytest.mark.parametrize("sq,sk", [(200, 517), (1, 700), (77, 129), (130, 259), (333, 334)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_chunked_prefill_batch(sq, sk, dtype, with_lse):
    # Sq < Sk (bottom-right aligned), B = 2 padded; k_idx with its size-1 head dim; a caller-made
    # selection is passed and must be ignored.
    block_size = 128
    q, k, q_idx, k_idx = _inputs(2, sq, sk, 16, 2, 128, 128, dtype, seed=sq + sk + with_lse, k_idx_head=True)
    sel = random_selection(2, sq, sk, 2, 2, block_size, seed=sq)
    _check_dense(q, k, q_idx, k_idx, block_size, with_lse, sel=sel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_single_key(dtype, with_lse):
    # Sq = Sk = 1: every support is one key, P = Q = 1, so the loss and both gradients are 0 up to
    # rounding (and finite: no 0 * log 0, no empty key chunk merged in).
    q, k, q_idx, k_idx = _inputs(2, 1, 1, 8, 2, 128, 128, dtype, seed=29)
    lse = _dense_lse(q, k) if with_lse else None
    loss, dqi, dki = _kernel(q, k, q_idx, k_idx, None, 64, dense=True, lse=lse)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and abs(loss.item()) <= 1e-4, loss.item()
    for name, grad, like in (("dq_idx", dqi, q_idx), ("dk_idx", dki, k_idx)):
        assert grad.dtype == like.dtype and grad.shape == like.shape, f"{name}: {tuple(grad.shape)}"
        assert torch.isfinite(grad).all(), f"{name}: non-finite"
        assert grad.abs().max().item() <= 1e-3, f"{name}: {grad.abs().max().item():.3e}"


@pytest.mark.parametrize("lens_q,lens_k", [([1, 200, 77], [1, 200, 77]), ([1, 200, 77], [5, 333, 77]),
                                           ([130, 3, 257], [300, 50, 257])])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_varlen(lens_q, lens_k, block_size, dtype, with_lse):
    # Sequences shorter than one block (1, 3, 5, 50, 77 tokens) next to longer ones.
    varlen = _varlen(lens_q, lens_k)
    q, k, q_idx, k_idx = _inputs(None, sum(lens_q), sum(lens_k), 16, 4, 64, 128, dtype,
                                 seed=sum(lens_k) + block_size)
    _check_dense(q, k, q_idx, k_idx, block_size, with_lse, **varlen)


@pytest.mark.parametrize("dtype,sq,sk,hq,hkv", [(torch.bfloat16, 2500, 2500, 16, 1),
                                                (torch.bfloat16, 2500, 2500, 64, 4),
                                                (torch.float16, 1901, 2500, 16, 1)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_m3_heads_long(dtype, sq, sk, hq, hkv, with_lse):
    # M3-like heads (G = 16), D = Di = 128, block 128, ~20 row tiles per group: the rows are split
    # over several key chunks whose partial results are merged.
    q, k, q_idx, k_idx = _inputs(1, sq, sk, hq, hkv, 128, 128, dtype, seed=sq + hq + with_lse)
    _check_dense(q, k, q_idx, k_idx, 128, with_lse)


@pytest.mark.parametrize("sq,sk,block_size", [(517, 517, 64), (300, 1999, 64), (130, 3001, 128),
                                              (1000, 1000, 128)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_equals_sparse_on_every_block(sq, sk, block_size, with_lse):
    # A selection of every key block (<= 32 blocks; those past a query are invisible) makes the
    # selected support the whole causal history: the dense kernel and the selected-support kernel
    # compute the same loss and gradients (and both match the dense reference).
    dtype, b = torch.bfloat16, 2
    q, k, q_idx, k_idx = _inputs(b, sq, sk, 8, 2, 128, 128, dtype, seed=sk + block_size + with_lse)
    nblk = -(-sk // block_size)
    assert nblk <= 32
    full = torch.arange(nblk, dtype=torch.int32, device=DEVICE).flip(0).expand(b, sq, 2, nblk).contiguous()
    dense_loss, dense_dqi, dense_dki = _check_dense(q, k, q_idx, k_idx, block_size, with_lse)
    lse = _dense_lse(q, k) if with_lse else None
    loss, dqi, dki = _kernel(q, k, q_idx, k_idx, full, block_size, lse=lse)
    _assert_loss_close(loss, dense_loss.double(), dtype, "sparse loss on every block vs dense kernel")
    _assert_grad_close("dq_idx (every block vs dense)", dqi, dense_dqi.double(), q_idx, dtype)
    _assert_grad_close("dk_idx (every block vs dense)", dki, dense_dki.double(), k_idx, dtype)


@pytest.mark.parametrize("with_lse", [False, True])
def test_kl_dense_autograd(with_lse):
    # No-grad calls and inputs without requires_grad give the training call's loss; one index
    # input requiring grad gets the training call's gradient; the incoming gradient scales them.
    dtype, block_size = torch.float16, 64
    q, k, q_idx, k_idx = _inputs(2, 333, 333, 16, 4, 128, 64, dtype, seed=17 + with_lse)
    lse = _dense_lse(q, k) if with_lse else None
    kw = dict(block_size=block_size, dense=True, lse=lse)
    loss1, dqi1, dki1 = _check_dense(q, k, q_idx, k_idx, block_size, with_lse)
    qi, ki = (t.clone().requires_grad_(True) for t in (q_idx, k_idx))
    with torch.no_grad():
        poison_allocator(4 * q.numel())
        loss = msa_cuda.indexer_kl_loss(q, k, qi, ki, None, **kw)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss1, rtol=1e-4, atol=1e-6)
    poison_allocator(4 * q.numel())
    loss = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, None, **kw)
    assert not loss.requires_grad and q_idx.grad is None and k_idx.grad is None
    torch.testing.assert_close(loss, loss1, rtol=1e-4, atol=1e-6)
    for which in ("q_idx", "k_idx"):
        qm, km = (t.clone().requires_grad_(True) for t in (q, k))
        qi = q_idx.clone().requires_grad_(which == "q_idx")
        ki = k_idx.clone().requires_grad_(which == "k_idx")
        poison_allocator(4 * q.numel())
        msa_cuda.indexer_kl_loss(qm, km, qi, ki, None, **kw).backward()
        assert qm.grad is None and km.grad is None
        if which == "q_idx":
            assert ki.grad is None
            _assert_grad_close("dq_idx (alone)", qi.grad, dqi1.double(), q_idx, dtype, tol=1e-2)
        else:
            assert qi.grad is None
            _assert_grad_close("dk_idx (alone)", ki.grad, dki1.double(), k_idx, dtype, tol=1e-2)
    scale = -0.5
    loss3, dqi3, dki3 = _kernel(q, k, q_idx, k_idx, None, block_size, grad_scale=scale, dense=True, lse=lse)
    torch.testing.assert_close(loss3, loss1, rtol=1e-4, atol=1e-6)
    for name, got, base, like in (("dq_idx", dqi3, dqi1, q_idx), ("dk_idx", dki3, dki1, k_idx)):
        _assert_grad_close(f"{name} x {scale}", got, scale * base.double(), like, dtype, tol=1e-2)
