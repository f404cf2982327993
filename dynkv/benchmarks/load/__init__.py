"""``dynkv bench load``: multi-turn conversations under a closed loop; plain vLLM, dynkv and vLLM's offloading."""
