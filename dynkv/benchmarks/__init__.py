"""``dynkv bench ...`` and ``dynkv demo``: measurements against a baseline measured in the same run.

No product module imports this package; it may import :mod:`dynkv.testing`.
"""
