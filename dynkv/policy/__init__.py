"""The leader's policies: eviction order per tier, admission to slower tiers, load or recompute."""

from dynkv.policy.admission import FrequencyFilter
from dynkv.policy.cost import CostModel
from dynkv.policy.eviction import EVICTION_POLICIES, EvictionPolicy, FIFOPolicy, LRUPolicy

__all__ = ["EVICTION_POLICIES", "CostModel", "EvictionPolicy", "FIFOPolicy", "FrequencyFilter", "LRUPolicy"]
