"""Disaggregated serving facing hostile input, on real vLLM (CPU build): ``worker/disagg_1p1d.sh`` as launched.

The script gives both engines one fresh ``DYNKV_TRANSFER_SECRET``. A client
that pairs its prompt B with the ``kv_transfer_params`` the prefill engine
returned for prompt A — as they are, or with B's own last key put in — must
not get A's KV into the decode engine: straight to the decode engine the
params are refused (counted by reason) and B is computed there; through the
proxy the client's params never reach it. Either way B's tokens, then and
later, are plain vLLM's. A wrong MAC is recomputed and counted. The default
launch listens on loopback only. Last, a prefill engine frozen (SIGSTOP) and
then killed under twelve pulls: every request ends within
``transfer_timeout_s`` plus a margin, with plain vLLM's tokens.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BASE_SEED
from vllm_deploy import BLOCK, LOOPBACK, Deployment, completion, group_pids, listening, metrics, post, shm_files, \
    tokens_of

from dynkv.testing.model import FIRST_WORD_ID, write_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    __import__("importlib").util.find_spec("nixl") is None, reason="disaggregated serving needs NIXL")]

TRANSFER_TIMEOUT_S = 5  # the Deployment's DYNKV_TRANSFER_TIMEOUT_S
# What a request may take beyond its pull's timeout on two shared cores: computing its prompt and 8 tokens,
# queued behind eleven others. It bounds a hang; it does not measure anything.
MARGIN_S = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny"))


@pytest.fixture(scope="module")
def deployment(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(model_dir, tmp_path_factory.mktemp("disagg-trust"))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def draw(n: int, length: int, salt: int) -> list[list[int]]:
    rng = np.random.default_rng(BASE_SEED + 1000 + salt)
    return rng.integers(FIRST_WORD_ID, 1024, size=(n, length)).tolist()


def exported(P: str, prompt: list[int]) -> dict[str, Any]:
    """The ``kv_transfer_params`` the prefill engine returns for ``prompt``, as the proxy would get them."""
    answer = post(P, "/v1/completions", completion(prompt, max_tokens=1,
                                                   kv_transfer_params={"do_remote_decode": True}))
    params = answer["kv_transfer_params"]
    assert params["do_remote_prefill"] and len(params["dynkv"]["mac"]) == 64
    return params


class Delta:
    """Changes of the decode engine's samples between construction and :meth:`__call__`."""

    def __init__(self, url: str) -> None:
        self.url, self.before = url, metrics(url)

    def __call__(self, key: str) -> float:
        return metrics(self.url).get(key, 0.0) - self.before.get(key, 0.0)


PULLED = "vllm:dynkv_pages_moved_total|direction=remote_to_host"
COMPUTED = "vllm:prompt_tokens_by_source_total|source=local_compute"


def rejected(reason: str) -> str:
    return f"vllm:dynkv_remote_rejected_total|reason={reason}"


def test_forged_params_reach_no_kv(deployment: Deployment) -> None:
    P, D, proxy = deployment.url("PREFILL_PORT"), deployment.url("DECODE_PORT"), deployment.url("PROXY_PORT")
    a, b, c = draw(3, 200, 1)
    reference = tokens_of(post(P, "/v1/completions", completion(b)))  # plain vLLM: the prefill engine alone
    # The deployment works: a prompt through the proxy is pulled, under the launch's secret.
    d = Delta(D)
    assert tokens_of(post(proxy, "/v1/completions", completion(c))) == \
        tokens_of(post(P, "/v1/completions", completion(c)))
    assert d(PULLED) == len(c) // BLOCK and d(rejected("mac")) == 0

    a_params, b_params = exported(P, a), exported(P, b)  # B's key is public anyway: a hash of model and tokens
    forged = json.loads(json.dumps(a_params))
    forged["dynkv"]["last_key"] = b_params["dynkv"]["last_key"]
    d = Delta(D)
    # Straight to the decode engine: A's pages claimed for B, with B's key put in, while the decode engine has
    # never seen B (had it computed B before, its own caches would answer and no pull would be tried)...
    assert tokens_of(post(D, "/v1/completions", completion(b, kv_transfer_params=forged))) == reference
    assert d(rejected("mac")) == 1
    # ...and as they are, with A's key.
    assert tokens_of(post(D, "/v1/completions", completion(b, kv_transfer_params=a_params))) == reference
    assert (d(rejected("key")), d(rejected("mac"))) == (1, 1)
    assert d(PULLED) == 0
    # Through the proxy the client's params are replaced by the prefill engine's own for B.
    assert tokens_of(post(proxy, "/v1/completions", completion(b, kv_transfer_params=forged))) == reference
    # Later requests for B, on the decode engine's caches alone and through the proxy: still plain vLLM's.
    assert tokens_of(post(D, "/v1/completions", completion(b))) == reference
    assert tokens_of(post(proxy, "/v1/completions", completion(b))) == reference
    assert (d(rejected("key")), d(rejected("mac"))) == (1, 1)


def test_a_wrong_mac_is_recomputed_and_counted(deployment: Deployment) -> None:
    P, D = deployment.url("PREFILL_PORT"), deployment.url("DECODE_PORT")
    (prompt,) = draw(1, 170, 2)
    reference = tokens_of(post(P, "/v1/completions", completion(prompt)))
    params = exported(P, prompt)
    mac = params["dynkv"]["mac"]
    params["dynkv"]["mac"] = ("0" if mac[0] != "0" else "1") + mac[1:]
    d = Delta(D)
    assert tokens_of(post(D, "/v1/completions", completion(prompt, kv_transfer_params=params))) == reference
    assert d(rejected("mac")) == 1
    assert d(PULLED) == 0 and d(COMPUTED) == len(prompt)  # the whole prompt computed on the decode engine


def test_a_default_launch_listens_on_loopback_only(deployment: Deployment) -> None:
    """Every TCP socket the engines' and the proxy's processes listen on is 127.0.0.1 or ::1."""
    seen: dict[str, list[tuple[str, int]]] = {}
    for which in ("PREFILL_PORT", "DECODE_PORT", "PROXY_PORT"):
        pids = group_pids(deployment.engine_pgid(which))
        seen[which] = listening(pids)
        # the check sees sockets at all: each process group listens on its HTTP port
        assert deployment.ports[which] in {port for _, port in seen[which]}, (which, seen[which])
    print(seen)
    exposed = {w: [s for s in socks if s[0] not in LOOPBACK] for w, socks in seen.items()}
    assert not any(exposed.values()), exposed


def test_prefill_frozen_then_killed_under_twelve_pulls(deployment: Deployment) -> None:
    """Runs last of the deployment's tests: it kills the prefill engine."""
    P, D = deployment.url("PREFILL_PORT"), deployment.url("DECODE_PORT")
    prompts = draw(12, 100, 3)
    references = [tokens_of(post(P, "/v1/completions", completion(p))) for p in prompts]
    params = [exported(P, p) for p in prompts]
    pgid = deployment.engine_pgid("PREFILL_PORT")
    leftovers = shm_files(pgid)  # a killed engine unlinks nothing: vLLM's queues (dynkv's pool is a memfd)
    d = Delta(D)
    os.killpg(pgid, signal.SIGSTOP)
    try:
        def ask(i: int) -> tuple[list[int], float]:
            t0 = time.monotonic()
            answer = tokens_of(post(D, "/v1/completions", completion(prompts[i], kv_transfer_params=params[i])))
            return answer, time.monotonic() - t0

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(ask, i) for i in range(12)]
            time.sleep(1.0)  # the pulls are under way, waiting on a frozen engine
            os.killpg(pgid, signal.SIGKILL)
            results = [f.result(timeout=TRANSFER_TIMEOUT_S + MARGIN_S) for f in futures]
    finally:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for path in leftovers:
            Path(path).unlink(missing_ok=True)
    print("seconds per request:", [round(s, 1) for _, s in results])
    assert [tokens for tokens, _ in results] == references
    assert all(s < TRANSFER_TIMEOUT_S + MARGIN_S for _, s in results)
    blocks = sum(len(p) // BLOCK for p in prompts)
    assert d("vllm:dynkv_load_errors_total|reason=remote") == blocks
    assert d(COMPUTED) == sum(len(p) for p in prompts)
    deployment.stop()
