"""One block_sparse_attn forward at M3 shape (for ncu / compute-sanitizer runs): warm-up + one call.

    python scripts/fwd_once.py [--seqlen 32768] [--selection indexer|hot]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import msa_cuda  # noqa: E402
from common import Shape, hot_block_selection  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--seqlen", type=int, default=32768)
parser.add_argument("--selection", choices=("indexer", "hot"), default="indexer")
args = parser.parse_args()
s = args.seqlen
mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
q, k, v = mk(1, s, 64, 128), mk(1, s, 4, 128), mk(1, s, 4, 128)
if args.selection == "hot":
    sel = hot_block_selection(Shape(seqlen=s), torch.device("cuda"))
else:
    sel = msa_cuda.select_blocks(mk(1, s, 4, 128), mk(1, s, 128))
for _ in range(2):
    msa_cuda.block_sparse_attn(q, k, v, sel, validate=False)
torch.cuda.synchronize()
