"""Argument validation of the public msa_cuda functions (CPU only, fast).

Every bad argument must raise a TypeError or ValueError whose message names the argument, before
any op runs; valid calls must pass and match msa_cuda.reference.
"""

import math

import pytest
import torch

import msa_cuda
from msa_cuda import reference as ref

BS = 64  # block_size used throughout (2 blocks for Sk = 100)
TOPK = 2


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype)


def _inputs(varlen=False, dtype=torch.bfloat16, k_idx_head=False, seed=0):
    """Small valid inputs: B=2, Sq=12, Sk=100 (varlen: Sq=(5, 7), Sk=(40, 100)), Hq=4, Hkv=2."""
    torch.manual_seed(seed)
    hq, hkv, d, di = 4, 2, 64, 64
    if varlen:
        cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
        cu_k = torch.tensor([0, 40, 140], dtype=torch.int32)
        lead_q, lead_k = (12,), (140,)
        extra = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        lead_q, lead_k = (2, 12), (2, 100)
        extra = {}
    t = dict(
        q=_rand(*lead_q, hq, d, dtype=dtype),
        k=_rand(*lead_k, hkv, d, dtype=dtype),
        v=_rand(*lead_k, hkv, d, dtype=dtype),
        q_idx=_rand(*lead_q, hkv, di, dtype=dtype),
        k_idx=_rand(*lead_k, *((1,) if k_idx_head else ()), di, dtype=dtype),
    )
    return t, extra


def _selection(t, extra):
    return ref.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK, **extra)


def _call(fn_name, varlen=False, **overrides):
    """Call a public function with valid small inputs, replacing some arguments."""
    t, extra = _inputs(varlen)
    if fn_name == "select_blocks":
        kw = dict(q_idx=t["q_idx"], k_idx=t["k_idx"], block_size=BS, topk=TOPK, **extra)
    elif fn_name == "block_sparse_attn":
        kw = dict(q=t["q"], k=t["k"], v=t["v"], block_indices=_selection(t, extra), block_size=BS, **extra)
    elif fn_name == "indexer_kl_loss":
        kw = dict(q=t["q"], k=t["k"], q_idx=t["q_idx"], k_idx=t["k_idx"], block_indices=_selection(t, extra),
                  block_size=BS, **extra)
    elif fn_name == "sparse_attn":
        kw = dict(q=t["q"], k=t["k"], v=t["v"], q_idx=t["q_idx"], k_idx=t["k_idx"], block_size=BS, topk=TOPK,
                  **extra)
    else:
        raise AssertionError(fn_name)
    for key, value in overrides.items():
        kw[key] = value(kw) if callable(value) else value
    return getattr(msa_cuda, fn_name)(**kw)


def _with(name, fn):
    """Override builder: replace argument ``name`` by ``fn(kwargs)``."""
    return {name: fn}


def _const(name, value):
    return {name: (lambda kw: value)}


def _dtype(name, dtype):
    return {name: (lambda kw: kw[name].to(dtype))}


def _reshape(name, shape_fn):
    return {name: (lambda kw: torch.zeros(shape_fn(kw[name].shape), dtype=kw[name].dtype))}


def _meta(name):
    return {name: (lambda kw: kw[name].to("meta"))}


def _bi_set(value, where=(0, 3, 1, 0)):
    def fn(kw):
        bi = kw["block_indices"].clone()
        bi[where] = value
        return bi
    return {"block_indices": fn}


def _bi_dup():
    def fn(kw):
        bi = kw["block_indices"].clone()
        bi[0, -1, 0, :] = torch.tensor([1, 1], dtype=torch.int32)
        return bi
    return {"block_indices": fn}


# (id, function, varlen, overrides, exception, argument name that must appear in the message)
SELECT = "select_blocks"
ATTN = "block_sparse_attn"
KL = "indexer_kl_loss"
SPARSE = "sparse_attn"

CASES = [
    # --- types --------------------------------------------------------------------------------
    ("q_idx-not-tensor", SELECT, False, _with("q_idx", lambda kw: kw["q_idx"].tolist()), TypeError, "q_idx"),
    ("k_idx-not-tensor", SELECT, False, _const("k_idx", None), TypeError, "k_idx"),
    ("q-not-tensor", ATTN, False, _const("q", 1.0), TypeError, "q"),
    ("v-not-tensor", ATTN, False, _const("v", None), TypeError, "v"),
    ("block_indices-not-tensor", ATTN, False, _with("block_indices", lambda kw: kw["block_indices"].tolist()),
     TypeError, "block_indices"),
    ("lse-not-tensor", KL, False, _const("lse", [1.0]), TypeError, "lse"),
    ("cu_seqlens_q-not-tensor", SELECT, True, _const("cu_seqlens_q", [0, 5, 12]), TypeError, "cu_seqlens_q"),
    # --- dtypes -------------------------------------------------------------------------------
    ("q_idx-int", SELECT, False, _dtype("q_idx", torch.int32), TypeError, "q_idx"),
    ("k_idx-dtype-mismatch", SELECT, False, _dtype("k_idx", torch.float16), TypeError, "k_idx"),
    ("q-int", ATTN, False, _dtype("q", torch.int64), TypeError, "q"),
    ("k-dtype-mismatch", ATTN, False, _dtype("k", torch.float16), TypeError, "k"),
    ("v-dtype-mismatch", ATTN, False, _dtype("v", torch.float32), TypeError, "v"),
    ("block_indices-int64", ATTN, False, _dtype("block_indices", torch.int64), TypeError, "block_indices"),
    ("block_indices-float", KL, False, _dtype("block_indices", torch.float32), TypeError, "block_indices"),
    ("cu_seqlens_q-int64", ATTN, True, _dtype("cu_seqlens_q", torch.int64), TypeError, "cu_seqlens_q"),
    ("cu_seqlens_k-int64", SELECT, True, _dtype("cu_seqlens_k", torch.int64), TypeError, "cu_seqlens_k"),
    ("lse-bf16", KL, False, {"lse": lambda kw: torch.zeros(2, 4, 12, dtype=torch.bfloat16)}, TypeError, "lse"),
    ("q_idx-dtype-mismatch-kl", KL, False, _dtype("k_idx", torch.float16), TypeError, "k_idx"),
    ("q_idx-int-sparse", SPARSE, False, _dtype("q_idx", torch.int8), TypeError, "q_idx"),
    # --- devices (meta stands in for a second device; fp32 only on CPU) -------------------------
    ("k_idx-other-device", SELECT, False, _meta("k_idx"), ValueError, "k_idx"),
    ("v-other-device", ATTN, False, _meta("v"), ValueError, "v"),
    ("block_indices-other-device", ATTN, False, _meta("block_indices"), ValueError, "block_indices"),
    ("cu_seqlens_k-other-device", ATTN, True, _meta("cu_seqlens_k"), ValueError, "cu_seqlens_k"),
    ("q_idx-other-device-kl", KL, False, _meta("q_idx"), ValueError, "q_idx"),
    ("fp32-off-cpu", SELECT, False,
     {"q_idx": lambda kw: kw["q_idx"].float().to("meta"), "k_idx": lambda kw: kw["k_idx"].float().to("meta")},
     TypeError, "q_idx"),
    # --- ranks and shapes ---------------------------------------------------------------------
    ("q_idx-rank3-padded", SELECT, False, _with("q_idx", lambda kw: kw["q_idx"][0]), ValueError, "q_idx"),
    ("k_idx-rank5", SELECT, False, _with("k_idx", lambda kw: kw["k_idx"][:, :, None, None]), ValueError, "k_idx"),
    ("k_idx-two-heads", SELECT, False, _with("k_idx", lambda kw: torch.stack([kw["k_idx"]] * 2, 2)),
     ValueError, "k_idx"),
    ("k_idx-batch", SELECT, False, _with("k_idx", lambda kw: kw["k_idx"][:1]), ValueError, "k_idx"),
    ("q_idx-Di-32", SELECT, False, _with("q_idx", lambda kw: kw["q_idx"][..., :32]), ValueError, "q_idx"),
    ("k_idx-Di-mismatch", SELECT, False, _reshape("k_idx", lambda s: (*s[:-1], 128)), ValueError, "k_idx"),
    ("q_idx-rank4-varlen", SELECT, True, _with("q_idx", lambda kw: kw["q_idx"][None]), ValueError, "q_idx"),
    ("k_idx-rank4-varlen", SELECT, True, _with("k_idx", lambda kw: kw["k_idx"][None, :, None]), ValueError,
     "k_idx"),
    ("q-rank3-padded", ATTN, False, _with("q", lambda kw: kw["q"][0]), ValueError, "q"),
    ("k-rank3-padded", ATTN, False, _with("k", lambda kw: kw["k"][0]), ValueError, "k"),
    ("q-rank4-varlen", ATTN, True, _with("q", lambda kw: kw["q"][None]), ValueError, "q"),
    ("k-batch", ATTN, False, _with("k", lambda kw: kw["k"][:1]), ValueError, "k"),
    ("q-D-32", ATTN, False, _with("q", lambda kw: kw["q"][..., :32]), ValueError, "q"),
    ("q-D-96", ATTN, False, _reshape("q", lambda s: (*s[:-1], 96)), ValueError, "q"),
    ("k-D-mismatch", ATTN, False, _reshape("k", lambda s: (*s[:-1], 128)), ValueError, "k"),
    ("v-D-mismatch", ATTN, False, _reshape("v", lambda s: (*s[:-1], 128)), ValueError, "v"),
    ("v-Sk-mismatch", ATTN, False, _with("v", lambda kw: kw["v"][:, :50]), ValueError, "v"),
    ("q-heads-not-divisible", ATTN, False, _with("q", lambda kw: kw["q"][:, :, :3]), ValueError, "q"),
    ("q-G-3", ATTN, False, _with("q", lambda kw: torch.cat([kw["q"], kw["q"][:, :, :2]], 2)), ValueError, "q"),
    ("q-G-32", ATTN, False, _reshape("q", lambda s: (s[0], s[1], 64, s[3])), ValueError, "q"),
    ("k-zero-heads", ATTN, False, _reshape("k", lambda s: (s[0], s[1], 0, s[3])), ValueError, "k"),
    ("block_indices-rank", ATTN, False, _with("block_indices", lambda kw: kw["block_indices"][0]), ValueError,
     "block_indices"),
    ("block_indices-Sq", ATTN, False, _with("block_indices", lambda kw: kw["block_indices"][:, :5]), ValueError,
     "block_indices"),
    ("block_indices-Hkv", ATTN, False, _with("block_indices", lambda kw: kw["block_indices"][:, :, :1]),
     ValueError, "block_indices"),
    ("block_indices-topk-0", ATTN, False, _with("block_indices", lambda kw: kw["block_indices"][..., :0]),
     ValueError, "block_indices"),
    ("block_indices-topk-33", ATTN, False,
     _with("block_indices", lambda kw: torch.full((*kw["block_indices"].shape[:-1], 33), -1, dtype=torch.int32)),
     ValueError, "block_indices"),
    ("block_indices-varlen-rank", ATTN, True, _with("block_indices", lambda kw: kw["block_indices"][None]),
     ValueError, "block_indices"),
    ("q_idx-Hkv-kl", KL, False, _with("q_idx", lambda kw: kw["q_idx"][:, :, :1]), ValueError, "q_idx"),
    ("q_idx-Sq-kl", KL, False, _with("q_idx", lambda kw: kw["q_idx"][:, :5]), ValueError, "q_idx"),
    ("k_idx-Sk-kl", KL, False, _with("k_idx", lambda kw: kw["k_idx"][:, :50]), ValueError, "k_idx"),
    ("k_idx-Sk-sparse", SPARSE, False, _with("k_idx", lambda kw: kw["k_idx"][:, :50]), ValueError, "k_idx"),
    ("q_idx-Hkv-sparse", SPARSE, False, _with("q_idx", lambda kw: kw["q_idx"][:, :, :1]), ValueError, "q_idx"),
    ("q_idx-tokens-varlen-sparse", SPARSE, True, _with("q_idx", lambda kw: kw["q_idx"][:7]), ValueError, "q_idx"),
    ("lse-shape", KL, False, _const("lse", torch.zeros(2, 12, 4)), ValueError, "lse"),
    ("lse-shape-varlen", KL, True, _const("lse", torch.zeros(12, 4)), ValueError, "lse"),
    # --- zero sizes and Sq <= Sk --------------------------------------------------------------
    ("B-0", ATTN, False, {"q": lambda kw: kw["q"][:0], "k": lambda kw: kw["k"][:0], "v": lambda kw: kw["v"][:0],
                          "block_indices": lambda kw: kw["block_indices"][:0]}, ValueError, "q"),
    ("Sq-0", SELECT, False, _with("q_idx", lambda kw: kw["q_idx"][:, :0]), ValueError, "q_idx"),
    ("Sk-0", SPARSE, False, {"k": lambda kw: kw["k"][:, :0], "v": lambda kw: kw["v"][:, :0],
                             "k_idx": lambda kw: kw["k_idx"][:, :0]}, ValueError, "k"),
    ("Tq-0-varlen", SELECT, True, {"q_idx": lambda kw: kw["q_idx"][:0],
                                   "cu_seqlens_q": lambda kw: torch.zeros(3, dtype=torch.int32)},
     ValueError, "q_idx"),
    ("Sq-gt-Sk", SELECT, False, _with("k_idx", lambda kw: kw["k_idx"][:, :10]), ValueError, "Sq <= Sk"),
    ("Sq-gt-Sk-attn", ATTN, False, {"k": lambda kw: kw["k"][:, :10], "v": lambda kw: kw["v"][:, :10]},
     ValueError, "Sq <= Sk"),
    # --- integer / float / bool options -------------------------------------------------------
    ("block_size-32", SELECT, False, _const("block_size", 32), ValueError, "block_size"),
    ("block_size-str", ATTN, False, _const("block_size", "64"), TypeError, "block_size"),
    ("block_size-bool", KL, False, _const("block_size", True), TypeError, "block_size"),
    ("block_size-256-sparse", SPARSE, False, _const("block_size", 256), ValueError, "block_size"),
    ("topk-0", SELECT, False, _const("topk", 0), ValueError, "topk"),
    ("topk-33", SELECT, False, _const("topk", 33), ValueError, "topk"),
    ("topk-float", SELECT, False, _const("topk", 2.0), TypeError, "topk"),
    ("topk-33-sparse", SPARSE, False, _const("topk", 33), ValueError, "topk"),
    ("init_blocks-negative", SELECT, False, _const("init_blocks", -1), ValueError, "init_blocks"),
    ("init_blocks-float", SPARSE, False, _const("init_blocks", 1.0), TypeError, "init_blocks"),
    ("local_blocks-negative", SELECT, False, _const("local_blocks", -1), ValueError, "local_blocks"),
    ("forced-exceeds-topk", SELECT, False, {"init_blocks": lambda kw: 2, "local_blocks": lambda kw: 1},
     ValueError, "init_blocks"),
    ("forced-exceeds-topk-local0", SPARSE, False, {"init_blocks": lambda kw: 2, "local_blocks": lambda kw: 0},
     ValueError, "init_blocks"),
    ("index_scale-zero", SELECT, False, _const("index_scale", 0.0), ValueError, "index_scale"),
    ("index_scale-negative", KL, False, _const("index_scale", -1.0), ValueError, "index_scale"),
    ("index_scale-nan", SELECT, False, _const("index_scale", math.nan), ValueError, "index_scale"),
    ("index_scale-inf", SPARSE, False, _const("index_scale", math.inf), ValueError, "index_scale"),
    ("index_scale-str", SELECT, False, _const("index_scale", "0.1"), TypeError, "index_scale"),
    ("index_scale-tensor", SELECT, False, _const("index_scale", torch.tensor(0.1)), TypeError, "index_scale"),
    ("softmax_scale-zero", ATTN, False, _const("softmax_scale", 0.0), ValueError, "softmax_scale"),
    ("softmax_scale-nan", KL, False, _const("softmax_scale", math.nan), ValueError, "softmax_scale"),
    ("softmax_scale-neg-inf", SPARSE, False, _const("softmax_scale", -math.inf), ValueError, "softmax_scale"),
    ("softmax_scale-bool", ATTN, False, _const("softmax_scale", True), TypeError, "softmax_scale"),
    ("return_lse-int", ATTN, False, _const("return_lse", 1), TypeError, "return_lse"),
    ("validate-none", ATTN, False, _const("validate", None), TypeError, "validate"),
    ("validate-none-kl", KL, False, _const("validate", None), TypeError, "validate"),
    ("dense-str", KL, False, _const("dense", "yes"), TypeError, "dense"),
    ("deterministic-int", ATTN, False, _const("deterministic", 1), TypeError, "deterministic"),
    ("deterministic-none", SPARSE, False, _const("deterministic", None), TypeError, "deterministic"),
    ("return_aux-int", SPARSE, False, _const("return_aux", 0), TypeError, "return_aux"),
    ("kl-missing-selection", KL, False, _const("block_indices", None), ValueError, "block_indices"),
    # --- cu_seqlens metadata ------------------------------------------------------------------
    ("cu_seqlens_k-missing", SELECT, True, _const("cu_seqlens_k", None), ValueError, "cu_seqlens_k"),
    ("cu_seqlens_q-missing", ATTN, True, _const("cu_seqlens_q", None), ValueError, "cu_seqlens_q"),
    ("cu_seqlens_q-2d", SELECT, True, _with("cu_seqlens_q", lambda kw: kw["cu_seqlens_q"][None]), ValueError,
     "cu_seqlens_q"),
    ("cu_seqlens_q-len1", SELECT, True,
     {"cu_seqlens_q": lambda kw: kw["cu_seqlens_q"][:1], "cu_seqlens_k": lambda kw: kw["cu_seqlens_k"][:1]},
     ValueError, "cu_seqlens_q"),
    ("cu_seqlens_k-length-mismatch", SELECT, True,
     _const("cu_seqlens_k", torch.tensor([0, 40, 100, 140], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    ("cu_seqlens_q-noncontiguous", SELECT, True,
     _const("cu_seqlens_q", torch.tensor([0, 0, 5, 0, 12, 0], dtype=torch.int32)[::2]), ValueError,
     "cu_seqlens_q"),
    # --- cu_seqlens values (checked inside the op) --------------------------------------------
    ("cu_seqlens_q-start", SELECT, True, _const("cu_seqlens_q", torch.tensor([1, 5, 12], dtype=torch.int32)),
     ValueError, "cu_seqlens_q"),
    ("cu_seqlens_k-start", ATTN, True, _const("cu_seqlens_k", torch.tensor([2, 40, 140], dtype=torch.int32)),
     ValueError, "cu_seqlens_k"),
    ("cu_seqlens_q-decreasing", SELECT, True,
     _const("cu_seqlens_q", torch.tensor([0, 13, 12], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    ("cu_seqlens_q-end", SELECT, True, _const("cu_seqlens_q", torch.tensor([0, 5, 11], dtype=torch.int32)),
     ValueError, "cu_seqlens_q"),
    ("cu_seqlens_k-end", KL, True, _const("cu_seqlens_k", torch.tensor([0, 40, 141], dtype=torch.int32)),
     ValueError, "cu_seqlens_k"),
    ("cu_seqlens-Sq-gt-Sk", SPARSE, True, _const("cu_seqlens_k", torch.tensor([0, 4, 140], dtype=torch.int32)),
     ValueError, "cu_seqlens_q"),
    # --- max_seqlen ---------------------------------------------------------------------------
    ("max_seqlen_q-small-varlen", SELECT, True, _const("max_seqlen_q", 6), ValueError, "max_seqlen_q"),
    ("max_seqlen_k-small-varlen", ATTN, True, _const("max_seqlen_k", 99), ValueError, "max_seqlen_k"),
    ("max_seqlen_k-small-sparse", SPARSE, True, _const("max_seqlen_k", 50), ValueError, "max_seqlen_k"),
    ("max_seqlen_q-small-padded", SELECT, False, _const("max_seqlen_q", 11), ValueError, "max_seqlen_q"),
    ("max_seqlen_q-float", SELECT, True, _const("max_seqlen_q", 7.0), TypeError, "max_seqlen_q"),
    ("max_seqlen_k-negative", KL, True, _const("max_seqlen_k", -1), ValueError, "max_seqlen_k"),
    # --- block_indices values (validate=True, the default) -----------------------------------
    ("block_indices-id-too-large", ATTN, False, _bi_set(2), ValueError, "block_indices"),
    ("block_indices-id-below-minus-one", ATTN, False, _bi_set(-2), ValueError, "block_indices"),
    ("block_indices-duplicate", ATTN, False, _bi_dup(), ValueError, "block_indices"),
    ("block_indices-id-too-large-kl", KL, False, _bi_set(7), ValueError, "block_indices"),
    ("block_indices-duplicate-kl", KL, False, _bi_dup(), ValueError, "block_indices"),
    # Sequence 0 has Sk = 40 (1 block): id 1 is valid for sequence 1 but not for sequence 0.
    ("block_indices-id-per-sequence", ATTN, True,
     _with("block_indices", lambda kw: torch.where(torch.arange(12)[:, None, None] == 2,
                                                   torch.tensor([0, 1], dtype=torch.int32),
                                                   kw["block_indices"])),
     ValueError, "block_indices"),
]


@pytest.mark.parametrize("case_id, fn_name, varlen, overrides, exc, name", CASES, ids=[c[0] for c in CASES])
def test_invalid_argument_raises(case_id, fn_name, varlen, overrides, exc, name):
    with pytest.raises(exc) as info:
        _call(fn_name, varlen, **overrides)
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


def test_message_says_what_was_expected():
    with pytest.raises(ValueError, match=r"block_size must be one of \(64, 128\), got 32"):
        _call(SELECT, block_size=32)
    with pytest.raises(TypeError, match=r"q must be torch.bfloat16 or torch.float16.*got torch.int64"):
        _call(ATTN, **_dtype("q", torch.int64))
    with pytest.raises(ValueError, match=r"block_indices must hold -1 or block ids in \[0, 2\)"):
        _call(ATTN, **_bi_set(2))
    with pytest.raises(ValueError, match=r"must not repeat a block id"):
        _call(ATTN, **_bi_dup())


def test_validate_false_skips_block_indices_values():
    # A repeated id is the caller's responsibility with validate=False; the call still runs.
    out = _call(ATTN, validate=False, **_bi_dup())
    assert out.shape == (2, 12, 4, 64)
    with pytest.raises(ValueError, match=r"must not repeat a block id"):
        _call(KL, **_bi_dup())
    loss = _call(KL, validate=False, **_bi_dup())
    assert loss.shape == () and torch.isfinite(loss)


def test_kl_validate_false_same_loss():
    # On a valid selection the check changes nothing but the host sync.
    t, extra = _inputs(False)
    ids = msa_cuda.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK, **extra)
    a, b = (msa_cuda.indexer_kl_loss(t["q"], t["k"], t["q_idx"], t["k_idx"], ids, block_size=BS, validate=flag,
                                     **extra) for flag in (True, False))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Valid calls: pass and match the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("k_idx_head", [False, True], ids=["k_idx3", "k_idx_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=["bf16", "fp16", "fp32", "fp64"])
def test_valid_calls_match_reference(varlen, k_idx_head, dtype):
    t, extra = _inputs(varlen, dtype, k_idx_head)
    q, k, v, q_idx, k_idx = t["q"], t["k"], t["v"], t["q_idx"], t["k_idx"]
    opts = dict(block_size=BS, **extra)

    ids = msa_cuda.select_blocks(q_idx, k_idx, topk=TOPK, **opts)
    ref_ids = ref.select_blocks(q_idx, k_idx, topk=TOPK, **opts)
    assert ids.dtype == torch.int32
    assert torch.equal(ids, ref_ids)

    out, lse = msa_cuda.block_sparse_attn(q, k, v, ids, return_lse=True, **opts)
    ref_out, ref_lse = ref.block_sparse_attn(q, k, v, ids, return_lse=True, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    loss = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, ids, **opts)
    assert torch.equal(loss, ref.indexer_kl_loss(q, k, q_idx, k_idx, ids, **opts))
    loss_lse = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, ids, lse=lse, **opts)
    assert torch.equal(loss_lse, ref.indexer_kl_loss(q, k, q_idx, k_idx, ids, lse=lse, **opts))
    dense = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, None, dense=True, **opts)
    assert torch.equal(dense, ref.indexer_kl_loss(q, k, q_idx, k_idx, None, dense=True, **opts))

    out2, aux = msa_cuda.sparse_attn(q, k, v, q_idx, k_idx, topk=TOPK, return_aux=True, **opts)
    ref_out2, ref_aux = ref.sparse_attn(q, k, v, q_idx, k_idx, topk=TOPK, return_aux=True, **opts)
    assert isinstance(aux, msa_cuda.SparseAttnAux)
    assert torch.equal(out2, ref_out2)
    assert torch.equal(aux.block_indices, ref_aux.block_indices) and torch.equal(aux.lse, ref_aux.lse)


def test_valid_options_pass():
    t, _ = _inputs()
    q_idx, k_idx = t["q_idx"], t["k_idx"]
    # local_blocks = 0 acts as 1; explicit scales; max_seqlen given; init blocks.
    a = msa_cuda.select_blocks(q_idx, k_idx, block_size=BS, topk=TOPK, local_blocks=0)
    b = msa_cuda.select_blocks(q_idx, k_idx, block_size=BS, topk=TOPK, local_blocks=1)
    assert torch.equal(a, b)
    c = msa_cuda.select_blocks(q_idx, k_idx, block_size=BS, topk=TOPK, index_scale=3, init_blocks=1,
                               max_seqlen_q=12, max_seqlen_k=100)
    assert torch.equal(c, ref.select_blocks(q_idx, k_idx, block_size=BS, topk=TOPK, index_scale=3.0,
                                            init_blocks=1))
    assert msa_cuda.select_blocks(q_idx, k_idx, block_size=128, topk=32).shape == (2, 12, 2, 32)


def test_varlen_max_seqlen_and_empty_sequences():
    t, extra = _inputs(varlen=True)
    ids = msa_cuda.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK, max_seqlen_q=7,
                                 max_seqlen_k=100, **extra)
    assert torch.equal(ids, ref.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK, **extra))
    # An empty sequence (Sq_b = Sk_b = 0) in the middle of the batch is fine.
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 40, 140], dtype=torch.int32)
    ids = msa_cuda.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k)
    out = msa_cuda.block_sparse_attn(t["q"], t["k"], t["v"], ids, block_size=BS, cu_seqlens_q=cu_q,
                                     cu_seqlens_k=cu_k)
    assert torch.equal(out, ref.block_sparse_attn(t["q"], t["k"], t["v"], ids, block_size=BS, cu_seqlens_q=cu_q,
                                                  cu_seqlens_k=cu_k))


def test_non_contiguous_inputs():
    t, _ = _inputs()
    q = t["q"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    k_idx = torch.cat([t["k_idx"], t["k_idx"]], -1)[..., :64]
    assert not q.is_contiguous() and not k_idx.is_contiguous()
    ids = msa_cuda.select_blocks(t["q_idx"], k_idx, block_size=BS, topk=TOPK)
    assert torch.equal(ids, ref.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK))
    ids_nc = ids.transpose(0, 1).contiguous().transpose(0, 1)
    out = msa_cuda.block_sparse_attn(q, t["k"], t["v"], ids_nc, block_size=BS)
    assert torch.equal(out, ref.block_sparse_attn(t["q"], t["k"], t["v"], ids, block_size=BS))


def test_unsorted_selection_and_empty_rows():
    t, _ = _inputs()
    ids = ref.select_blocks(t["q_idx"], t["k_idx"], block_size=BS, topk=TOPK)
    flipped = ids.flip(-1).contiguous()  # unsorted, -1 first: allowed for a caller selection
    out = msa_cuda.block_sparse_attn(t["q"], t["k"], t["v"], flipped, block_size=BS)
    assert torch.equal(out, ref.block_sparse_attn(t["q"], t["k"], t["v"], flipped, block_size=BS))
    sorted_out = ref.block_sparse_attn(t["q"], t["k"], t["v"], ids, block_size=BS)
    torch.testing.assert_close(out, sorted_out, atol=1e-2, rtol=1e-2)  # only the summation order differs
    # Only block 1 for every query: queries before position 64 see nothing -> out 0, lse -inf.
    only_late = torch.full_like(ids, -1)
    only_late[..., 0] = 1
    t2, _ = _inputs()
    q = t2["q"][:, :12]
    out, lse = msa_cuda.block_sparse_attn(q, t2["k"][:, :70], t2["v"][:, :70], only_late, block_size=BS,
                                          return_lse=True)
    assert torch.isfinite(out).all()
    assert (lse[:, :, :6] == -math.inf).all() and torch.isfinite(lse[:, :, 6:]).all()
