"""Shared fixtures: a seeded RNG per test, and the ``gpu`` marker's skip.

Every test that draws random data takes ``rng``. Its seed is derived from one
run-wide base seed (``DYNKV_TEST_SEED``, else random) and the test's node id,
and printed, so a failure reproduces with ``DYNKV_TEST_SEED=<base> pytest <id>``.
The KV-cache builders and byte references live in ``kvtensors.py``.
"""

from __future__ import annotations

import functools
import os
import random
import zlib

import numpy as np
import pytest
import torch

import dynkv

# Real stores on loopback ports for the shared tier: redis_server, redis_cluster, mooncake_master.
pytest_plugins = ["stores"]

BASE_SEED = int(os.environ.get("DYNKV_TEST_SEED", random.SystemRandom().randrange(2**32)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"dynkv: DYNKV_TEST_SEED={BASE_SEED}"


@functools.cache
def gpu_unavailable() -> str | None:
    """Why the ``gpu`` tests cannot run here, or None when they can."""
    if not dynkv.cuda_compiled():
        return "dynkv was built without the CUDA ops"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        reason = gpu_unavailable()
        if reason is not None:
            pytest.skip(f"gpu test: {reason}")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    s = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**32
    print(f"seed={s} (rerun with DYNKV_TEST_SEED={BASE_SEED})")
    request.node.user_properties.append(("seed", s))
    torch.manual_seed(s)
    return s


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
