"""``dynkv bench load``: multi-turn conversations under a closed loop, plain vLLM against dynkv and vLLM's offloading."""
