"""Bridge between the Python ops and the compiled extension ``msa_cuda._C``.

Importing ``msa_cuda._C`` registers the CUDA kernels as torch ops in the namespace
``msa_cuda_kernels``. The extension is optional: in a source checkout (or on a machine where the
build was skipped) it is absent and every op runs on :mod:`msa_cuda.reference` instead. This
module answers one question for the op bodies in :mod:`msa_cuda._ops`: *may this call use a
kernel?* (:func:`has_kernel`), and hands out the kernel callable (:func:`kernel`).

Routing rules
-------------
- CPU tensors always use the reference.
- CUDA tensors use a kernel when: the op is listed in ``_KERNEL_OPS`` (it has a Python adapter
  in ``_ops.py``), the extension loaded and registers the compiled op, the device has compute capability 9.0,
  the dtype is bf16/fp16, and ``MSA_CUDA_FORCE_REFERENCE`` is not set. Otherwise the reference runs
  on the GPU.
- When a CUDA call falls back only because the extension is missing or the GPU is not SM90, a
  warning is issued once per process.

The environment variable ``MSA_CUDA_FORCE_REFERENCE=1`` forces the reference everywhere; it is read
at every call so tests and benchmarks can toggle it.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Dict, Optional

import torch

__all__ = [
    "extension_loaded",
    "load_error",
    "has_kernel",
    "kernel",
    "force_reference",
    "compiled_variants",
]

# msa_cuda op name -> the compiled op (torch.ops.msa_cuda_kernels.<name>) its adapter in _ops.py
# calls. Switching another op to its kernel: add it here and fill in its adapter in _ops.py.
_KERNEL_OPS = {
    "select_blocks": "select_blocks",
    "check_block_indices": "check_block_indices",
    "block_sparse_attn": "block_sparse_attn_fwd",
    "block_sparse_attn_backward": "block_sparse_attn_bwd",
    "indexer_kl_loss": "indexer_kl",
    "indexer_kl_loss_dense": "indexer_kl_dense",
    "sparse_attn_with_kvcache": "decode_step",
}

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_REQUIRED_CAPABILITY = (9, 0)
_FORCE_ENV = "MSA_CUDA_FORCE_REFERENCE"

_C = None
_LOAD_ERROR: Optional[BaseException] = None
try:  # The compiled extension is optional; everything works on the reference without it.
    from . import _C  # type: ignore[attr-defined,no-redef]  # noqa: F811
except Exception as exc:  # ImportError, or OSError from a broken shared library
    _C = None
    _LOAD_ERROR = exc

_warned_fallback = False


def extension_loaded() -> bool:
    """Return True when the compiled extension ``msa_cuda._C`` was imported."""
    return _C is not None


def load_error() -> Optional[BaseException]:
    """Return the exception raised while importing ``msa_cuda._C``, or None if it loaded."""
    return _LOAD_ERROR


def force_reference() -> bool:
    """Return True when ``MSA_CUDA_FORCE_REFERENCE`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(_FORCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def compiled_variants() -> Dict:
    """Return the variants the extension was compiled with (``_C.compiled_variants()``).

    Returns an empty dict when the extension is absent or does not report its variants.
    """
    if _C is not None and hasattr(_C, "compiled_variants"):
        return dict(_C.compiled_variants())
    return {}


@functools.lru_cache(maxsize=None)
def _device_capability(index: int):
    return torch.cuda.get_device_capability(index)


def _registered(op_name: str) -> bool:
    if _C is None:
        return False
    return hasattr(torch.ops.msa_cuda_kernels, _KERNEL_OPS[op_name])


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"msa_cuda: running the PyTorch reference on CUDA tensors because {reason}; "
            "this is correct but slow.",
            RuntimeWarning,
            stacklevel=3,
        )


def has_kernel(op_name: str, device, dtype: Optional[torch.dtype] = None, warn: bool = True) -> bool:
    """Return True when ``op_name`` may run on a compiled kernel for this device and dtype.

    Parameters
    ----------
    op_name : str
        Op name without namespace, e.g. ``"select_blocks"``.
    device : torch.device or str
        Device of the op's inputs.
    dtype : torch.dtype, optional
        Floating dtype of the op's inputs. Only bf16/fp16 run on kernels; fp32/fp64 always use the
        reference. Default None skips the dtype check.
    warn : bool, default True
        False: never warn (for callers whose PyTorch path is not a slow fallback).

    Notes
    -----
    Issues a one-time ``RuntimeWarning`` when CUDA inputs of an op that has a kernel fall back to
    the reference because the extension is missing or the GPU is not SM90. It never warns when
    ``MSA_CUDA_FORCE_REFERENCE`` is set or the dtype is fp32/fp64 (those are deliberate).
    """
    device = torch.device(device)
    if device.type != "cuda" or op_name not in _KERNEL_OPS:
        return False
    if force_reference():
        return False
    if dtype is not None and dtype not in _KERNEL_DTYPES:
        return False
    if _C is None:
        if warn:
            _warn_fallback_once(f"the compiled extension msa_cuda._C is not available ({_LOAD_ERROR!r})")
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _device_capability(index)
    if tuple(capability) != _REQUIRED_CAPABILITY:
        if warn:
            _warn_fallback_once(
                f"the GPU has compute capability {capability[0]}.{capability[1]} "
                "and the kernels require 9.0 (Hopper)"
            )
        return False
    return _registered(op_name)


def kernel(op_name: str) -> Callable:
    """Return the compiled op behind msa_cuda op ``op_name`` (call only after has_kernel)."""
    return getattr(torch.ops.msa_cuda_kernels, _KERNEL_OPS[op_name])
