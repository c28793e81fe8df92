"""SM90 decode kernels (issue 5): msa_cuda.sparse_attn_with_kvcache on the device path.

Every step is checked against the pure-PyTorch reference, request by request, on the request's
cached sequence: the selection by the spec's correctness rule (reference.check_selection, which
allows near-ties) and by agreement with reference.select_blocks; out and lse against
reference.block_sparse_attn (float32) over the kernel's own selection. Caches are filled with NaN
wherever no token was written, so a kernel that reads past a request's length (or a page it does
not own) poisons its output; outputs come from a poisoned allocator. Covered: dtype x D x Di x
block_size x G x S_new, topk 1..32, init/local blocks, contiguous and paged (shuffled pages), mixed
lengths from S_new to several thousand (many indexer splits), append in place, an M3-shaped long
request, and a decode step captured in a CUDA graph and replayed with new inputs.
"""

import itertools

import pytest
import torch

import msa_cuda
from msa_cuda import reference as ref

from gpu_utils import poison_allocator, requires_sm90

pytestmark = [pytest.mark.gpu, requires_sm90]


def _make_step(lengths, s_new, hq, hkv, d, di, dtype, page_size, append, seed, s_max=None, fp8=False):
    """Sequences of the given lengths; caches holding them (all but the last s_new tokens when
    `append`), NaN elsewhere. With `fp8` the index-key cache is e4m3 with per-token scales, and
    each sequence's k_idx becomes its dequantized keys (float32), which the reference then uses.
    Returns (sequences, step args, step kwargs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to("cuda", dtype)  # noqa: E731
    seqs = [dict(q=mk(n, hq, d), k=mk(n, hkv, d), v=mk(n, hkv, d), q_idx=mk(n, hkv, di), k_idx=mk(n, di))
            for n in lengths]
    batch = len(lengths)
    if s_max is None:
        s_max = max(lengths)
    if page_size is not None:
        s_max = -(-s_max // page_size) * page_size
    elif fp8:
        s_max = -(-s_max // 4) * 4  # an fp8 index-key cache needs S_max % 4 == 0
    nan = float("nan")
    k_c = torch.full((batch, s_max, hkv, d), nan, dtype=dtype, device="cuda")
    v_c = torch.full_like(k_c, nan)
    ki_c = torch.full((batch, s_max, di), nan, dtype=dtype, device="cuda")
    upto = [n - s_new if append else n for n in lengths]
    for b, (seq, n) in enumerate(zip(seqs, upto)):
        k_c[b, :n], v_c[b, :n], ki_c[b, :n] = seq["k"][:n], seq["v"][:n], seq["k_idx"][:n]
    table = None
    if page_size is not None:
        pages = s_max // page_size
        perm = torch.randperm(batch * pages, generator=g)
        table = perm.view(batch, pages).to(torch.int32).cuda()

        def paged(x):
            flat = x.reshape(batch * pages, page_size, *x.shape[2:])
            out = torch.empty_like(flat)
            out[perm.cuda()] = flat
            return out

        k_c, v_c, ki_c = paged(k_c), paged(v_c), paged(ki_c)
    q = torch.stack([s["q"][-s_new:] for s in seqs])
    q_idx = torch.stack([s["q_idx"][-s_new:] for s in seqs])
    kw = dict(cache_seqlens=torch.tensor(upto, dtype=torch.int32, device="cuda"), block_table=table)
    if append:
        kw.update(k=torch.stack([s["k"][-s_new:] for s in seqs]), v=torch.stack([s["v"][-s_new:] for s in seqs]),
                  k_idx=torch.stack([s["k_idx"][-s_new:] for s in seqs]))
    if fp8:
        ki_c, kw["k_idx_scale_cache"] = ref.quantize_index_keys(ki_c)
        for seq in seqs:
            seq["k_idx"] = ref.dequantize_index_keys(*ref.quantize_index_keys(seq["k_idx"]))
    return seqs, (q, k_c, v_c, q_idx, ki_c), kw


def _check_step(seqs, out, aux, s_new, *, block_size, topk, init_blocks=0, local_blocks=1, min_agree=0.9):
    agree, rows = 0, 0
    for b, seq in enumerate(seqs):
        sel = aux.block_indices[b:b + 1]
        q_idx = seq["q_idx"][None, -s_new:]
        k_idx = seq["k_idx"][None]
        kw = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
        problems = ref.check_selection(sel, q_idx, k_idx, **kw)
        assert not problems, f"request {b}:\n" + "\n".join(problems)
        expected = ref.select_blocks(q_idx, k_idx, **kw)
        agree += (sel == expected).all(dim=-1).sum().item()
        rows += sel[..., 0].numel()
        want, want_lse = ref.block_sparse_attn(seq["q"][None, -s_new:].float(), seq["k"][None].float(),
                                               seq["v"][None].float(), sel, block_size=block_size, return_lse=True)
        torch.testing.assert_close(out[b].float(), want[0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(aux.lse[b], want_lse[0], atol=2e-2, rtol=2e-2)
    assert agree >= min_agree * rows, f"only {agree}/{rows} rows equal the reference selection"


def _step(args, kw, **opts):
    q = args[0]
    poison_allocator(q.numel() * q.element_size() * 4 + (1 << 20))
    return msa_cuda.sparse_attn_with_kvcache(*args, return_aux=True, **kw, **opts)


CONFIGS = list(itertools.product([torch.bfloat16, torch.float16], [64, 128], [64, 128], [64, 128]))


@pytest.mark.parametrize("dtype,d,di,block_size", CONFIGS,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-di{c[2]}-bs{c[3]}" for c in CONFIGS])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_configs(dtype, d, di, block_size, paged):
    s_new, topk = 2, 5
    lengths = [2, 77, 1000, 2600]
    seqs, args, kw = _make_step(lengths, s_new, 8, 2, d, di, dtype, block_size * 2 if paged else None, True,
                                seed=d + di + block_size + paged)
    out, aux = _step(args, kw, block_size=block_size, topk=topk)
    _check_step(seqs, out, aux, s_new, block_size=block_size, topk=topk)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 4), (16, 4), (32, 4), (64, 4), (16, 1)])
@pytest.mark.parametrize("s_new", [1, 5, 16])
def test_decode_groups_and_new_tokens(hq, hkv, s_new):
    lengths = [s_new, 130, 3001]
    seqs, args, kw = _make_step(lengths, s_new, hq, hkv, 128, 128, torch.bfloat16, None, s_new % 2 == 1,
                                seed=hq * 100 + hkv * 10 + s_new)
    out, aux = _step(args, kw, block_size=128, topk=4)
    _check_step(seqs, out, aux, s_new, block_size=128, topk=4)


@pytest.mark.parametrize("topk,init_blocks,local_blocks", [(1, 0, 1), (7, 1, 2), (16, 0, 1), (32, 2, 3), (9, 0, 4)])
def test_decode_topk_and_forced_blocks(topk, init_blocks, local_blocks):
    lengths = [3, 500, 4100]
    s_new = 3
    seqs, args, kw = _make_step(lengths, s_new, 16, 2, 64, 64, torch.bfloat16, 64, True, seed=topk)
    out, aux = _step(args, kw, block_size=64, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    _check_step(seqs, out, aux, s_new, block_size=64, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)


@pytest.mark.parametrize("cluster_merge", ["1", "0"], ids=["cluster", "global"])
@pytest.mark.parametrize("hq,topk,lengths", [(64, 16, [70001]), (64, 16, [9000, 130]), (32, 16, [9000, 40]),
                                             (16, 5, [2, 77, 1000, 2600]), (32, 32, [9000]), (64, 8, [5000] * 12)])
def test_decode_chunk_merge_paths(monkeypatch, cluster_merge, hq, topk, lengths):
    """The attention's chunks of a row merge either inside a thread-block cluster (up to 16 CTAs,
    through distributed shared memory) or through global partials and the row's last CTA
    (MSA_DECODE_CLUSTER_MERGE=0; a row of more than 16 chunks; clusters the GPU cannot hold at
    once). Both against the reference: one M3 request (clusters of 16 CTAs), two requests (16 per
    row do not fit at once on an H200: 8 of 2 slots each), G = 8 and 4, topk 32 for one request
    (32 chunks of one slot on the global path, 16 of two in a cluster), and 48 rows (3 chunks per
    row would take 144 CTAs: 2 chunks of 4 slots)."""
    monkeypatch.setenv("MSA_DECODE_CLUSTER_MERGE", cluster_merge)
    s_new = 1
    seqs, args, kw = _make_step(lengths, s_new, hq, 4, 128, 128, torch.bfloat16, None, False, seed=topk + len(lengths))
    out, aux = _step(args, kw, block_size=128, topk=topk)
    _check_step(seqs, out, aux, s_new, block_size=128, topk=topk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("di,block_size", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_fp8_index_cache(dtype, di, block_size, paged):
    """e4m3 index-key cache with per-token scales: selection and output against the reference on
    the dequantized keys; the appended keys are quantized exactly as quantize_index_keys does."""
    s_new, topk = 3, 6
    lengths = [3, 200, 2900]
    seqs, args, kw = _make_step(lengths, s_new, 16, 2, 128, di, dtype, 2 * block_size if paged else None, True,
                                seed=di + block_size + paged, fp8=True)
    new_keys = kw["k_idx"].clone()
    out, aux = _step(args, kw, block_size=block_size, topk=topk)
    _check_step(seqs, out, aux, s_new, block_size=block_size, topk=topk)
    want_keys, want_scales = ref.quantize_index_keys(new_keys)
    ki_c, scales, table = args[4], kw["k_idx_scale_cache"], kw["block_table"]
    for b, n in enumerate(lengths):
        for i in range(s_new):
            pos = n - s_new + i
            row, col = (b, pos) if table is None else (int(table[b, pos // (2 * block_size)]), pos % (2 * block_size))
            assert torch.equal(ki_c[row, col].view(torch.uint8), want_keys[b, i].view(torch.uint8))
            assert scales[row, col] == want_scales[b, i]


def test_decode_m3_long_request():
    """M3 shape (Hq 64, Hkv 4, D = Di = 128, block 128, topk 16), one 70K-token request next to a
    short one, paged: many splits per request, lists merged over all of them."""
    lengths = [70001, 300]
    seqs, args, kw = _make_step(lengths, 1, 64, 4, 128, 128, torch.bfloat16, 256, True, seed=5)
    out, aux = _step(args, kw, block_size=128, topk=16)
    _check_step(seqs, out, aux, 1, block_size=128, topk=16, min_agree=0.75)


@pytest.mark.parametrize("length,batch", [(131072, 8), (131072 - 77, 8), (300001, 2)])
def test_decode_selection_full_lists_exact(length, batch):
    """M3-sized index caches (every indexer split's list full: 16 of 31 or more blocks), the
    selection checked exactly: the 15 non-forced blocks must be the top 15 by fp32 block score
    (lower id first on a tie), except where the scores differ by fp32 rounding only. A merge that
    drops a list's entry shows here (it did: the tournament merge on 33 and 132 full lists)."""
    hkv, di, bs, topk = 4, 128, 128, 16
    g = torch.Generator(device="cuda").manual_seed(length + batch)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    ki = mk(batch, length, di)
    q_idx = mk(batch, 1, hkv, di)
    k_c, v_c, q = mk(batch, length, hkv, 64), mk(batch, length, hkv, 64), mk(batch, 1, hkv, 64)
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    _, aux = msa_cuda.sparse_attn_with_kvcache(q, k_c, v_c, q_idx, ki, cache_seqlens=lens, block_size=bs,
                                               topk=topk, return_aux=True)
    local = (length - 1) // bs
    nblk = local + 1
    bad = []
    for b in range(batch):
        scores = ki[b].float() @ q_idx[b, 0].float().T  # [L, Hkv]
        pad = torch.full((nblk * bs - length, hkv), -float("inf"), device="cuda")
        block = torch.cat([scores, pad]).view(nblk, bs, hkv).amax(1)[:local]  # candidates only
        for h in range(hkv):
            order = torch.sort(-block[:, h], stable=True).indices
            want = set(order[:topk - 1].tolist())
            sel = aux.block_indices[b, 0, h].tolist()
            assert local in sel and -1 not in sel, sel
            got = set(sel) - {local}
            if got == want:
                continue
            tol = 1e-5 * block[:, h].abs().max().item()
            worst_picked = min(got - want, key=lambda x: block[x, h].item())
            best_missed = max(want - got, key=lambda y: block[y, h].item())
            if block[best_missed, h].item() - block[worst_picked, h].item() > tol:
                bad.append((b, h, worst_picked, round(block[worst_picked, h].item(), 4), best_missed,
                            round(block[best_missed, h].item(), 4)))
    assert not bad, f"{len(bad)} rows miss a top block (b, group, picked, its score, missed, its score): {bad[:5]}"


def test_decode_append_in_place_and_only_there():
    lengths, s_new = [40, 700], 3
    seqs, args, kw = _make_step(lengths, s_new, 8, 2, 64, 64, torch.bfloat16, 128, True, seed=9)
    before = [t.clone() for t in args[1:3] + args[4:5]]
    _step(args, kw, block_size=64, topk=4)
    table = kw["block_table"]
    for cache, old, name in zip((args[1], args[2], args[4]), before, ("k", "v", "k_idx")):
        written = torch.zeros(cache.shape[:2], dtype=torch.bool, device="cuda")
        for b, n in enumerate(lengths):
            for i in range(s_new):
                pos = n - s_new + i
                row, col = int(table[b, pos // 128]), pos % 128
                assert torch.equal(cache[row, col], kw[name][b, i])
                written[row, col] = True
        assert torch.equal(cache[~written].view(torch.int16), old[~written].view(torch.int16))  # NaNs too


def test_decode_matches_reference_step():
    """The whole step against reference.sparse_attn_with_kvcache (float32): rows whose selection
    equals the reference's (all but near-ties) have equal outputs."""
    lengths, s_new = [129, 2000], 2
    seqs, args, kw = _make_step(lengths, s_new, 16, 4, 128, 128, torch.bfloat16, None, False, seed=13)
    out, aux = _step(args, kw, block_size=128, topk=8)
    ref_args = [a.float() for a in args]
    ref_out, ref_aux = ref.sparse_attn_with_kvcache(*ref_args, block_size=128, topk=8, return_aux=True, **kw)
    same = (aux.block_indices == ref_aux.block_indices).all(-1).all(-1)  # [B, S_new]
    assert same.float().mean() > 0.7
    for b, i in zip(*torch.nonzero(same, as_tuple=True)):
        torch.testing.assert_close(out[b, i].float(), ref_out[b, i], atol=2e-2, rtol=2e-2)


def test_decode_fp8_m3_long_request():
    lengths = [50001, 129]
    seqs, args, kw = _make_step(lengths, 1, 64, 4, 128, 128, torch.bfloat16, None, False, seed=8, fp8=True)
    out, aux = _step(args, kw, block_size=128, topk=16)
    _check_step(seqs, out, aux, 1, block_size=128, topk=16, min_agree=0.75)


def test_decode_graph_capture_and_replay():
    """A decode step (append + select + attend) captured once and replayed for three steps with new
    inputs copied into the captured tensors equals the eager steps."""
    hq, hkv, d, di, bs, topk = 16, 4, 128, 128, 128, 8
    lengths = [1500, 300, 4000]
    s_new = 1
    seqs, args, kw = _make_step([n + 3 for n in lengths], s_new, hq, hkv, d, di, torch.bfloat16, 256, False,
                                seed=21)
    q, k_c, v_c, q_idx, ki_c = args
    table = kw["block_table"]
    # Caches hold the first L_b tokens; steps t = 0..2 append token L_b + t.
    g = torch.Generator(device="cpu").manual_seed(3)
    steps = []
    for t in range(3):
        mk = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
        steps.append(dict(q=mk(3, s_new, hq, d), q_idx=mk(3, s_new, hkv, di), k=mk(3, s_new, hkv, d),
                          v=mk(3, s_new, hkv, d), k_idx=mk(3, s_new, di),
                          lens=torch.tensor([n + t for n in lengths], dtype=torch.int32, device="cuda")))
    opts = dict(block_size=bs, topk=topk, return_aux=True)

    # Eager on copies of the caches.
    caches = [c.clone() for c in (k_c, v_c, ki_c)]
    eager = []
    for st in steps:
        eager.append(msa_cuda.sparse_attn_with_kvcache(st["q"], caches[0], caches[1], st["q_idx"], caches[2],
                                                       cache_seqlens=st["lens"], k=st["k"], v=st["v"],
                                                       k_idx=st["k_idx"], block_table=table, **opts))

    static = {name: torch.empty_like(steps[0][name]) for name in steps[0]}
    for name in static:
        static[name].copy_(steps[0][name])
    warm = [c.clone() for c in (k_c, v_c, ki_c)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (sets kernel attributes) on throw-away caches
        msa_cuda.sparse_attn_with_kvcache(static["q"], warm[0], warm[1], static["q_idx"], warm[2],
                                          cache_seqlens=static["lens"], k=static["k"], v=static["v"],
                                          k_idx=static["k_idx"], block_table=table, **opts)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_aux = msa_cuda.sparse_attn_with_kvcache(static["q"], k_c, v_c, static["q_idx"], ki_c,
                                                         cache_seqlens=static["lens"], k=static["k"], v=static["v"],
                                                         k_idx=static["k_idx"], block_table=table, **opts)
    for st, (e_out, e_aux) in zip(steps, eager):
        for name in static:
            static[name].copy_(st[name])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_aux.block_indices, e_aux.block_indices)
        assert torch.equal(g_out, e_out)
        assert torch.equal(g_aux.lse, e_aux.lse)
    for c, e in zip((k_c, v_c, ki_c), caches):
        assert torch.equal(c.view(torch.int16), e.view(torch.int16))


def test_decode_bad_lengths_stay_in_bounds():
    """Lengths past the capacity or below S_new are not checked on the kernel path (no host read);
    the kernels clamp them: the call finishes, outputs are finite or the documented empty row."""
    lengths, s_new = [300, 300], 2
    seqs, args, kw = _make_step(lengths, s_new, 8, 2, 64, 64, torch.bfloat16, 128, False, seed=1)
    kw["cache_seqlens"] = torch.tensor([10**6, 1], dtype=torch.int32, device="cuda")
    out, aux = _step(args, kw, block_size=64, topk=4)
    torch.cuda.synchronize()
    # Request 1 has one token for two queries: the first sees nothing (out 0, lse -inf), the
    # second sees token 0 only.
    assert torch.equal(aux.block_indices[1, 0], torch.full_like(aux.block_indices[1, 0], -1))
    assert (out[1, 0] == 0).all() and torch.isneginf(aux.lse[1, :, 0]).all()
    assert torch.equal(aux.block_indices[1, 1, :, 0], torch.zeros_like(aux.block_indices[1, 1, :, 0]))
    assert torch.isfinite(out[1, 1].float()).all()
    assert torch.ones(1, device="cuda").item() == 1  # the context is still usable
