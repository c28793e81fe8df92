"""Run a few M3 decode steps (for ncu / compute-sanitizer): python bench/decode_step_once.py [LEN] [B] [--fp8]."""

import sys

import torch

import msa_cuda

length = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 2
fp8 = "--fp8" in sys.argv
bf16 = dict(device="cuda", dtype=torch.bfloat16)
k_cache = torch.randn(batch, length, 4, 128, **bf16)
v_cache = torch.randn_like(k_cache)
k_idx_cache = torch.randn(batch, length, 128, **bf16)
scales = None
if fp8:
    k_idx_cache, scales = msa_cuda.quantize_index_keys(k_idx_cache)
q = torch.randn(batch, 1, 64, 128, **bf16)
q_idx = torch.randn(batch, 1, 4, 128, **bf16)
lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
for _ in range(3):
    msa_cuda.sparse_attn_with_kvcache(q, k_cache, v_cache, q_idx, k_idx_cache, k_idx_scale_cache=scales,
                                      cache_seqlens=lens)
torch.cuda.synchronize()
print("ok")
