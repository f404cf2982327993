"""The tiers below vLLM's own KV cache: names, the secondary-tier contract, host pool naming, the disk tier.

Import the disk tier from :mod:`dynkv.tiers.disk` (it loads the extension);
this face only re-exports the light names.
"""

from dynkv.tiers.base import DEVICE, DISK, HOST, REMOTE, SecondaryTier

__all__ = ["DEVICE", "DISK", "HOST", "REMOTE", "SecondaryTier"]
