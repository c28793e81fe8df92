"""The SM90 block-sparse attention backward against the reference (MSA_SPEC s.6).

Gradients of the kernel path (msa_cuda.block_sparse_attn, forward and backward kernels) are
compared with autograd through the fp32 reference on the same bf16/fp16 inputs, as the maximum
error relative to the largest reference gradient. Random selections, odd lengths, -1 / unsorted /
past-the-query ids, rows without a visible key, Sq < Sk, varlen, gradients through lse, and
deterministic=True (bitwise identical gradients across runs, on hot-block selections).
"""

import itertools

import pytest
import torch

import msa_cuda
from msa_cuda import reference as ref

from gpu_utils import poison_allocator, random_selection, requires_sm90

pytestmark = [pytest.mark.gpu, requires_sm90]

REL_TOL = {torch.bfloat16: 2.5e-2, torch.float16: 5e-3}


def _grads(q, k, v, sel, block_size, dout, dlse, use_kernel, deterministic=False, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if use_kernel:
        poison_allocator(3 * q.numel() * 4)
        out, lse = msa_cuda.block_sparse_attn(*leaves, sel, block_size=block_size, return_lse=True,
                                              deterministic=deterministic, **kw)
    else:
        out, lse = ref.block_sparse_attn(*(t.float() for t in leaves), sel, block_size=block_size, return_lse=True,
                                         **kw)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isneginf(lse), 0.0, lse.float() * dlse).sum()
    return torch.autograd.grad(loss, leaves)


def _check(q, k, v, sel, block_size, dtype, dlse=None, seed=0, deterministic=False, **kw):
    """Kernel gradients against the reference; returns the kernel's (dq, dk, dv)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    got = _grads(q, k, v, sel, block_size, dout, dlse, True, deterministic, **kw)
    want = _grads(q, k, v, sel, block_size, dout, dlse, False, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), f"{name}: non-finite"
        scale = b.abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= REL_TOL[dtype] * max(scale, 1e-6), f"{name}: max abs error {err:.3e} vs max |ref| {scale:.3e}"
    return got


def _inputs(b, sq, sk, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("g_size", [1, 2, 4, 8, 16])
def test_bwd_selected_by_the_indexer(dtype, d, block_size, g_size):
    hkv = 2 if g_size < 16 else 1
    sq, sk = 333, 777
    q, k, v = _inputs(2, sq, sk, hkv * g_size, hkv, d, dtype, seed=g_size * d + block_size)
    q_idx = torch.randn(2, sq, hkv, 64, device="cuda", dtype=dtype)
    k_idx = torch.randn(2, sk, 64, device="cuda", dtype=dtype)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=5)
    _check(q, k, v, sel, block_size, dtype, seed=d)


@pytest.mark.parametrize("sq,sk", [(1, 1), (37, 37), (113, 203), (130, 259), (256, 256)])
@pytest.mark.parametrize("topk", [1, 3, 16])
def test_bwd_caller_selections_with_lse_gradient(sq, sk, topk):
    # -1 padding, unsorted ids, blocks past the query, rows with no visible key; loss also uses lse.
    dtype, block_size = torch.bfloat16, 64
    q, k, v = _inputs(2, sq, sk, 8, 2, 128, dtype, seed=sq + sk + topk)
    sel = random_selection(2, sq, sk, 2, topk, block_size, seed=sq * topk)
    dlse = torch.randn(2, 8, sq, device="cuda")
    _check(q, k, v, sel, block_size, dtype, dlse=dlse, seed=topk)


def test_bwd_varlen():
    lens_q, lens_k = [1, 77, 300, 5], [1, 200, 300, 900]
    hq, hkv, d, bs, topk = 32, 4, 64, 64, 8
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=torch.float16, generator=g)
    q_idx = torch.randn(sum(lens_q), hkv, 64, device="cuda", dtype=torch.float16, generator=g)
    k_idx = torch.randn(sum(lens_k), 64, device="cuda", dtype=torch.float16, generator=g)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=bs, topk=topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    _check(q, k, v, sel, bs, torch.float16, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
           max_seqlen_k=max(lens_k))


def _m3_hot_blocks(seed):
    """M3 heads at 3000 tokens, block 128, the indexer's selection with block 0 forced: hot blocks
    (every query's own and the first) give long per-block lists, many tiles per block spread over
    CTAs, all adding into the same dK/dV rows. Returns (q, k, v, selection)."""
    s, hq, hkv, d, bs = 3000, 64, 4, 128, 128
    q, k, v = _inputs(1, s, s, hq, hkv, d, torch.bfloat16, seed=seed)
    q_idx = torch.randn(1, s, hkv, 128, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, s, 128, device="cuda", dtype=torch.bfloat16)
    return q, k, v, msa_cuda.select_blocks(q_idx, k_idx, block_size=bs, topk=8, init_blocks=1)


def test_bwd_m3_shape_many_tiles():
    q, k, v, sel = _m3_hot_blocks(seed=21)
    _check(q, k, v, sel, 128, torch.bfloat16, seed=5)


@pytest.mark.parametrize("chunk", [97, 1000])
@pytest.mark.parametrize("d,block_size", [(64, 64), (128, 128)])
def test_bwd_query_chunks(monkeypatch, chunk, d, block_size):
    # The backward runs one plan + launch per query chunk (bwd_chunk_tokens); odd chunk sizes
    # split sequences and batch entries mid-way. Batched, varlen and deterministic.
    monkeypatch.setenv("MSA_BWD_CHUNK_TOKENS", str(chunk))
    dtype = torch.bfloat16
    q, k, v = _inputs(2, 333, 777, 16, 2, d, dtype, seed=chunk + d)
    q_idx = torch.randn(2, 333, 2, 64, device="cuda", dtype=dtype)
    k_idx = torch.randn(2, 777, 64, device="cuda", dtype=dtype)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=5, init_blocks=1)
    _check(q, k, v, sel, block_size, dtype, seed=chunk)
    _check_bitwise(q, k, v, sel, block_size, dtype, seed=chunk + 1)
    lens = [5, 300, 1200]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
    q, k, v = (t.reshape(-1, *t.shape[2:]) for t in _inputs(1, sum(lens), sum(lens), 16, 2, d, dtype, seed=chunk))
    q_idx = torch.randn(sum(lens), 2, 64, device="cuda", dtype=dtype)
    k_idx = torch.randn(sum(lens), 64, device="cuda", dtype=dtype)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=4, cu_seqlens_q=cu, cu_seqlens_k=cu)
    _check(q, k, v, sel, block_size, dtype, seed=chunk + 2, cu_seqlens_q=cu, cu_seqlens_k=cu,
           max_seqlen_q=max(lens), max_seqlen_k=max(lens))


# --------------------------------------------------------------------------------------------
# deterministic=True: bitwise identical gradients run to run
# --------------------------------------------------------------------------------------------


def _check_bitwise(q, k, v, sel, block_size, dtype, dlse=None, seed=0, **kw):
    first = _check(q, k, v, sel, block_size, dtype, dlse=dlse, seed=seed, deterministic=True, **kw)
    g = torch.Generator(device="cuda").manual_seed(seed)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    for _ in range(2):
        again = _grads(q, k, v, sel, block_size, dout, dlse, True, True, **kw)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name}: deterministic gradients differ between runs"


def test_bwd_deterministic_hot_blocks_m3_shape():
    # Many CTAs add into the same dK/dV rows: the case where fp32 atomics give run-dependent bits.
    q, k, v, sel = _m3_hot_blocks(seed=31)
    _check_bitwise(q, k, v, sel, 128, torch.bfloat16, seed=7)


@pytest.mark.parametrize("d,block_size", [(64, 64), (128, 64), (64, 128)])
def test_bwd_deterministic_caller_selections(d, block_size):
    dtype, sq, sk, topk = torch.float16, 259, 700, 6
    q, k, v = _inputs(2, sq, sk, 8, 2, d, dtype, seed=d + block_size)
    sel = random_selection(2, sq, sk, 2, topk, block_size, seed=block_size)
    dlse = torch.randn(2, 8, sq, device="cuda")
    _check_bitwise(q, k, v, sel, block_size, dtype, dlse=dlse, seed=3)


def test_bwd_deterministic_varlen_sparse_attn():
    lens = [1, 130, 517]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(9)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(sum(lens), 16, 64), mk(sum(lens), 1, 64), mk(sum(lens), 1, 64)
    q_idx, k_idx = mk(sum(lens), 1, 64), mk(sum(lens), 64)
    dout = mk(sum(lens), 16, 64)
    runs = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = msa_cuda.sparse_attn(*leaves, q_idx, k_idx, block_size=64, topk=4, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                   deterministic=True)
        runs.append(torch.autograd.grad((out.float() * dout.float()).sum(), leaves))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
