"""The leader's policies: eviction order per tier, admission to slower tiers, load or recompute."""

from dynkv.policy.admission import FrequencyFilter
from dynkv.policy.cost import CostModel
from dynkv.policy.eviction import EVICTION_POLICIES, EvictionPolicy, FIFOPolicy, LRUPolicy, S3FIFOPolicy

__all__ = ["EVICTION_POLICIES", "CostModel", "EvictionPolicy", "FIFOPolicy", "FrequencyFilter", "LRUPolicy",
           "S3FIFOPolicy"]
