"""msa_cuda.sparse_attn_with_kvcache (MSA_SPEC s.8): a decoding step over a KV cache.

The decoding output of the new tokens must equal the last S_new rows of a full prefill of the
same sequence (sparse_attn over all L tokens): the selection and attention rules are per token,
so this checks the bottom-right alignment, the append and the cache addressing without using the
function's own definition. Contiguous and paged caches (pages in shuffled order), 1 and several
new tokens, mixed lengths including lengths shorter than one block, appending in place (and only
where asked), no-append calls, aux outputs, and argument errors. Runs on the CPU in float32 (and
on CUDA in bf16 when a GPU is present, where sparse_attn uses the kernels).
"""

import pytest
import torch

import msa_cuda

HQ, HKV, D, DI = 8, 2, 64, 64


def _devices():
    devs = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        devs.append(("cuda", torch.bfloat16))
    return devs


DEVICES = pytest.mark.parametrize("device,dtype", _devices(), ids=lambda x: str(x))


def _sequences(lengths, device, dtype, seed):
    """Full per-request sequences: q, k, v, q_idx, k_idx of length L_b each (index tensors x2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return [dict(q=mk(n, HQ, D), k=mk(n, HKV, D), v=mk(n, HKV, D), q_idx=2 * mk(n, HKV, DI), k_idx=2 * mk(n, DI))
            for n in lengths]


def _prefill_tail(seq, s_new, **kw):
    """Last s_new rows of a full prefill of one sequence (out [s_new, Hq, D], aux)."""
    out, aux = msa_cuda.sparse_attn(seq["q"][None], seq["k"][None], seq["v"][None], seq["q_idx"][None],
                                    seq["k_idx"][None], return_aux=True, **kw)
    return out[0, -s_new:], aux.block_indices[0, -s_new:], aux.lse[0, :, -s_new:]


def _caches(seqs, s_max, upto, paged_page_size, device, dtype, seed):
    """Caches holding the first upto[b] tokens of each sequence; the rest is random garbage.

    Returns (k_cache, v_cache, k_idx_cache, block_table or None)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    b = len(seqs)
    k_c = torch.randn(b, s_max, HKV, D, generator=g).to(device, dtype)
    v_c = torch.randn(b, s_max, HKV, D, generator=g).to(device, dtype)
    ki_c = torch.randn(b, s_max, DI, generator=g).to(device, dtype)
    for i, (seq, n) in enumerate(zip(seqs, upto)):
        k_c[i, :n], v_c[i, :n], ki_c[i, :n] = seq["k"][:n], seq["v"][:n], seq["k_idx"][:n]
    if paged_page_size is None:
        return k_c, v_c, ki_c, None
    pages_per = s_max // paged_page_size
    perm = torch.randperm(b * pages_per, generator=g)
    table = perm.view(b, pages_per).to(torch.int32)

    def page(x):
        flat = x.reshape(b * pages_per, paged_page_size, *x.shape[2:])
        out = torch.empty_like(flat)
        out[perm] = flat
        return out

    return page(k_c), page(v_c), page(ki_c), table.to(device)


def _close(a, b, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@DEVICES
@pytest.mark.parametrize("s_new", [1, 3])
@pytest.mark.parametrize("page_size", [None, 128], ids=["contiguous", "paged"])
@pytest.mark.parametrize("append", [True, False])
def test_decode_equals_prefill_tail(device, dtype, s_new, page_size, append):
    lengths = [5, 64, 130, 300]  # below one block, exactly one, partial last block, several
    bs, topk = 64, 3
    seqs = _sequences(lengths, device, dtype, seed=s_new + 10 * append)
    upto = [n - s_new for n in lengths] if append else lengths
    k_c, v_c, ki_c, table = _caches(seqs, 384, upto, page_size, device, dtype, seed=7)
    q = torch.stack([s["q"][-s_new:] for s in seqs])
    q_idx = torch.stack([s["q_idx"][-s_new:] for s in seqs])
    new = {}
    if append:
        new = dict(k=torch.stack([s["k"][-s_new:] for s in seqs]), v=torch.stack([s["v"][-s_new:] for s in seqs]),
                   k_idx=torch.stack([s["k_idx"][-s_new:] for s in seqs]))
    seqlens = torch.tensor(upto, dtype=torch.int32, device=device)
    out, aux = msa_cuda.sparse_attn_with_kvcache(q, k_c, v_c, q_idx, ki_c, cache_seqlens=seqlens, block_table=table,
                                                 block_size=bs, topk=topk, return_aux=True, **new)
    assert out.shape == q.shape and out.dtype == dtype
    assert aux.block_indices.shape == (len(lengths), s_new, HKV, topk) and aux.lse.shape == (len(lengths), HQ, s_new)
    assert torch.equal(seqlens, torch.tensor(upto, dtype=torch.int32, device=device))  # not advanced
    for b, seq in enumerate(seqs):
        want, want_sel, want_lse = _prefill_tail(seq, s_new, block_size=bs, topk=topk)
        _close(out[b], want, dtype)
        assert torch.equal(aux.block_indices[b], want_sel)
        _close(aux.lse[b], want_lse, dtype)


@DEVICES
def test_append_writes_only_the_new_positions(device, dtype):
    lengths, s_new, page = [10, 200], 4, 128
    seqs = _sequences(lengths, device, dtype, seed=3)
    upto = [n - s_new for n in lengths]
    for page_size in (None, page):
        k_c, v_c, ki_c, table = _caches(seqs, 256, upto, page_size, device, dtype, seed=5)
        before = [t.clone() for t in (k_c, v_c, ki_c)]
        new = dict(k=torch.stack([s["k"][-s_new:] for s in seqs]), v=torch.stack([s["v"][-s_new:] for s in seqs]),
                   k_idx=torch.stack([s["k_idx"][-s_new:] for s in seqs]))
        q = torch.stack([s["q"][-s_new:] for s in seqs])
        q_idx = torch.stack([s["q_idx"][-s_new:] for s in seqs])
        msa_cuda.sparse_attn_with_kvcache(q, k_c, v_c, q_idx, ki_c, block_table=table, block_size=64, topk=2,
                                          cache_seqlens=torch.tensor(upto, dtype=torch.int32, device=device), **new)
        for cache, old, name in ((k_c, before[0], "k"), (v_c, before[1], "v"), (ki_c, before[2], "k_idx")):
            written = torch.zeros(cache.shape[:2], dtype=torch.bool, device=device)
            for b, n in enumerate(upto):
                for i in range(s_new):
                    pos = n + i
                    if table is None:
                        row, col = b, pos
                    else:
                        row, col = int(table[b, pos // page]), pos % page
                    assert torch.equal(cache[row, col], new[name][b, i])
                    written[row, col] = True
            assert torch.equal(cache[~written], old[~written])


@pytest.mark.parametrize("page_size", [None, 128], ids=["contiguous", "paged"])
def test_fp8_index_cache_equals_dequantized_cache(page_size):
    """A step over an e4m3 index-key cache (+ scales) equals the step over the dequantized keys, and
    appends the new keys quantized (CPU: the reference path of the public function)."""
    lengths, s_new = [40, 300], 2
    seqs = _sequences(lengths, "cpu", torch.float32, seed=6)
    upto = [n - s_new for n in lengths]
    k_c, v_c, ki_c, table = _caches(seqs, 384, upto, page_size, "cpu", torch.float32, seed=3)
    keys, scales = msa_cuda.quantize_index_keys(ki_c)
    q = torch.stack([s["q"][-s_new:] for s in seqs])
    q_idx = torch.stack([s["q_idx"][-s_new:] for s in seqs])
    new = dict(k=torch.stack([s["k"][-s_new:] for s in seqs]), v=torch.stack([s["v"][-s_new:] for s in seqs]),
               k_idx=torch.stack([s["k_idx"][-s_new:] for s in seqs]))
    lens = torch.tensor(upto, dtype=torch.int32)
    kw = dict(cache_seqlens=lens, block_table=table, block_size=64, topk=3, return_aux=True)
    out, aux = msa_cuda.sparse_attn_with_kvcache(q, k_c.clone(), v_c.clone(), q_idx, keys, k_idx_scale_cache=scales,
                                                 **kw, **new)
    # The same step with a float32 index-key cache holding the dequantized keys (appended keys too).
    new_keys, new_scales = msa_cuda.quantize_index_keys(new["k_idx"])
    plain = msa_cuda.dequantize_index_keys(keys, scales)
    want_new = dict(new, k_idx=msa_cuda.dequantize_index_keys(new_keys, new_scales))
    want, want_aux = msa_cuda.sparse_attn_with_kvcache(q, k_c.clone(), v_c.clone(), q_idx, plain, **kw, **want_new)
    assert torch.equal(aux.block_indices, want_aux.block_indices)
    torch.testing.assert_close(out, want)
    assert torch.equal(msa_cuda.dequantize_index_keys(keys, scales), plain)  # appended in place, quantized


def test_fp8_index_cache_errors():
    args, kw = _args()
    keys, scales = msa_cuda.quantize_index_keys(args[4])
    with pytest.raises(ValueError, match="k_idx_scale_cache must be given exactly when"):
        msa_cuda.sparse_attn_with_kvcache(*args[:4], keys, **kw)
    with pytest.raises(ValueError, match="k_idx_scale_cache must be given exactly when"):
        msa_cuda.sparse_attn_with_kvcache(*args, k_idx_scale_cache=scales, **kw)
    with pytest.raises(TypeError, match="k_idx_scale_cache must be float32"):
        msa_cuda.sparse_attn_with_kvcache(*args[:4], keys, k_idx_scale_cache=scales.double(), **kw)
    with pytest.raises(ValueError, match="one scale per cached token"):
        msa_cuda.sparse_attn_with_kvcache(*args[:4], keys, k_idx_scale_cache=scales[:, :10], **kw)
    odd = [t[:, :255] for t in args[1:3]] + [args[3]]
    keys, scales = msa_cuda.quantize_index_keys(args[4][:, :255])
    with pytest.raises(ValueError, match="S_max must be a multiple of 4"):
        msa_cuda.sparse_attn_with_kvcache(args[0], *odd, keys, k_idx_scale_cache=scales, **kw)


def test_k_idx_head_dim_and_paged_index_cache_accepted():
    lengths, s_new = [70, 129], 1
    seqs = _sequences(lengths, "cpu", torch.float32, seed=4)
    k_c, v_c, ki_c, table = _caches(seqs, 256, lengths, 128, "cpu", torch.float32, seed=2)
    q = torch.stack([s["q"][-s_new:] for s in seqs])
    q_idx = torch.stack([s["q_idx"][-s_new:] for s in seqs])
    lens = torch.tensor(lengths, dtype=torch.int32)
    a = msa_cuda.sparse_attn_with_kvcache(q, k_c, v_c, q_idx, ki_c, cache_seqlens=lens, block_table=table,
                                          block_size=64, topk=2)
    b = msa_cuda.sparse_attn_with_kvcache(q, k_c, v_c, q_idx, ki_c[:, :, None], cache_seqlens=lens,
                                          block_table=table, block_size=64, topk=2)
    assert torch.equal(a, b)


def _args(batch=2, s_new=1, s_max=256, paged=False):
    q = torch.randn(batch, s_new, HQ, D)
    q_idx = torch.randn(batch, s_new, HKV, DI)
    if paged:
        k_c = torch.randn(2 * batch, 128, HKV, D)
        ki_c = torch.randn(2 * batch, 128, DI)
        table = torch.arange(2 * batch, dtype=torch.int32).view(batch, 2)
    else:
        k_c, ki_c, table = torch.randn(batch, s_max, HKV, D), torch.randn(batch, s_max, DI), None
    kw = dict(cache_seqlens=torch.full((batch,), 100, dtype=torch.int32), block_table=table, block_size=64, topk=2)
    return (q, k_c, k_c.clone(), q_idx, ki_c), kw


@pytest.mark.parametrize("change,exc,match", [
    (lambda a, kw: (a[0].new_zeros(2, 17, HQ, D),) + a[1:], ValueError, "q must have 1 to 16 new tokens"),
    (lambda a, kw: kw.update(cache_seqlens=kw["cache_seqlens"].long()), TypeError, "cache_seqlens must be int32"),
    (lambda a, kw: kw.update(cache_seqlens=kw["cache_seqlens"][:1]), ValueError, "cache_seqlens must have shape"),
    (lambda a, kw: kw.update(k=torch.randn(2, 1, HKV, D)), ValueError, "k, v and k_idx must be given together"),
    (lambda a, kw: kw.update(cache_seqlens=torch.tensor([100, 300], dtype=torch.int32)), ValueError,
     "exceeds the cache capacity"),
    (lambda a, kw: kw.update(cache_seqlens=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     "must leave at least S_new"),
    (lambda a, kw: (a[0], a[1], a[2][:, :, :1], a[3], a[4]), ValueError, "v_cache must have the same shape"),
    (lambda a, kw: (a[0], a[1], a[2], a[3][..., :32], a[4]), ValueError, "index head dim Di"),
    (lambda a, kw: kw.update(block_size=96), ValueError, "block_size"),
])
def test_errors_contiguous(change, exc, match):
    args, kw = _args()
    changed = change(args, kw)
    if changed is not None:
        args = changed
    with pytest.raises(exc, match=match):
        msa_cuda.sparse_attn_with_kvcache(*args, **kw)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a, kw: kw.update(block_table=kw["block_table"].long()), TypeError, "block_table must be int32"),
    (lambda a, kw: kw.update(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)), ValueError,
     r"block_table\[1\] must name pages"),
    (lambda a, kw: kw.update(block_size=128, topk=2) or (a[0], a[1][:, :96], a[2][:, :96], a[3], a[4][:, :96]),
     ValueError, "page size must be a multiple of block_size"),
])
def test_errors_paged(change, exc, match):
    args, kw = _args(paged=True)
    kw["cache_seqlens"] = torch.tensor([100, 200], dtype=torch.int32)
    changed = change(args, kw)
    if changed is not None:
        args = changed
    with pytest.raises(exc, match=match):
        msa_cuda.sparse_attn_with_kvcache(*args, **kw)


def test_quantize_index_keys_format():
    """e4m3 keys with a float32 scale per token: scale = max|k| / 448 (1 for a zero token), the
    largest element maps to +-448 exactly, and dequantizing is within e4m3's rounding (2^-4
    relative to each element, half an ulp of the smallest normal e4m3 step below that)."""
    g = torch.Generator().manual_seed(0)
    k_idx = torch.randn(3, 5, 64, generator=g) * torch.tensor([1e-3, 1.0, 300.0])[:, None, None]
    k_idx[1, 2] = 0.0
    keys, scales = msa_cuda.quantize_index_keys(k_idx)
    assert keys.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert keys.shape == k_idx.shape and scales.shape == k_idx.shape[:-1]
    assert scales[1, 2] == 1.0 and (keys[1, 2].float() == 0).all()
    amax = k_idx.abs().amax(-1)
    nonzero = amax > 0
    torch.testing.assert_close(scales[nonzero], amax[nonzero] * (1.0 / 448.0), rtol=0, atol=0)
    assert (keys.float().abs().amax(-1)[nonzero] == 448.0).all()
    back = msa_cuda.dequantize_index_keys(keys, scales)
    err = (back - k_idx).abs()
    assert (err <= k_idx.abs() * 2.0 ** -4 + scales[..., None] * 2.0 ** -10).all()
