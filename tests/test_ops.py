"""Op hygiene of msa_cuda's torch.library ops (CPU only, fast).

opcheck on every op; torch.compile(fullgraph=True) of the public functions, forward and backward;
gradients reach only the right inputs and equal the reference's; kernel dispatch rules and the
MSA_CUDA_FORCE_REFERENCE switch.
"""

import math
import os
import warnings

import pytest
import torch

import msa_cuda
from msa_cuda import _kernels, _ops
from msa_cuda import reference as ref

OPS = torch.ops.msa_cuda
BS = 64
TOPK = 2
HQ, HKV, D, DI = 4, 2, 64, 64


def _problem(varlen, dtype, seed=0):
    """Small problem: padded B=1, Sq=9, Sk=100; varlen Sq=(3, 6), Sk=(30, 100)."""
    torch.manual_seed(seed)
    if varlen:
        cu_q = torch.tensor([0, 3, 9], dtype=torch.int32)
        cu_k = torch.tensor([0, 30, 130], dtype=torch.int32)
        lead_q, lead_k = (9,), (130,)
    else:
        cu_q = cu_k = None
        lead_q, lead_k = (1, 9), (1, 100)
    q = torch.randn(*lead_q, HQ, D, dtype=dtype)
    k = torch.randn(*lead_k, HKV, D, dtype=dtype)
    v = torch.randn(*lead_k, HKV, D, dtype=dtype)
    q_idx = torch.randn(*lead_q, HKV, DI, dtype=dtype)
    k_idx = torch.randn(*lead_k, DI, dtype=dtype)
    ids = ref.select_blocks(q_idx, k_idx, block_size=BS, topk=TOPK, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return dict(q=q, k=k, v=v, q_idx=q_idx, k_idx=k_idx, ids=ids, cu_q=cu_q, cu_k=cu_k)


def _max_q(p):
    return -1 if p["cu_q"] is not None else p["q"].shape[1]


def _max_k(p):
    return -1 if p["cu_q"] is not None else p["k"].shape[1]


def _opts(p):
    return dict(block_size=BS, cu_seqlens_q=p["cu_q"], cu_seqlens_k=p["cu_k"])


DTYPES = [torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["bf16", "fp32", "fp64"]
LAYOUTS = pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_select_blocks(varlen, dtype):
    p = _problem(varlen, dtype)
    _opcheck(OPS.select_blocks, (p["q_idx"], p["k_idx"], p["cu_q"], p["cu_k"], _max_q(p), _max_k(p), BS, TOPK,
                                 0.125, 0, 1))


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_block_sparse_attn(varlen, dtype, deterministic):
    p = _problem(varlen, dtype)
    q, k, v = (p[n].requires_grad_() for n in "qkv")
    args = (q, k, v, p["ids"], p["cu_q"], p["cu_k"], _max_q(p), _max_k(p), BS, 0.125, True, deterministic)
    _opcheck(OPS.block_sparse_attn, args)
    out, lse = OPS.block_sparse_attn(*args)
    _opcheck(OPS.block_sparse_attn_backward,
             (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), p["ids"],
              out.detach(), lse.detach(), p["cu_q"], p["cu_k"], _max_q(p), _max_k(p), BS, 0.125, deterministic))
    _opcheck(OPS.block_sparse_attn_backward,
             (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), p["ids"], out.detach(),
              lse.detach(), p["cu_q"], p["cu_k"], _max_q(p), _max_k(p), BS, 0.125, deterministic))


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["sparse", "sparse_lse", "dense"])
def test_opcheck_indexer_kl_loss(varlen, dtype, mode):
    p = _problem(varlen, dtype)
    lse = None
    if mode == "sparse_lse":
        lse = ref.block_sparse_attn(p["q"], p["k"], p["v"], p["ids"], return_lse=True, softmax_scale=0.125,
                                    **_opts(p))[1]
    ids = None if mode == "dense" else p["ids"]
    q_idx, k_idx = p["q_idx"].requires_grad_(), p["k_idx"].requires_grad_()
    tail = (lse, p["cu_q"], p["cu_k"], _max_q(p), _max_k(p), BS, 0.125, 0.2, mode == "dense")
    for need_grad in (False, True):  # the gradients with the loss, or recomputed by the backward op
        _opcheck(OPS.indexer_kl_loss, (p["q"], p["k"], q_idx, k_idx, ids) + tail + (need_grad, need_grad))
    loss, _, _ = OPS.indexer_kl_loss(p["q"], p["k"], q_idx, k_idx, ids, *tail, False, True)
    _opcheck(OPS.indexer_kl_loss_backward,
             (torch.ones_like(loss), p["q"], p["k"], q_idx.detach(), k_idx.detach(), ids) + tail)


def test_op_schemas():
    expected = {
        "select_blocks": "msa_cuda::select_blocks(Tensor q_idx, Tensor k_idx, Tensor? cu_seqlens_q, "
                         "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, SymInt block_size, "
                         "SymInt topk, float index_scale, SymInt init_blocks, SymInt local_blocks) -> Tensor",
        "block_sparse_attn": "msa_cuda::block_sparse_attn(Tensor q, Tensor k, Tensor v, Tensor block_indices, "
                             "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
                             "SymInt max_seqlen_k, SymInt block_size, float softmax_scale, bool validate, "
                             "bool deterministic) -> (Tensor, Tensor)",
    }
    for name, schema in expected.items():
        assert str(getattr(OPS, name).default._schema) == schema
    for name in ("block_sparse_attn_backward", "indexer_kl_loss", "indexer_kl_loss_backward"):
        assert hasattr(OPS, name)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------


def _leaves(p, names):
    return [p[n].detach().clone().requires_grad_() for n in names]


@LAYOUTS
def test_compile_fullgraph_forward_backward(varlen):
    torch._dynamo.reset()
    p = _problem(varlen, torch.bfloat16)
    cu_q, cu_k = p["cu_q"], p["cu_k"]

    def step(q, k, v, q_idx, k_idx, cu_q, cu_k):
        ids = msa_cuda.select_blocks(q_idx.detach(), k_idx.detach(), block_size=BS, topk=TOPK,
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        out, lse = msa_cuda.block_sparse_attn(q, k, v, ids, block_size=BS, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                              return_lse=True)
        kl = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, ids, block_size=BS, lse=lse.detach(),
                                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        dense = msa_cuda.indexer_kl_loss(q, k, q_idx, k_idx, None, dense=True, block_size=BS,
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        out2, aux = msa_cuda.sparse_attn(q, k, v, q_idx, k_idx, block_size=BS, topk=TOPK, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, return_aux=True)
        total = out.float().square().sum() + lse.sum() + out2.float().sum() + kl + dense
        return total, ids, aux.block_indices

    names = ("q", "k", "v", "q_idx", "k_idx")
    eager_in = _leaves(p, names)
    eager = step(*eager_in, cu_q, cu_k)
    eager[0].backward()

    compiled_in = _leaves(p, names)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_in, cu_q, cu_k)
    compiled[0].backward()

    assert torch.equal(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[2], eager[2])
    for a, b in zip(compiled_in, eager_in):
        assert torch.equal(a.grad, b.grad)


def test_compile_fullgraph_each_public_function():
    torch._dynamo.reset()
    p = _problem(False, torch.float32)
    q, k, v, q_idx, k_idx, ids = (p[n] for n in ("q", "k", "v", "q_idx", "k_idx", "ids"))
    calls = [
        (msa_cuda.select_blocks, (q_idx, k_idx[:, :, None]), dict(block_size=BS, topk=TOPK, index_scale=0.3)),
        (msa_cuda.block_sparse_attn, (q, k, v, ids), dict(block_size=BS, softmax_scale=0.2)),
        (msa_cuda.indexer_kl_loss, (q, k, q_idx, k_idx, ids), dict(block_size=BS)),
        (msa_cuda.sparse_attn, (q, k, v, q_idx, k_idx), dict(block_size=BS, topk=TOPK, init_blocks=1)),
    ]
    for fn, args, kwargs in calls:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        assert torch.equal(compiled(*args, **kwargs), fn(*args, **kwargs)), fn.__name__


def test_compile_raises_validation_errors():
    torch._dynamo.reset()
    p = _problem(True, torch.bfloat16)
    fn = torch.compile(msa_cuda.block_sparse_attn, fullgraph=True, backend="eager")
    bad = p["ids"].clone()
    bad[0, 0, 0] = 5  # out of range (value check inside the op)
    with pytest.raises(ValueError, match="block_indices"):
        fn(p["q"], p["k"], p["v"], bad, **_opts(p))
    # A metadata check fails while tracing: under fullgraph=True dynamo reports the ValueError as its
    # own exception type (the message or the traced source names the argument).
    with pytest.raises(Exception, match="block_size"):
        fn(p["q"], p["k"], p["v"], p["ids"], block_size=32, cu_seqlens_q=p["cu_q"], cu_seqlens_k=p["cu_k"])


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_attention_gradients_match_reference(varlen, dtype):
    p = _problem(varlen, dtype)
    ours = _leaves(p, "qkv")
    theirs = _leaves(p, "qkv")
    out, lse = msa_cuda.block_sparse_attn(*ours, p["ids"], return_lse=True, **_opts(p))
    r_out, r_lse = ref.block_sparse_attn(*theirs, p["ids"], return_lse=True, **_opts(p))
    assert torch.equal(out, r_out) and torch.equal(lse, r_lse)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward((out, lse), (g_out, g_lse))
    torch.autograd.backward((r_out, r_lse), (g_out, g_lse))
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


@LAYOUTS
@pytest.mark.parametrize("mode", ["sparse", "sparse_lse", "dense"])
def test_kl_gradients_match_reference_and_skip_q_k(varlen, mode):
    p = _problem(varlen, torch.float64)
    ids = None if mode == "dense" else p["ids"]
    lse = None
    if mode == "sparse_lse":
        lse = ref.block_sparse_attn(p["q"], p["k"], p["v"], ids, return_lse=True, **_opts(p))[1]
    names = ("q", "k", "q_idx", "k_idx")
    ours, theirs = _leaves(p, names), _leaves(p, names)
    kw = dict(dense=mode == "dense", lse=lse, **_opts(p))
    loss = msa_cuda.indexer_kl_loss(*ours, ids, **kw)
    r_loss = ref.indexer_kl_loss(*theirs, ids, **kw)
    assert torch.equal(loss, r_loss)
    (3.0 * loss).backward()
    (3.0 * r_loss).backward()
    assert ours[0].grad is None and ours[1].grad is None  # nothing reaches q, k
    for a, b in zip(ours[2:], theirs[2:]):
        # The op computes d loss / d x with the loss and scales it by the incoming 3.0; autograd
        # through the reference carries the 3.0 down the graph: equal up to the last bits.
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
        assert a.grad.abs().sum() > 0


def test_sparse_attn_gradients_reach_only_q_k_v():
    p = _problem(False, torch.float32)
    leaves = _leaves(p, ("q", "k", "v", "q_idx", "k_idx"))
    out, aux = msa_cuda.sparse_attn(*leaves, block_size=BS, topk=TOPK, return_aux=True)
    (out.sum() + aux.lse.sum()).backward()
    q, k, v, q_idx, k_idx = leaves
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert q_idx.grad is None and k_idx.grad is None
    assert not aux.block_indices.requires_grad


def test_k_idx_with_head_dim_gets_gradient_of_its_shape():
    p = _problem(False, torch.float64)
    k_idx4 = p["k_idx"][:, :, None].clone().requires_grad_()
    q_idx = p["q_idx"].clone().requires_grad_()
    loss = msa_cuda.indexer_kl_loss(p["q"], p["k"], q_idx, k_idx4, p["ids"], block_size=BS)
    loss.backward()
    assert k_idx4.grad.shape == k_idx4.shape


def test_gradcheck_fp64():
    p = _problem(True, torch.float64)
    q, k, v = _leaves(p, "qkv")

    def attn(q, k, v):
        return msa_cuda.block_sparse_attn(q, k, v, p["ids"], return_lse=True, **_opts(p))

    assert torch.autograd.gradcheck(attn, (q, k, v), fast_mode=True)
    q_idx, k_idx = _leaves(p, ("q_idx", "k_idx"))

    def kl(q_idx, k_idx):
        return msa_cuda.indexer_kl_loss(p["q"], p["k"], q_idx, k_idx, p["ids"], **_opts(p))

    assert torch.autograd.gradcheck(kl, (q_idx, k_idx), fast_mode=True)


def test_empty_rows_have_finite_gradients():
    p = _problem(False, torch.float64)
    only_late = torch.full_like(p["ids"], -1)
    only_late[..., 0] = 1  # block 1 starts at 64; Sk=100, Sq=9 -> all queries (91..99) see it
    k, v = p["k"][:, :70], p["v"][:, :70]  # Sk=70: queries at 61..69; those before 64 see nothing
    q, k, v = (t.detach().clone().requires_grad_() for t in (p["q"], k, v))
    out, lse = msa_cuda.block_sparse_attn(q, k, v, only_late, block_size=BS, return_lse=True)
    assert (lse[..., :3] == -math.inf).all() and (out[:, :3] == 0).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


# --------------------------------------------------------------------------------------------
# Dispatch: kernels, fallback warning, MSA_CUDA_FORCE_REFERENCE
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_sm90(monkeypatch):
    """Pretend the extension is loaded, registers every op, and the GPU is SM90."""
    monkeypatch.setattr(_kernels, "_C", object())
    monkeypatch.setattr(_kernels, "_registered", lambda name: True)
    monkeypatch.setattr(_kernels, "_device_capability", lambda index: (9, 0))
    monkeypatch.delenv("MSA_CUDA_FORCE_REFERENCE", raising=False)


def test_has_kernel_rules(fake_sm90, monkeypatch):
    cuda0 = torch.device("cuda", 0)
    assert _kernels.has_kernel("select_blocks", cuda0, torch.bfloat16)
    assert _kernels.has_kernel("select_blocks", cuda0, torch.float16)
    assert _kernels.has_kernel("select_blocks", cuda0)
    assert not _kernels.has_kernel("select_blocks", cuda0, torch.float32)
    assert not _kernels.has_kernel("select_blocks", cuda0, torch.float64)
    assert not _kernels.has_kernel("select_blocks", "cpu", torch.bfloat16)
    assert _kernels.has_kernel("block_sparse_attn", cuda0, torch.bfloat16)
    assert _kernels.has_kernel("indexer_kl_loss", cuda0, torch.bfloat16)
    assert not _kernels.has_kernel("indexer_kl_loss_backward", cuda0, torch.bfloat16)  # via the forward's kernel
    monkeypatch.setattr(_kernels, "_registered", lambda name: False)
    assert not _kernels.has_kernel("select_blocks", cuda0, torch.bfloat16)


@pytest.mark.parametrize("value, forced", [("1", True), ("true", True), ("0", False), ("", False)])
def test_force_reference_env(fake_sm90, monkeypatch, value, forced):
    monkeypatch.setenv("MSA_CUDA_FORCE_REFERENCE", value)
    assert _kernels.force_reference() == forced
    assert _kernels.has_kernel("select_blocks", torch.device("cuda", 0), torch.bfloat16) == (not forced)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("MSA_CUDA_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(_kernels, "_warned_fallback", False)
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(_kernels, "_C", None)
    with pytest.warns(RuntimeWarning, match="msa_cuda._C is not available"):
        assert not _kernels.has_kernel("select_blocks", cuda0, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _kernels.has_kernel("select_blocks", cuda0, torch.bfloat16)  # no second warning
    monkeypatch.setattr(_kernels, "_warned_fallback", False)
    monkeypatch.setattr(_kernels, "_C", object())
    monkeypatch.setattr(_kernels, "_device_capability", lambda index: (8, 0))
    with pytest.warns(RuntimeWarning, match="compute capability 8.0"):
        assert not _kernels.has_kernel("select_blocks", cuda0, torch.bfloat16)
    monkeypatch.setattr(_kernels, "_warned_fallback", False)
    monkeypatch.setenv("MSA_CUDA_FORCE_REFERENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing the reference is deliberate: no warning
        assert not _kernels.has_kernel("select_blocks", cuda0, torch.bfloat16)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_select_dispatches_to_kernel_with_its_contract(monkeypatch, varlen):
    """The op hands the kernel contiguous inputs, a squeezed k_idx, max_seqlen_q and max(1, local_blocks);
    MSA_CUDA_FORCE_REFERENCE=1 sends the same call to the reference."""
    calls = []
    p = _problem(varlen, torch.bfloat16)
    expected = ref.select_blocks(p["q_idx"], p["k_idx"], **_opts(p), topk=TOPK)

    def fake_kernel(q_idx, k_idx, cu_q, cu_k, max_seqlen_q, block_size, topk, init_blocks, local_blocks):
        calls.append(dict(q_idx=q_idx, k_idx=k_idx, cu_q=cu_q, max_seqlen_q=max_seqlen_q, block_size=block_size,
                          topk=topk, init_blocks=init_blocks, local_blocks=local_blocks))
        return expected.clone()

    monkeypatch.setattr(_kernels, "has_kernel",
                        lambda op, device, dtype=None: op == "select_blocks" and not _kernels.force_reference())
    monkeypatch.setattr(_kernels, "kernel", lambda op: fake_kernel)
    monkeypatch.delenv("MSA_CUDA_FORCE_REFERENCE", raising=False)
    q_idx = p["q_idx"].transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous
    k_idx = p["k_idx"][..., None, :]  # with the size-1 head dim
    ids = msa_cuda.select_blocks(q_idx, k_idx, topk=TOPK, local_blocks=0, **_opts(p))
    assert torch.equal(ids, expected)
    (call,) = calls
    assert call["q_idx"].is_contiguous() and call["k_idx"].is_contiguous()
    assert call["k_idx"].dim() == p["k_idx"].dim()
    assert call["max_seqlen_q"] == (6 if varlen else 9)
    assert (call["block_size"], call["topk"], call["init_blocks"], call["local_blocks"]) == (BS, TOPK, 0, 1)

    monkeypatch.setenv("MSA_CUDA_FORCE_REFERENCE", "1")
    ids = msa_cuda.select_blocks(q_idx, k_idx, topk=TOPK, **_opts(p))
    assert torch.equal(ids, expected) and len(calls) == 1


# --------------------------------------------------------------------------------------------
# Package surface
# --------------------------------------------------------------------------------------------


def test_package_surface():
    assert msa_cuda.__version__ == "0.1.0"
    for name in ("select_blocks", "block_sparse_attn", "indexer_kl_loss", "sparse_attn", "sparse_attn_with_kvcache",
                 "reference", "compiled_variants"):
        assert hasattr(msa_cuda, name), name
    assert msa_cuda.reference is ref
    assert isinstance(msa_cuda.compiled_variants(), dict)
    if not _kernels.extension_loaded():
        assert _kernels.load_error() is not None
        assert msa_cuda.compiled_variants() == {}
    else:
        assert _kernels.load_error() is None


def test_built_extension_loads():
    """A compiled ``_C`` next to the package must import: an unresolved symbol (say, a kernel
    instantiation no translation unit defines) would otherwise send every op to the reference
    without failing anything."""
    import glob

    built = glob.glob(os.path.join(os.path.dirname(msa_cuda.__file__), "_C*.so"))
    if not built:
        pytest.skip("no compiled extension in this package (source tree or a build without CUDA)")
    assert _kernels.extension_loaded(), f"{built[0]} failed to load: {_kernels.load_error()!r}"


def test_ops_module_exports_ops():
    for name in _ops.__all__:
        assert hasattr(OPS, name)


def test_docstring_examples():
    import doctest

    import msa_cuda.api

    result = doctest.testmod(msa_cuda.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
