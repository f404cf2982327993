"""The leader: one per engine, in vLLM's scheduler process (page index, tiers, each step's plan)."""

from dynkv.leader.leader import Leader

__all__ = ["Leader"]
