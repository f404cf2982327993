"""``dynkv proxy``: an OpenAI-compatible front over vLLM engines (disaggregated prefill/decode, or N aggregated
engines with KV-aware routing)."""

from dynkv.proxy.router import POLICIES, PrefixIndex, Router
from dynkv.proxy.server import DESCRIPTION, Proxy, prefill_body

__all__ = ["DESCRIPTION", "POLICIES", "PrefixIndex", "Proxy", "Router", "prefill_body"]
