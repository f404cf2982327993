"""The worker: one per TP rank, in vLLM's worker process (the copies between vLLM's KV cache and the host tier)."""

from dynkv.worker.worker import Worker, in_process

__all__ = ["Worker", "in_process"]
