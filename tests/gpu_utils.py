"""Helpers for the GPU tests: device gating, allocator poisoning, caller-made selections."""

import itertools

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


def random_selection(b, sq, sk, hkv, topk, block_size, seed, unsorted=True, device="cuda"):
    """Caller-made selections [b, sq, hkv, topk] int32: random distinct blocks per (token, group),
    shuffled (sorted when not ``unsorted``), -1 padded, some slots naming blocks past the query's
    position (masked entirely)."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-sk // block_size)
    sel = torch.full((b, sq, hkv, topk), -1, dtype=torch.int32)
    for bi, i, h in itertools.product(range(b), range(sq), range(hkv)):
        n = int(torch.randint(0, min(topk, nblk) + 1, (1,), generator=g))
        ids = torch.randperm(nblk, generator=g)[:n]
        if not unsorted:
            ids = ids.sort().values
        sel[bi, i, h, :n] = ids.to(torch.int32)
    return sel.to(device)

