"""Tests of ``msa_cuda.reference`` against independent brute-force formulations (CPU only).

The brute-force versions below work on one sequence at a time with dense ``Sq x Sk`` matrices and
per-query Python loops, straight from the wording of MSA_SPEC.md, at tiny sizes.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from msa_cuda import reference as ref


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Brute-force formulations (one sequence, float64)
# ----------------------------------------------------------------------------------------------


def brute_block_scores(qi, ki, bs, scale):
    """qi [Sq, H, Di], ki [Sk, Di] -> [Sq, H, nblk]: max over visible keys of each block."""
    sq, h, _ = qi.shape
    sk = ki.shape[0]
    s = torch.einsum("ihd,jd->ihj", qi.double(), ki.double()) * scale
    nblk = -(-sk // bs)
    out = torch.full((sq, h, nblk), -math.inf, dtype=torch.float64)
    for i in range(sq):
        p = sk - sq + i
        for b in range(nblk):
            hi = min((b + 1) * bs, p + 1)
            if hi > b * bs:
                out[i, :, b] = s[i, :, b * bs:hi].amax(-1)
    return out


def brute_select(scores, sk, bs, topk, init, local):
    """scores [Sq, H, nblk] -> int32 [Sq, H, topk], row by row."""
    sq, h, _ = scores.shape
    out = torch.full((sq, h, topk), -1, dtype=torch.int32)
    for i in range(sq):
        loc = (sk - sq + i) // bs
        forced = set(range(min(init, loc + 1))) | set(range(max(0, loc - max(1, local) + 1),
                                                             loc + 1))
        for g in range(h):
            rest = sorted((b for b in range(loc + 1) if b not in forced),
                          key=lambda b: (-scores[i, g, b].item(), b))
            chosen = sorted(forced | set(rest[:min(topk, loc + 1) - len(forced)]))
            out[i, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def brute_attention(q, k, v, sel, bs, scale):
    """q [Sq, Hq, D], k, v [Sk, Hkv, D], sel [Sq, Hkv, topk] -> out [Sq, Hq, D], lse [Hq, Sq]."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    g_size = hq // hkv
    allowed = torch.zeros(sq, hkv, sk, dtype=torch.bool)
    for i in range(sq):
        p = sk - sq + i
        for g in range(hkv):
            for b in sel[i, g].tolist():
                if b >= 0:
                    allowed[i, g, b * bs:min((b + 1) * bs, p + 1)] = True
    kk = k.double().repeat_interleave(g_size, 1)
    vv = v.double().repeat_interleave(g_size, 1)
    logits = torch.einsum("ihd,jhd->hij", q.double(), kk) * scale
    logits = logits.masked_fill(~allowed.repeat_interleave(g_size, 1).permute(1, 0, 2),
                                -math.inf)
    lse = torch.logsumexp(logits, -1)
    prob = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", prob, vv), lse


def brute_kl(q, k, qi, ki, sel, bs, scale, iscale, dense):
    """One sequence: (sum of KL over (i, g), dKL/ds [Sq, Hkv, Sk] = Q - P on the support)."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    g_size = hq // hkv
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros(sq, hkv, sk, dtype=torch.float64)
    for i in range(sq):
        p = sk - sq + i
        for g in range(hkv):
            if dense:
                support = list(range(p + 1))
            else:
                support = sorted({j for b in sel[i, g].tolist() if b >= 0
                                  for j in range(b * bs, min((b + 1) * bs, p + 1))})
            if not support:
                continue
            idx = torch.tensor(support)
            teacher = torch.stack([
                torch.softmax(scale * (k[idx, g].double() @ q[i, h].double()), 0)
                for h in range(g * g_size, (g + 1) * g_size)]).mean(0)
            student = torch.softmax(iscale * (ki[idx].double() @ qi[i, g].double()), 0)
            pos = teacher > 0
            total += (teacher[pos] * (teacher[pos].log() - student[pos].log())).sum()
            grad[i, g, idx] = student - teacher
    return total, grad


def random_selection(gen, sq, sk, hkv, topk, bs, drop=0.3):
    """Unsorted ids in [0, nblk) (visible or not) with -1 holes anywhere."""
    nblk = -(-sk // bs)
    sel = torch.full((sq, hkv, topk), -1, dtype=torch.int32)
    for i in range(sq):
        for g in range(hkv):
            ids = torch.randperm(nblk, generator=gen)[:topk]
            keep = torch.rand(ids.shape[0], generator=gen) > drop
            slots = torch.randperm(topk, generator=gen)[:ids.shape[0]]
            sel[i, g, slots[keep]] = ids[keep].int()
    return sel


def sort_selection(sel):
    """Ascending ids as a prefix, -1 after (the canonical form)."""
    big = torch.iinfo(torch.int32).max
    out = torch.where(sel >= 0, sel, big).sort(-1).values
    return torch.where(out == big, -1, out)


def assert_same_selection(got, want, scores):
    """Equal selections, except rows whose differing blocks tie in score to 1e-9 relative."""
    for i, g in (got != want).any(-1).nonzero().tolist():
        a, b = got[i, g], want[i, g]
        assert (a >= 0).sum() == (b >= 0).sum(), (i, g, a, b)
        sa = scores[i, g, a[a >= 0].long()].sort().values
        sb = scores[i, g, b[b >= 0].long()].sort().values
        torch.testing.assert_close(sa, sb, rtol=1e-9, atol=1e-9, msg=f"row {(i, g)}: {a} vs {b}")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def test_helpers():
    assert ref.query_positions(3, 10).tolist() == [7, 8, 9]
    assert ref.num_blocks(1, 64) == 1 and ref.num_blocks(128, 64) == 2
    assert ref.num_blocks(129, 64) == 3
    loc = torch.tensor([0, 3, 9])
    m = ref.forced_mask(loc, 10, init_blocks=2, local_blocks=3)
    assert m[0].nonzero().flatten().tolist() == [0]
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert m[2].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert torch.equal(ref.forced_mask(loc, 10, local_blocks=0), ref.forced_mask(loc, 10))


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------

SELECT_CASES = [
    # sq, sk, bs, topk, init, local, hkv, di
    (1, 1, 64, 1, 0, 1, 1, 64),
    (5, 37, 64, 4, 0, 1, 2, 64),
    (37, 37, 128, 16, 0, 1, 1, 128),
    (40, 50, 128, 2, 0, 1, 1, 64),
    (50, 131, 64, 2, 0, 1, 3, 64),
    (65, 129, 64, 1, 0, 1, 2, 64),
    (129, 200, 128, 2, 1, 1, 2, 64),
    (129, 200, 64, 3, 0, 2, 4, 128),
    (300, 300, 64, 3, 1, 2, 2, 64),
    (300, 300, 64, 4, 0, 1, 2, 64),
    (300, 300, 64, 2, 0, 0, 1, 64),
    (1, 300, 64, 3, 2, 1, 2, 64),
    (17, 283, 64, 8, 1, 1, 4, 64),
    (100, 290, 64, 32, 2, 3, 2, 64),
    (7, 290, 128, 2, 1, 1, 1, 128),
]


@pytest.mark.parametrize("sq,sk,bs,topk,init,local,hkv,di", SELECT_CASES)
def test_select_matches_brute_force(sq, sk, bs, topk, init, local, hkv, di):
    gen = torch.Generator().manual_seed(sq * 1000 + sk + topk)
    qi, ki = randn(gen, 1, sq, hkv, di), randn(gen, 1, sk, di)
    sel = ref.select_blocks(qi, ki, block_size=bs, topk=topk, init_blocks=init,
                            local_blocks=local)
    assert sel.dtype == torch.int32 and sel.shape == (1, sq, hkv, topk)
    scores = brute_block_scores(qi[0], ki[0], bs, 1 / math.sqrt(di))
    torch.testing.assert_close(ref.block_scores(qi, ki, block_size=bs)[0], scores.float())
    assert_same_selection(sel[0], brute_select(scores, sk, bs, topk, init, local), scores)
    assert ref.check_selection(sel, qi, ki, block_size=bs, topk=topk, init_blocks=init,
                               local_blocks=local) == []


@pytest.mark.parametrize("bs,topk,init", [(64, 2, 0), (64, 3, 1), (128, 2, 0)])
def test_select_integer_scores_ties_exact(bs, topk, init):
    """Small integer inputs make scores exact and ties frequent: the lower block id must win."""
    gen = torch.Generator().manual_seed(bs + topk)
    sq, sk, hkv, di = 90, 350, 3, 64
    qi = torch.randint(-1, 2, (1, sq, hkv, di), generator=gen).float()
    ki = torch.randint(-1, 2, (1, sk, di), generator=gen).float()
    sel = ref.select_blocks(qi, ki, block_size=bs, topk=topk, index_scale=1.0, init_blocks=init)
    scores = brute_block_scores(qi[0], ki[0], bs, 1.0)
    assert torch.equal(sel[0], brute_select(scores, sk, bs, topk, init, 1))


def test_select_tie_breaking_constructed():
    bs, di = 64, 64
    values = [0.0, 5.0, 1.0, 2.0, 5.0, 3.0]  # blocks 1 and 4 tie for the best score
    ki = torch.tensor(values).repeat_interleave(bs)[:, None].expand(-1, di)[None]
    sk = ki.shape[1]
    qi = torch.ones(1, 2, 1, di)  # queries at the last positions of blocks 4 and 5
    sk_q = torch.tensor([5 * bs - 1, sk - 1])
    for topk, want in [(2, [[1, 4], [1, 5]]), (3, [[1, 3, 4], [1, 4, 5]])]:
        got = [ref.select_blocks(qi[:, :1], ki[:, :p + 1], block_size=bs, topk=topk,
                                 index_scale=1.0)[0, 0, 0].tolist() for p in sk_q.tolist()]
        assert got == want, (topk, got)
    flat = torch.ones(1, sk, di)  # every block ties: lowest ids win
    got = ref.select_blocks(qi[:, :1], flat, block_size=bs, topk=3, index_scale=1.0)
    assert got[0, 0, 0].tolist() == [0, 1, 5]


def test_select_local_blocks_zero_means_one():
    gen = torch.Generator().manual_seed(3)
    qi, ki = randn(gen, 2, 40, 2, 64), randn(gen, 2, 300, 64)
    a = ref.select_blocks(qi, ki, block_size=64, topk=3, local_blocks=0)
    b = ref.select_blocks(qi, ki, block_size=64, topk=3, local_blocks=1)
    assert torch.equal(a, b)


def test_select_padded_batch_and_head_dim_layout():
    gen = torch.Generator().manual_seed(4)
    qi, ki = randn(gen, 2, 33, 2, 64), randn(gen, 2, 200, 64)
    kw = dict(block_size=64, topk=3, init_blocks=1)
    sel = ref.select_blocks(qi, ki, **kw)
    for b in range(2):
        assert torch.equal(sel[b:b + 1], ref.select_blocks(qi[b:b + 1], ki[b:b + 1], **kw))
    assert torch.equal(sel, ref.select_blocks(qi, ki[:, :, None], **kw))
    assert torch.equal(ref.block_scores(qi, ki, block_size=64),
                       ref.block_scores(qi, ki[:, :, None], block_size=64))


def test_select_dtypes():
    gen = torch.Generator().manual_seed(5)
    qi, ki = randn(gen, 1, 30, 2, 64), randn(gen, 1, 250, 64)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        q_d, k_d = qi.to(dtype), ki.to(dtype)
        sel = ref.select_blocks(q_d, k_d, block_size=64, topk=3)
        scores = brute_block_scores(q_d[0], k_d[0], 64, 1 / 8)
        assert_same_selection(sel[0], brute_select(scores, 250, 64, 3, 0, 1), scores)
        want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert ref.block_scores(q_d, k_d, block_size=64).dtype == want_dtype


VARLEN = [(5, 37), (1, 1), (64, 200), (130, 130), (1, 290)]


def varlen_inputs(gen, hq=4, hkv=2, d=16, di=64):
    tq, tk = sum(s for s, _ in VARLEN), sum(s for _, s in VARLEN)
    return dict(q=randn(gen, tq, hq, d), k=randn(gen, tk, hkv, d), v=randn(gen, tk, hkv, d),
                qi=randn(gen, tq, hkv, di), ki=randn(gen, tk, di),
                cu_q=cu([s for s, _ in VARLEN]), cu_k=cu([s for _, s in VARLEN]))


def per_sequence(x, cu_seqlens):
    return [x[a:b][None] for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]


def test_select_varlen_equals_padded():
    gen = torch.Generator().manual_seed(6)
    t = varlen_inputs(gen)
    kw = dict(block_size=64, topk=3, init_blocks=1)
    var = dict(cu_seqlens_q=t["cu_q"], cu_seqlens_k=t["cu_k"])
    sel = ref.select_blocks(t["qi"], t["ki"], **kw, **var, max_seqlen_q=130, max_seqlen_k=290)
    assert sel.shape == (t["qi"].shape[0], 2, 3)
    qs, ks = per_sequence(t["qi"], t["cu_q"]), per_sequence(t["ki"], t["cu_k"])
    padded = [ref.select_blocks(a, b, **kw)[0] for a, b in zip(qs, ks)]
    assert torch.equal(sel, torch.cat(padded))
    assert torch.equal(sel, ref.select_blocks(t["qi"], t["ki"][:, None], **kw, **var))
    scores = ref.block_scores(t["qi"], t["ki"], block_size=64, **var)
    assert scores.shape == (t["qi"].shape[0], 2, 5)
    for (a, b), s_seq, qa in zip(zip(t["cu_q"][:-1], t["cu_q"][1:]), ks, qs):
        one = ref.block_scores(qa, s_seq, block_size=64)[0]
        assert torch.equal(scores[a:b, :, :one.shape[-1]], one)
        assert torch.isneginf(scores[a:b, :, one.shape[-1]:]).all()
    assert ref.check_selection(sel, t["qi"], t["ki"], **kw, **var) == []


def test_chunking_does_not_change_results(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    t = varlen_inputs(gen)
    kw = dict(block_size=64, cu_seqlens_q=t["cu_q"], cu_seqlens_k=t["cu_k"])

    def run():
        q, k, v, qi, ki = (t[n].clone().requires_grad_() for n in ("q", "k", "v", "qi", "ki"))
        sel = ref.select_blocks(qi, ki, topk=3, **kw)
        out, lse = ref.block_sparse_attn(q, k, v, sel, return_lse=True, **kw)
        loss = ref.indexer_kl_loss(q, k, qi, ki, sel, **kw)
        dense = ref.indexer_kl_loss(q, k, qi, ki, None, dense=True, **kw)
        (out.square().sum() + lse.sum() + loss + dense).backward()
        return [sel, ref.block_scores(qi, ki, **kw), out, lse, loss, dense,
                q.grad, k.grad, v.grad, qi.grad, ki.grad]

    whole = run()
    monkeypatch.setattr(ref, "_SCORE_CHUNK_BYTES", 1)
    monkeypatch.setattr(ref, "_GATHER_CHUNK_BYTES", 1)
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# check_selection
# ----------------------------------------------------------------------------------------------


def planted_case():
    """5 blocks of 64, topk 3: the last query selects its local block 4 and two of blocks 0-3."""
    gen = torch.Generator().manual_seed(8)
    qi, ki = randn(gen, 1, 300, 2, 64), randn(gen, 1, 300, 64)
    sel = ref.select_blocks(qi, ki, block_size=64, topk=3)
    return qi, ki, sel


def check(sel, qi, ki, **kw):
    return ref.check_selection(sel, qi, ki, block_size=64, topk=3, **kw)


def plant(sel, row):
    bad = sel.clone()
    bad[0, 299, 1] = torch.tensor(row, dtype=torch.int32)
    return bad


def test_check_selection_accepts_reference_output():
    qi, ki, sel = planted_case()
    assert check(sel, qi, ki) == []


def test_check_selection_detects_planted_errors():
    qi, ki, sel = planted_case()
    a, b, local = sel[0, 299, 1].tolist()
    assert local == 4
    unselected = sorted(set(range(4)) - {a, b})
    scores = ref.block_scores(qi, ki, block_size=64)[0, 299, 1]
    worst = min(unselected, key=lambda x: scores[x].item())
    best = max((a, b), key=lambda x: scores[x].item())
    cases = {
        "duplicate ids": [a, a, local],
        "ids not ascending": [b, a, local],
        "forced block missing": sorted([a, b, unselected[0]]),
        "wrong count": [a, local, -1],
        "worse block selected": sorted([worst, ({a, b} - {best}).pop(), local]),
        "id outside [0, local block]": [a, b, 5],
        "-1 before a block id": [a, -1, local],
    }
    for kind, row in cases.items():
        messages = check(plant(sel, row), qi, ki)
        hits = [m for m in messages if kind in m]
        assert hits, (kind, row, messages)
        assert "query 299" in hits[0] and "group 1" in hits[0], hits[0]
    wrong_shape = check(sel[..., :2], qi, ki)
    assert len(wrong_shape) == 1 and "shape" in wrong_shape[0]


def test_check_selection_caps_messages():
    qi, ki, sel = planted_case()
    messages = check(sel.flip(-1), qi, ki)
    assert 1 < len(messages) <= 21
    assert "more violations" in messages[-1]


def test_check_selection_tolerates_near_ties():
    """Either side of an exact or near tie is a correct choice (only the reference breaks ties)."""
    bs, di = 64, 64
    ki = torch.tensor([5.0, 0.0, 5.0, 1.0]).repeat_interleave(bs)[:, None].expand(-1, di)[None]
    qi = torch.ones(1, 1, 1, di)  # local block 3; blocks 0 and 2 tie at 320

    def violations(row, keys, **kw):
        sel = torch.tensor(row, dtype=torch.int32)[None, None, None]
        return ref.check_selection(sel, qi, keys, block_size=bs, topk=2, index_scale=1.0, **kw)

    assert ref.select_blocks(qi, ki, block_size=bs, topk=2, index_scale=1.0)[0, 0, 0].tolist() \
        == [0, 3]
    assert violations([0, 3], ki) == [] and violations([2, 3], ki) == []
    assert any("worse block selected" in m for m in violations([1, 3], ki))
    ki_near = ki.clone()
    ki_near[0, :bs] += 1e-5  # block 0 now wins by 6.4e-4, 2e-6 of the score range 320
    assert violations([2, 3], ki_near) == []
    assert any("worse block selected" in m for m in violations([2, 3], ki_near, rel_tol=1e-6))


# ----------------------------------------------------------------------------------------------
# Main branch
# ----------------------------------------------------------------------------------------------

ATTN_CASES = [
    # sq, sk, hq, hkv, d, bs, topk
    (1, 1, 2, 1, 16, 64, 1),
    (5, 37, 4, 2, 16, 64, 2),
    (37, 37, 4, 1, 16, 128, 1),
    (20, 131, 8, 2, 32, 64, 3),
    (33, 200, 4, 4, 8, 128, 2),
    (70, 70, 2, 2, 8, 64, 2),
]


@pytest.mark.parametrize("sq,sk,hq,hkv,d,bs,topk", ATTN_CASES)
def test_attention_matches_brute_force(sq, sk, hq, hkv, d, bs, topk):
    gen = torch.Generator().manual_seed(sq + sk + hq)
    q, k, v = randn(gen, 1, sq, hq, d), randn(gen, 1, sk, hkv, d), randn(gen, 1, sk, hkv, d)
    sel = random_selection(gen, sq, sk, hkv, topk, bs)[None]
    want_out, want_lse = brute_attention(q[0], k[0], v[0], sel[0], bs, 1 / math.sqrt(d))
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 2e-6)]:
        out, lse = ref.block_sparse_attn(q.to(dtype), k.to(dtype), v.to(dtype), sel,
                                         block_size=bs, return_lse=True)
        assert out.dtype == dtype and out.shape == q.shape and lse.shape == (1, hq, sq)
        torch.testing.assert_close(out[0].double(), want_out, rtol=tol, atol=tol)
        torch.testing.assert_close(lse[0].double(), want_lse, rtol=tol, atol=tol)
    scale = 0.3
    out = ref.block_sparse_attn(q.double(), k.double(), v.double(), sel, block_size=bs,
                                softmax_scale=scale)
    torch.testing.assert_close(out[0], brute_attention(q[0], k[0], v[0], sel[0], bs, scale)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision(dtype):
    gen = torch.Generator().manual_seed(9)
    q, k, v = (randn(gen, 1, s, h, 32, dtype=dtype) for s, h in [(20, 4), (150, 2), (150, 2)])
    sel = random_selection(gen, 20, 150, 2, 2, 64)[None]
    out, lse = ref.block_sparse_attn(q, k, v, sel, block_size=64, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want_out, want_lse = brute_attention(q[0], k[0], v[0], sel[0], 64, 1 / math.sqrt(32))
    torch.testing.assert_close(out[0].double(), want_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse[0].double(), want_lse, rtol=1e-5, atol=1e-5)


def bottom_right_causal_sdpa(q, k, v):
    """Dense causal attention with p(i) = Sk - Sq + i, via torch SDPA; [B, S, H, D] layouts."""
    sq, sk, g_size = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    mask = torch.arange(sk)[None, :] <= (torch.arange(sq) + sk - sq)[:, None]
    qt, kt, vt = (x.transpose(1, 2) for x in
                  (q, k.repeat_interleave(g_size, 2), v.repeat_interleave(g_size, 2)))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("sq,sk,extra", [(50, 131, 0), (131, 131, 1), (1, 70, 2)])
def test_full_coverage_equals_dense_causal(sq, sk, extra):
    gen = torch.Generator().manual_seed(sq + sk)
    bs, nblk = 64, -(-sk // 64)
    q, k, v = (randn(gen, 2, s, h, 16, dtype=torch.float64) for s, h in
               [(sq, 4), (sk, 2), (sk, 2)])
    sel = F.pad(torch.arange(nblk, dtype=torch.int32), (0, extra), value=-1)
    sel = sel.expand(2, sq, 2, -1).contiguous()
    out = ref.block_sparse_attn(q, k, v, sel, block_size=bs)
    torch.testing.assert_close(out, bottom_right_causal_sdpa(q, k, v))


def test_unsorted_selection_equals_sorted():
    gen = torch.Generator().manual_seed(10)
    q, k, v = (randn(gen, 2, s, h, 16, dtype=torch.float64) for s, h in
               [(40, 4), (200, 1), (200, 1)])
    sel = torch.stack([random_selection(gen, 40, 200, 1, 4, 64, drop=0.4) for _ in range(2)])
    a = ref.block_sparse_attn(q, k, v, sel, block_size=64, return_lse=True)
    b = ref.block_sparse_attn(q, k, v, sort_selection(sel), block_size=64, return_lse=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_row_without_visible_key():
    gen = torch.Generator().manual_seed(11)
    # Positions 126..129 with blocks of 64: query 0 (local block 1) cannot see block 2.
    q = randn(gen, 1, 4, 2, 8, dtype=torch.float64).requires_grad_()
    k = randn(gen, 1, 130, 1, 8, dtype=torch.float64).requires_grad_()
    v = randn(gen, 1, 130, 1, 8, dtype=torch.float64).requires_grad_()
    sel = torch.tensor([[2, -1], [-1, -1], [1, 0], [2, -1]], dtype=torch.int32)[None, :, None]
    out, lse = ref.block_sparse_attn(q, k, v, sel, block_size=64, return_lse=True)
    assert torch.equal(out[0, :2], torch.zeros(2, 2, 8, dtype=torch.float64))
    assert torch.isneginf(lse[0, :, :2]).all() and torch.isfinite(lse[0, :, 2:]).all()
    torch.autograd.backward((out, lse.clamp(min=-1e3)),
                            (randn(gen, *out.shape, dtype=torch.float64), torch.ones_like(lse)))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, :2], torch.zeros(2, 2, 8, dtype=torch.float64))


def test_attention_varlen_equals_padded():
    gen = torch.Generator().manual_seed(12)
    t = varlen_inputs(gen)
    sel = ref.select_blocks(t["qi"], t["ki"], block_size=64, topk=2, cu_seqlens_q=t["cu_q"],
                            cu_seqlens_k=t["cu_k"])
    out, lse = ref.block_sparse_attn(t["q"], t["k"], t["v"], sel, block_size=64,
                                     cu_seqlens_q=t["cu_q"], cu_seqlens_k=t["cu_k"],
                                     return_lse=True)
    assert out.shape == t["q"].shape and lse.shape == (4, t["q"].shape[0])
    parts = [ref.block_sparse_attn(q, k, v, s, block_size=64, return_lse=True) for q, k, v, s in
             zip(*(per_sequence(t[n], t[c]) for n, c in
                   [("q", "cu_q"), ("k", "cu_k"), ("v", "cu_k")]), per_sequence(sel, t["cu_q"]))]
    torch.testing.assert_close(out, torch.cat([o[0] for o, _ in parts]))
    torch.testing.assert_close(lse, torch.cat([l[0] for _, l in parts], 1))


def test_attention_gradcheck():
    gen = torch.Generator().manual_seed(13)
    q = randn(gen, 1, 5, 2, 4, dtype=torch.float64).requires_grad_()
    k = randn(gen, 1, 70, 1, 4, dtype=torch.float64).requires_grad_()
    v = randn(gen, 1, 70, 1, 4, dtype=torch.float64).requires_grad_()
    sel = torch.tensor([[1, 0], [-1, 1], [0, -1], [1, 0], [0, 1]], dtype=torch.int32)
    sel = sel[None, :, None]

    def fn(q, k, v):
        return ref.block_sparse_attn(q, k, v, sel, block_size=64, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Indexer distillation loss
# ----------------------------------------------------------------------------------------------

KL_CASES = [
    # sq, sk, hq, hkv, d, di, bs, topk, dense
    (1, 1, 2, 2, 8, 8, 64, 1, False),
    (5, 37, 4, 2, 16, 16, 64, 1, False),
    (20, 131, 4, 1, 8, 16, 64, 2, False),
    (12, 140, 8, 2, 8, 8, 128, 2, False),
    (33, 70, 4, 2, 8, 8, 64, 2, True),
]


@pytest.mark.parametrize("sq,sk,hq,hkv,d,di,bs,topk,dense", KL_CASES)
def test_kl_matches_brute_force(sq, sk, hq, hkv, d, di, bs, topk, dense):
    gen = torch.Generator().manual_seed(sq * 7 + sk)
    q, k = randn(gen, 1, sq, hq, d), randn(gen, 1, sk, hkv, d)
    qi = randn(gen, 1, sq, hkv, di, dtype=torch.float64).requires_grad_()
    ki = randn(gen, 1, sk, di, dtype=torch.float64).requires_grad_()
    sel = None if dense else random_selection(gen, sq, sk, hkv, topk, bs)[None]
    scale, iscale = 0.4, 0.2
    loss = ref.indexer_kl_loss(q.double(), k.double(), qi, ki, sel, block_size=bs,
                               softmax_scale=scale, index_scale=iscale, dense=dense)
    total, dlds = brute_kl(q[0], k[0], qi[0].detach(), ki[0].detach(),
                           None if dense else sel[0], bs, scale, iscale, dense)
    pairs = sq * hkv
    torch.testing.assert_close(loss, total / pairs)
    loss.backward()
    # Closed form: d loss / d s(i, j) = (Q - P) / pairs, with s = iscale * qi . ki.
    dlds = dlds / pairs
    torch.testing.assert_close(qi.grad[0], iscale * torch.einsum("igj,jd->igd", dlds,
                                                                 ki[0].detach()))
    torch.testing.assert_close(ki.grad[0], iscale * torch.einsum("igj,igd->jd", dlds,
                                                                 qi[0].detach()))
    loss32 = ref.indexer_kl_loss(q, k, qi.detach().float(), ki.detach().float(), sel,
                                 block_size=bs, softmax_scale=scale, index_scale=iscale,
                                 dense=dense)
    assert loss32.dtype == torch.float32 and loss32.dim() == 0
    torch.testing.assert_close(loss32.double(), total / pairs, rtol=1e-5, atol=1e-6)


def test_kl_default_scales_and_half_inputs():
    gen = torch.Generator().manual_seed(14)
    q, k = randn(gen, 1, 9, 4, 16, dtype=torch.bfloat16), randn(gen, 1, 90, 2, 16,
                                                                 dtype=torch.bfloat16)
    qi, ki = randn(gen, 1, 9, 2, 64, dtype=torch.bfloat16), randn(gen, 1, 90, 64,
                                                                  dtype=torch.bfloat16)
    sel = random_selection(gen, 9, 90, 2, 2, 64)[None]
    loss = ref.indexer_kl_loss(q, k, qi, ki, sel, block_size=64)
    total, _ = brute_kl(q[0], k[0], qi[0], ki[0], sel[0], 64, 1 / 4, 1 / 8, False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), total / 18, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense", [False, True])
def test_kl_with_lse_equals_recomputed(dense):
    gen = torch.Generator().manual_seed(15)
    sq, sk, bs = 30, 150, 64
    q, k, v = (randn(gen, 2, s, h, 16, dtype=torch.float64) for s, h in
               [(sq, 4), (sk, 2), (sk, 2)])
    qi, ki = randn(gen, 2, sq, 2, 16, dtype=torch.float64), randn(gen, 2, sk, 16,
                                                                  dtype=torch.float64)
    if dense:  # full coverage: the sparse lse is the dense one
        sel = torch.arange(3, dtype=torch.int32).expand(2, sq, 2, 3)
    else:
        sel = torch.stack([random_selection(gen, sq, sk, 2, 2, bs) for _ in range(2)])
        sel[0, 0] = -1  # empty support: lse is -inf there
    _, lse = ref.block_sparse_attn(q, k, v, sel, block_size=bs, return_lse=True)
    kw = dict(block_size=bs, dense=dense)
    a = ref.indexer_kl_loss(q, k, qi, ki, None if dense else sel, **kw)
    b = ref.indexer_kl_loss(q, k, qi, ki, sel, lse=lse, **kw)
    torch.testing.assert_close(a, b)


def test_kl_gradients_only_reach_index_tensors():
    gen = torch.Generator().manual_seed(16)
    q = randn(gen, 1, 10, 4, 8).requires_grad_()
    k = randn(gen, 1, 100, 2, 8).requires_grad_()
    qi = randn(gen, 1, 10, 2, 16).requires_grad_()
    ki = randn(gen, 1, 100, 1, 16).requires_grad_()
    sel = random_selection(gen, 10, 100, 2, 2, 64)[None]
    ref.indexer_kl_loss(q, k, qi, ki, sel, block_size=64).backward()
    assert q.grad is None and k.grad is None
    assert qi.grad is not None and ki.grad is not None and ki.grad.shape == ki.shape


def test_kl_varlen_equals_padded():
    gen = torch.Generator().manual_seed(17)
    t = varlen_inputs(gen)
    kw = dict(block_size=64)
    sel = ref.select_blocks(t["qi"], t["ki"], topk=2, cu_seqlens_q=t["cu_q"],
                            cu_seqlens_k=t["cu_k"], **kw)
    for dense in (False, True):
        loss = ref.indexer_kl_loss(t["q"], t["k"], t["qi"], t["ki"], sel, dense=dense,
                                   cu_seqlens_q=t["cu_q"], cu_seqlens_k=t["cu_k"], **kw)
        parts = zip(*(per_sequence(t[n], t[c]) for n, c in
                      [("q", "cu_q"), ("k", "cu_k"), ("qi", "cu_q"), ("ki", "cu_k")]),
                    per_sequence(sel, t["cu_q"]))
        weighted = sum(ref.indexer_kl_loss(q, k, qi, ki, s, dense=dense, **kw) * q.shape[1]
                       for q, k, qi, ki, s in parts)
        torch.testing.assert_close(loss, weighted / t["q"].shape[0])


def test_kl_gradcheck():
    gen = torch.Generator().manual_seed(18)
    q, k = randn(gen, 1, 6, 4, 4, dtype=torch.float64), randn(gen, 1, 70, 2, 4,
                                                               dtype=torch.float64)
    qi = randn(gen, 1, 6, 2, 4, dtype=torch.float64).requires_grad_()
    ki = randn(gen, 1, 70, 4, dtype=torch.float64).requires_grad_()
    sel = random_selection(gen, 6, 70, 2, 2, 64)[None]
    for dense in (False, True):
        def fn(qi, ki):
            return ref.indexer_kl_loss(q, k, qi, ki, sel, block_size=64, dense=dense)

        assert torch.autograd.gradcheck(fn, (qi, ki), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Full forward
# ----------------------------------------------------------------------------------------------


def test_sparse_attn_composes_selection_and_attention():
    gen = torch.Generator().manual_seed(19)
    q = randn(gen, 2, 25, 4, 16).requires_grad_()
    k = randn(gen, 2, 260, 2, 16).requires_grad_()
    v = randn(gen, 2, 260, 2, 16).requires_grad_()
    qi = randn(gen, 2, 25, 2, 64).requires_grad_()
    ki = randn(gen, 2, 260, 64).requires_grad_()
    kw = dict(block_size=64, topk=3, init_blocks=1)
    out, aux = ref.sparse_attn(q, k, v, qi, ki, return_aux=True, **kw)
    assert isinstance(aux, ref.SparseAttnAux)
    assert torch.equal(aux.block_indices, ref.select_blocks(qi, ki, **kw))
    want, want_lse = ref.block_sparse_attn(q, k, v, aux.block_indices, block_size=64,
                                           return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(aux.lse, want_lse)
    assert aux.lse.dtype == torch.float32 and aux.block_indices.dtype == torch.int32
    torch.testing.assert_close(ref.sparse_attn(q, k, v, qi, ki, **kw), out)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert qi.grad is None and ki.grad is None
