"""msa_cuda: MiniMax Sparse Attention (MSA) for Hopper (SM90) GPUs.

Public functions: :func:`select_blocks` (routing), :func:`block_sparse_attn` (main branch),
:func:`indexer_kl_loss` (indexer distillation), :func:`sparse_attn` (select then attend),
:func:`sparse_attn_with_kvcache` (a decoding step over a KV cache).
:mod:`msa_cuda.reference` is the pure-PyTorch definition they are tested against.

The compiled extension ``msa_cuda._C`` is optional: without it (or on a GPU other than SM90, or
with ``MSA_CUDA_FORCE_REFERENCE=1``) every function runs on the reference.
"""

from . import reference
from ._kernels import compiled_variants
from .api import SparseAttnAux, block_sparse_attn, indexer_kl_loss, select_blocks, sparse_attn
from .decode import sparse_attn_with_kvcache
from .reference import dequantize_index_keys, quantize_index_keys

__version__ = "0.1.0"

__all__ = [
    "select_blocks",
    "block_sparse_attn",
    "indexer_kl_loss",
    "sparse_attn",
    "sparse_attn_with_kvcache",
    "quantize_index_keys",
    "dequantize_index_keys",
    "SparseAttnAux",
    "reference",
    "compiled_variants",
    "__version__",
]
