"""Quick timing of the dense warm-up KL kernel against dense cuDNN forward (same process)."""
import sys, torch, msa_cuda
from torch.nn.attention import sdpa_kernel, SDPBackend
torch.manual_seed(0)
dev = "cuda"
for S in [int(x) for x in sys.argv[1:]] or [8192, 32768]:
    Hq, Hkv, D, Di = 64, 4, 128, 128
    q = torch.randn(1, S, Hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(1, S, Hkv, Di, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(1, S, Di, device=dev, dtype=torch.bfloat16)
    kx = k.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    qt = q.transpose(1, 2)
    def dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kx, kx, is_causal=True)
    lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kx, kx, 0.0, True, False, scale=D ** -0.5)[1].float().contiguous()
    qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    def kl():
        loss = msa_cuda.indexer_kl_loss(q, k, qig, kig, None, dense=True, lse=lse)
        loss.backward()
        return loss
    def t(fn, reps=5):
        for _ in range(2): fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]
    td, tk = t(dense), t(kl)
    loss = kl()
    print(f"S={S} dense cuDNN fwd {td:.3f} ms  dense KL fwd+bwd {tk:.3f} ms  ratio {tk/td:.3f}  loss {loss.item():.5f} "
          f"grad finite {bool(torch.isfinite(qig.grad).all() and torch.isfinite(kig.grad).all())}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        kl(); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
