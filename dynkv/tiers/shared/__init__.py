"""The shared tier (G4): pages in a store many engines share; one backend file per store."""

from dynkv.tiers.shared.base import StoreBackend, StoreUnavailable, redact
from dynkv.tiers.shared.tier import SharedPageError, SharedPageMissing, SharedTier

__all__ = ["SharedPageError", "SharedPageMissing", "SharedTier", "StoreBackend", "StoreUnavailable", "redact"]
