"""The leader's policies: eviction order per tier and admission to slower tiers."""

from dynkv.policy.admission import FrequencyFilter
from dynkv.policy.eviction import EVICTION_POLICIES, EvictionPolicy, FIFOPolicy, LRUPolicy

__all__ = ["EVICTION_POLICIES", "EvictionPolicy", "FIFOPolicy", "FrequencyFilter", "LRUPolicy"]
