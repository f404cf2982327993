"""dynkv: a KV-cache block manager for vLLM.

Importing dynkv never touches a GPU; CUDA is initialized by the first GPU op.
"""

from dynkv.layout import PageGeometry, PagedView, head_range
from dynkv.ops import HostPool, PageBuffer, copy_blocks, cuda_compiled, gather, memcpy_batch, scatter

__version__ = "0.1.0"

__all__ = [
    "HostPool",
    "PageBuffer",
    "PageGeometry",
    "PagedView",
    "__version__",
    "copy_blocks",
    "cuda_compiled",
    "gather",
    "head_range",
    "memcpy_batch",
    "scatter",
]
