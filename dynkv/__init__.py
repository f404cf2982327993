"""dynkv: a KV-cache block manager for vLLM.

Importing dynkv never touches a GPU; CUDA is initialized by the first GPU op.
"""

from dynkv._version import __version__
from dynkv.env import cuda_compiled
from dynkv.layout import PageGeometry, PagedView, head_range
from dynkv.memory import HostPool, PageBuffer
from dynkv.ops import copy_blocks, gather, memcpy_batch, scatter

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
