"""The GPU check of a selection's values (validate=True): torch.ops.msa_cuda_kernels.check_block_indices.

Its two flags (an id below -1 or past its sequence's blocks; a (token, group) row repeating an id)
are compared with the same facts computed here in PyTorch, over random selections with planted
errors: padded batches and varlen (sequences of different lengths, one of them empty), topk 1 to
32, both block sizes. Through the public API, a bad selection raises the same ValueError as on
the CPU, and a valid one passes.
"""

import itertools

import pytest
import torch

import msa_cuda

from gpu_utils import requires_sm90

pytestmark = [pytest.mark.gpu, requires_sm90]

DEVICE = "cuda"


def _kernel_flags(sel, block_size, seqlen_k=0, cu_q=None, cu_k=None):
    return torch.ops.msa_cuda_kernels.check_block_indices(sel, cu_q, cu_k, seqlen_k, block_size).tolist()


def _expected_flags(sel, limits):
    """limits: blocks of each row's sequence, broadcastable to sel[..., 0]."""
    ids = sel.long()
    out_of_range = bool(((ids < -1) | (ids >= limits[..., None])).any())
    ordered = ids.sort(dim=-1).values
    repeated = bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any())
    return [int(out_of_range), int(repeated)]


def _random_ids(shape, limits, topk, gen):
    """Distinct ids per row in [0, limit) where possible, -1 padded."""
    rows = torch.full((*shape, topk), -1, dtype=torch.int32)
    flat_rows, flat_limits = rows.view(-1, topk), limits.expand(shape).reshape(-1)
    for r in range(flat_rows.shape[0]):
        n = min(topk, int(flat_limits[r]))
        n = int(torch.randint(0, n + 1, (1,), generator=gen))
        flat_rows[r, :n] = torch.randperm(int(flat_limits[r]), generator=gen)[:n].to(torch.int32)
    return rows


def _plant(sel, kind, gen):
    """One planted error of `kind` in a random row (or none)."""
    sel = sel.clone()
    flat = sel.view(-1, sel.shape[-1])
    r = int(torch.randint(0, flat.shape[0], (1,), generator=gen))
    s = int(torch.randint(0, flat.shape[1], (1,), generator=gen))
    if kind == "too_large":
        flat[r, s] = 1 << 20
    elif kind == "below_minus_one":
        flat[r, s] = -2
    elif kind == "repeat":
        flat[r, 0], flat[r, flat.shape[1] - 1] = 0, 0  # (with topk 1 a single slot: no repeat)
    return sel


@pytest.mark.parametrize("kind", ["none", "too_large", "below_minus_one", "repeat"])
@pytest.mark.parametrize("topk", [1, 5, 16, 32])
@pytest.mark.parametrize("block_size", [64, 128])
def test_padded(kind, topk, block_size):
    gen = torch.Generator().manual_seed(topk * 7 + block_size)
    b, sq, hkv, sk = 2, 37, 3, 1000
    nblk = -(-sk // block_size)
    sel = _plant(_random_ids((b, sq, hkv), torch.tensor(nblk), topk, gen), kind, gen)
    want = _expected_flags(sel, torch.tensor(nblk))
    assert _kernel_flags(sel.to(DEVICE), block_size, seqlen_k=sk) == want


@pytest.mark.parametrize("kind", ["none", "too_large", "repeat", "past_own_sequence"])
@pytest.mark.parametrize("topk", [3, 16])
def test_varlen(kind, topk):
    gen = torch.Generator().manual_seed(topk + len(kind))
    block_size, hkv = 64, 2
    lens_q, lens_k = [5, 0, 130, 1], [700, 3, 130, 65]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q))
    limits = torch.tensor([-(-n // block_size) for n in lens_k])[seq_of_token][:, None]  # [Tq, 1]
    sel = _random_ids((sum(lens_q), hkv), limits, topk, gen)
    if kind == "past_own_sequence":
        # An id valid in the first (long) sequence but not in the last (two blocks).
        sel[-1, 0, 0] = 5
    else:
        sel = _plant(sel, kind, gen)
    want = _expected_flags(sel, limits)
    got = _kernel_flags(sel.to(DEVICE), block_size, cu_q=cu_q.to(DEVICE), cu_k=cu_k.to(DEVICE))
    assert got == want
    if kind != "none":
        assert want != [0, 0]


def test_many_rows_grid_stride():
    # More rows than one pass of the grid (4096 CTAs x 8 rows): the error sits in the last row.
    b, sq, hkv, topk, block_size, sk = 1, 20000, 4, 16, 128, 20000
    nblk = -(-sk // block_size)
    base = torch.arange(topk, dtype=torch.int32, device=DEVICE).expand(b, sq, hkv, topk).contiguous()
    assert _kernel_flags(base, block_size, seqlen_k=sk) == [0, 0]
    bad = base.clone()
    bad[0, -1, -1, -1] = nblk
    assert _kernel_flags(bad, block_size, seqlen_k=sk) == [1, 0]
    dup = base.clone()
    dup[0, -1, -1, 0] = 5
    assert _kernel_flags(dup, block_size, seqlen_k=sk) == [0, 1]


def test_public_api_uses_the_kernel(monkeypatch):
    # A valid selection never reaches the PyTorch pass; a bad one does (to name the entry).
    from msa_cuda import _validation
    calls = []
    torch_pass = _validation.check_block_indices_values_torch

    def counted(*args):
        calls.append(1)
        return torch_pass(*args)

    monkeypatch.setattr(_validation, "check_block_indices_values_torch", counted)
    lens = [70, 130]
    cu = torch.tensor([0, 70, 200], dtype=torch.int32, device=DEVICE)
    q = torch.randn(200, 4, 64, dtype=torch.float16, device=DEVICE)
    k, v = torch.randn(200, 2, 64, dtype=torch.float16, device=DEVICE), torch.randn(200, 2, 64, dtype=torch.float16,
                                                                                   device=DEVICE)
    sel = torch.full((200, 2, 3), -1, dtype=torch.int32, device=DEVICE)
    sel[:, :, 0] = 0
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens), block_size=64)
    msa_cuda.block_sparse_attn(q, k, v, sel, **varlen)
    assert calls == []
    bad = sel.clone()
    bad[10, 1, 2] = 2  # the first sequence (70 keys) has blocks 0 and 1 only
    with pytest.raises(ValueError, match=r"block ids in \[0, 2\).*got 2 at index \[10, 1, 2\]"):
        msa_cuda.block_sparse_attn(q, k, v, bad, **varlen)
    assert calls == [1]


def test_public_api_raises_and_passes():
    gen = torch.Generator(device="cpu").manual_seed(3)
    q = torch.randn(1, 300, 4, 64, dtype=torch.bfloat16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 300, 2, 64, dtype=torch.bfloat16, generator=gen).to(DEVICE) for _ in range(2))
    sel = _random_ids((1, 300, 2), torch.tensor(5), 4, gen).to(DEVICE)
    out = msa_cuda.block_sparse_attn(q, k, v, sel, block_size=64)
    assert out.shape == q.shape and torch.isfinite(out.float()).all()
    bad = sel.clone()
    bad[0, 7, 1, 2] = 5
    with pytest.raises(ValueError, match=r"block_indices must hold -1 or block ids in \[0, 5\).*got 5 at index \[0, 7, 1, 2\]"):
        msa_cuda.block_sparse_attn(q, k, v, bad, block_size=64)
    dup = sel.clone()
    dup[0, 11, 0] = torch.tensor([1, 1, -1, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"must not repeat a block id within one \(query, group\) row; row \[0, 11, 0\]"):
        msa_cuda.block_sparse_attn(q, k, v, dup, block_size=64)


def test_empty_and_shapes():
    empty = torch.empty(1, 0, 2, 4, dtype=torch.int32, device=DEVICE)
    assert _kernel_flags(empty, 64, seqlen_k=10) == [0, 0]
    with pytest.raises(RuntimeError, match="topk"):
        _kernel_flags(torch.zeros(1, 3, 2, 33, dtype=torch.int32, device=DEVICE), 64, seqlen_k=5000)
