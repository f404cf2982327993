"""``dynkv proxy``: an OpenAI-compatible front over vLLM engines (disaggregated prefill/decode today)."""

from dynkv.proxy.server import DESCRIPTION, Proxy, prefill_body

__all__ = ["DESCRIPTION", "Proxy", "prefill_body"]
