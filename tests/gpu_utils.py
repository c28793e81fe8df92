"""Helpers for the GPU tests: device gating and allocator poisoning."""

import pytest
import torch


def sm90_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def kernels_loaded() -> bool:
    try:
        from msa_cuda import _kernels
    except ImportError:
        return False
    return _kernels.extension_loaded()


requires_sm90 = pytest.mark.skipif(
    not (sm90_available() and kernels_loaded()),
    reason="needs an SM90 GPU (H100/H200/H800) and the compiled msa_cuda._C extension",
)


def poison_allocator(nbytes: int, value: int = 0x7F) -> None:
    """Fill a freed block of the caching allocator with a poison byte pattern.

    Kernels allocate their outputs with torch.empty, which reuses the block freed here, so any
    element a kernel fails to write keeps the poison (0x7f7f7f7f as int32: far out of range)."""
    blob = torch.full((max(nbytes, 1),), value, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    del blob
