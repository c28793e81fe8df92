import torch, torch.nn.functional as F, sys
from torch.nn.attention import sdpa_kernel, SDPBackend
import msa_cuda
from msa_cuda import reference as ref
def bench(fn, reps=10):
    for _ in range(3): fn()
    ts=[]
    for _ in range(reps):
        a=torch.cuda.Event(enable_timing=True); b=torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
print(torch.cuda.get_device_name())
for S in [8192, 32768, 131072]:
    qi=torch.randn(1,S,4,128,device='cuda',dtype=torch.bfloat16); ki=torch.randn(1,S,128,device='cuda',dtype=torch.bfloat16)
    op=lambda: torch.ops.msa_cuda_kernels.select_blocks(qi,ki,None,None,0,128,16,0,1)
    t=bench(op); fl=2*4*128*S*S/2
    q=torch.randn(1,64,S,128,device='cuda',dtype=torch.bfloat16); k=torch.randn(1,64,S,128,device='cuda',dtype=torch.bfloat16); v=torch.randn_like(k)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        td=bench(lambda: F.scaled_dot_product_attention(q,k,v,is_causal=True), reps=5)
    fd=4*64*128*S*S/2
    print(f"S={S} select {t:.3f} ms {fl/t/1e9:.1f} TFLOPS | dense cudnn {td:.3f} ms {fd/td/1e9:.1f} TFLOPS | ratio {fl/t/(fd/td):.2f}")
    del q,k,v; torch.cuda.empty_cache()
