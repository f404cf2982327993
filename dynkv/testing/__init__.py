"""Helpers shared by the tests, the demo and the benchmarks: random-weight models, a real vLLM server.

No product module imports this package.
"""
