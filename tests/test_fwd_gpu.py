"""The SM90 block-sparse attention forward against the reference (MSA_SPEC s.5).

Outputs are compared with the fp32 reference on the same bf16/fp16 inputs; rows with no visible
key must give out = 0 and lse = -inf exactly. The kernel's output allocation is poisoned first.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import msa_cuda
from msa_cuda import reference as ref

from gpu_utils import poison_allocator, random_selection, requires_sm90

pytestmark = [pytest.mark.gpu, requires_sm90]

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


# A partial budget of 256 KiB splits these tests' queries into many chunks (a plan, main kernel and
# combine each), as long sequences are split at the default budget of 2 GiB.
CHUNKED = {"MSA_CUDA_FWD_PATH": "kv_outer", "MSA_FWD_PARTIAL_KIB": "256"}


@pytest.fixture(params=["kv_outer", "query_outer", "kv_outer_chunked"])
def fwd_path(request, monkeypatch):
    """Runs a test on both forward kernels (query-outer needs <= 32 key blocks per sequence), and
    on the KV-outer one with many query chunks."""
    if request.param == "kv_outer_chunked":
        for name, value in CHUNKED.items():
            monkeypatch.setenv(name, value)
    else:
        monkeypatch.setenv("MSA_CUDA_FWD_PATH", request.param)
    return request.param


def _kernel_fwd(q, k, v, sel, block_size, scale=None, cu_q=None, cu_k=None, max_k=0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    poison_allocator(q.numel() * q.element_size() + q.numel() // q.shape[-1] * 4)
    return torch.ops.msa_cuda_kernels.block_sparse_attn_fwd(
        q, k, v, sel, cu_q, cu_k, max_k if cu_q is not None else k.shape[1], block_size, scale)


def _inputs(b, sq, sk, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d)


def _assert_close(out, lse, ref_out, ref_lse, dtype):
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead), "rows without a visible key differ"
    assert torch.isfinite(out).all(), "non-finite output"
    torch.testing.assert_close(lse[~dead], ref_lse[~dead], atol=2e-3, rtol=0)
    err = (out.float() - ref_out.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3e} > {TOL[dtype]:.1e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("g_size", [1, 2, 4, 8, 16])
def test_fwd_selected_by_the_indexer(dtype, d, block_size, g_size, fwd_path):
    hkv = 2 if g_size < 16 else 1
    sq, sk = 333, 777
    q, k, v = _inputs(2, sq, sk, hkv * g_size, hkv, d, dtype, seed=g_size * d + block_size)
    q_idx = torch.randn(2, sq, hkv, 64, device="cuda", dtype=dtype)
    k_idx = torch.randn(2, sk, 64, device="cuda", dtype=dtype)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=block_size, topk=5)
    out, lse = _kernel_fwd(q, k, v, sel, block_size)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, sel, block_size=block_size, return_lse=True)
    _assert_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 300), (37, 37), (113, 203), (130, 129 + 130), (256, 256)])
@pytest.mark.parametrize("topk", [1, 3, 16, 32])
def test_fwd_caller_selections_odd_lengths(sq, sk, topk, fwd_path):
    dtype, block_size = torch.bfloat16, 64
    q, k, v = _inputs(2, sq, sk, 8, 2, 128, dtype, seed=sq * 31 + sk + topk)
    sel = random_selection(2, sq, sk, 2, topk, block_size, seed=sq + topk)
    out, lse = _kernel_fwd(q, k, v, sel, block_size)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, sel, block_size=block_size, return_lse=True)
    _assert_close(out, lse, ref_out, ref_lse, dtype)
    # order of the slots does not matter
    out2, lse2 = _kernel_fwd(q, k, v, sel.flip(-1).contiguous(), block_size)
    torch.testing.assert_close(out2, out, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("block_size", [64, 128])
def test_fwd_full_coverage_equals_dense_causal(block_size, fwd_path):
    sq, sk, hq, hkv, d = 200, 700, 16, 4, 128
    q, k, v = _inputs(1, sq, sk, hq, hkv, d, torch.bfloat16, seed=7)
    nblk = -(-sk // block_size)
    sel = torch.arange(nblk, device="cuda", dtype=torch.int32).expand(1, sq, hkv, nblk).contiguous()
    out, lse = _kernel_fwd(q, k, v, sel, block_size)
    pos = torch.arange(sq, device="cuda")[:, None] + (sk - sq)
    mask = torch.arange(sk, device="cuda")[None, :] <= pos
    dense = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().repeat_interleave(hq // hkv, 2).transpose(1, 2),
        v.float().repeat_interleave(hq // hkv, 2).transpose(1, 2), attn_mask=mask).transpose(1, 2)
    assert (out.float() - dense).abs().max().item() <= TOL[torch.bfloat16]


def test_fwd_varlen_matches_padded(fwd_path):
    torch.manual_seed(3)
    lens_q, lens_k = [1, 77, 300, 5], [1, 200, 300, 900]
    hq, hkv, d, bs, topk = 32, 4, 64, 64, 8
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q_idx = torch.randn(sum(lens_q), hkv, 64, device="cuda", dtype=torch.float16)
    k_idx = torch.randn(sum(lens_k), 64, device="cuda", dtype=torch.float16)
    sel = msa_cuda.select_blocks(q_idx, k_idx, block_size=bs, topk=topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse = _kernel_fwd(q, k, v, sel, bs, cu_q=cu_q, cu_k=cu_k, max_k=max(lens_k))
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, sel, block_size=bs, cu_seqlens_q=cu_q,
                                             cu_seqlens_k=cu_k, return_lse=True)
    _assert_close(out, lse, ref_out, ref_lse, torch.float16)
    for b in range(len(lens_q)):
        qs, ks = cu_q[b].item(), cu_k[b].item()
        o1, l1 = _kernel_fwd(q[qs:qs + lens_q[b]][None].contiguous(), k[ks:ks + lens_k[b]][None].contiguous(),
                             v[ks:ks + lens_k[b]][None].contiguous(), sel[qs:qs + lens_q[b]][None].contiguous(), bs)
        assert torch.equal(o1[0], out[qs:qs + lens_q[b]])
        assert torch.equal(l1[0], lse[:, qs:qs + lens_q[b]])


def test_fwd_m3_shape_several_query_chunks_and_public_api():
    # 20K queries at M3 shape need 3 query chunks of partial outputs (2 GiB each).
    s, hq, hkv, d = 20000, 64, 4, 128
    q, k, v = _inputs(1, s, s, hq, hkv, d, torch.bfloat16, seed=11)
    q_idx = torch.randn(1, s, hkv, 128, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, s, 128, device="cuda", dtype=torch.bfloat16)
    out, aux = msa_cuda.sparse_attn(q, k, v, q_idx, k_idx, return_aux=True)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, aux.block_indices, return_lse=True)
    _assert_close(out, aux.lse, ref_out, ref_lse, torch.bfloat16)
    again, lse_again = _kernel_fwd(q, k, v, aux.block_indices, 128)
    assert torch.equal(again, out) and torch.equal(lse_again, aux.lse), "forward is not deterministic"


@pytest.mark.parametrize("topk", [3, 16])
def test_fwd_many_chunks_one_head(topk, monkeypatch):
    # Hq = 1: four equal chunks of 251 tokens; -1 padded slots and blocks past the query.
    for name, value in CHUNKED.items():
        monkeypatch.setenv(name, value)
    sq = sk = 1001
    q, k, v = _inputs(1, sq, sk, 1, 1, 64, torch.bfloat16, seed=topk)
    sel = random_selection(1, sq, sk, 1, topk, 64, seed=topk + 1)
    out, lse = _kernel_fwd(q, k, v, sel, 64)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, sel, block_size=64, return_lse=True)
    _assert_close(out, lse, ref_out, ref_lse, torch.bfloat16)
    monkeypatch.delenv("MSA_FWD_PARTIAL_KIB")
    whole, whole_lse = _kernel_fwd(q, k, v, sel, 64)
    assert torch.equal(whole, out) and torch.equal(whole_lse, lse), "chunked and one-chunk results differ"


def _dense_causal(q, k, v):
    """fp32 dense causal attention, bottom-right aligned, GQA by repetition."""
    sq, sk, g = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    pos = torch.arange(sq, device="cuda")[:, None] + (sk - sq)
    mask = torch.arange(sk, device="cuda")[None, :] <= pos
    return F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().repeat_interleave(g, 2).transpose(1, 2),
        v.float().repeat_interleave(g, 2).transpose(1, 2), attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("g_size", [1, 2, 4, 8, 16])
def test_fwd_short_context_auto_path_equals_dense(dtype, d, block_size, g_size, monkeypatch):
    # Sk <= topk x block_size: every visible block is selected and the default (auto) path is the
    # query-outer kernel; 32 key blocks with the last partial, Sq < Sk (bottom-right aligned).
    monkeypatch.delenv("MSA_CUDA_FWD_PATH", raising=False)
    hkv = 2 if g_size < 16 else 1
    topk = 32
    sk = topk * block_size - 37
    sq = 301 if d == 128 else 1000
    q, k, v = _inputs(1, sq, sk, hkv * g_size, hkv, d, dtype, seed=d + block_size + g_size)
    nblk = -(-sk // block_size)
    # every block, shuffled per token, with blocks past the query left in (the mask drops them)
    sel = torch.stack([torch.randperm(nblk) for _ in range(sq * hkv)]).view(1, sq, hkv, nblk)
    sel = sel.to(device="cuda", dtype=torch.int32).contiguous()
    out, lse = _kernel_fwd(q, k, v, sel, block_size)
    dense = _dense_causal(q, k, v)
    err = (out.float() - dense).abs().max().item()
    assert torch.isfinite(lse).all()
    assert err <= TOL[dtype], f"max abs error {err:.3e} > {TOL[dtype]:.1e}"
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, sel, block_size=block_size, return_lse=True)
    _assert_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("g_size", [1, 8])
def test_fwd_paths_agree_on_sparse_selections(g_size, monkeypatch):
    # Sparse, incoherent caller selections (the query-outer kernel walks the union of a tile's
    # blocks and masks per row) and rows with no selected block at all: both kernels agree.
    dtype, d, bs, topk = torch.bfloat16, 128, 64, 4
    hkv = 2
    sq, sk = 500, 32 * bs
    q, k, v = _inputs(1, sq, sk, hkv * g_size, hkv, d, dtype, seed=99 + g_size)
    sel = random_selection(1, sq, sk, hkv, topk, bs, seed=5)
    sel[0, ::7] = -1  # some tokens select nothing: out 0, lse -inf
    results = {}
    for path in ("kv_outer", "query_outer"):
        monkeypatch.setenv("MSA_CUDA_FWD_PATH", path)
        results[path] = _kernel_fwd(q, k, v, sel, bs)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, sel, block_size=bs, return_lse=True)
    for out, lse in results.values():
        _assert_close(out, lse, ref_out, ref_lse, dtype)
    assert torch.isneginf(results["query_outer"][1][:, :, ::7]).all()
    assert (results["query_outer"][0][0, ::7] == 0).all()


def test_fwd_short_context_varlen_batch(monkeypatch):
    # Several short sequences of mixed lengths through the public API on the auto path.
    monkeypatch.delenv("MSA_CUDA_FWD_PATH", raising=False)
    lens = [5, 700, 1, 129, 1024]
    hq, hkv, d, bs, topk = 16, 2, 128, 64, 16
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens), hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens), hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_idx = torch.randn(sum(lens), hkv, 64, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(sum(lens), 64, device="cuda", dtype=torch.bfloat16)
    out, aux = msa_cuda.sparse_attn(q, k, v, q_idx, k_idx, block_size=bs, topk=topk, cu_seqlens_q=cu,
                                    cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens),
                                    return_aux=True)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, aux.block_indices, block_size=bs, cu_seqlens_q=cu,
                                             cu_seqlens_k=cu, return_lse=True)
    _assert_close(out, aux.lse, ref_out, ref_lse, torch.bfloat16)
