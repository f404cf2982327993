"""``dynkv bench e2e``: TTFT per tier inside vLLM, one engine process per configuration (:mod:`.run`)."""
