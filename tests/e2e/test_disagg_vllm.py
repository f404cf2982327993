"""Disaggregated serving on real vLLM (CPU build): ``worker/disagg_1p1d.sh`` with the tiny random model.

The script starts a prefill engine (``kv_producer``), a decode engine
(``kv_consumer``) and ``dynkv proxy``. Requests through the proxy must give
the greedy tokens that aggregated serving gives (the prefill engine serving
the same request by itself); the decode engine's metrics must show every full
prompt block pulled over NIXL and only the last, partial block computed
there. Then the prefill engine is killed after answering: the decode engine
recomputes and the output is still the same. Last, a TP=2 prefill engine
feeds a TP=1 decode engine.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE_SEED
from vllm_deploy import BLOCK, Deployment, completion, metrics, post, shm_files, tokens_of

from dynkv.testing.model import FIRST_WORD_ID, write_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    __import__("importlib").util.find_spec("nixl") is None, reason="disaggregated serving needs NIXL")]

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny"))


@pytest.fixture(scope="module")
def deployment(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(model_dir, tmp_path_factory.mktemp("disagg"))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()
    assert d.proc.returncode is not None


def draw(n: int, length: int, salt: int) -> list[list[int]]:
    rng = np.random.default_rng(BASE_SEED + salt)
    return rng.integers(FIRST_WORD_ID, 1024, size=(n, length)).tolist()


def full_blocks(prompt: list[int]) -> int:
    return len(prompt) // BLOCK


def computed_on_decode(prompt: list[int]) -> int:
    """Prompt tokens a decode engine counts as computed after pulling every full block: the partial block.

    (For a prompt of whole blocks vLLM recomputes the last token to sample
    the next one, but counts it as transferred.)
    """
    return len(prompt) - BLOCK * full_blocks(prompt)


def test_1p1d_through_the_proxy_matches_aggregated(deployment: Deployment) -> None:
    P, D, proxy = deployment.url("PREFILL_PORT"), deployment.url("DECODE_PORT"), deployment.url("PROXY_PORT")
    prompts = draw(3, 200, 1) + draw(1, 160, 2)
    before = metrics(D)
    # Aggregated serving: the prefill engine answers each request by itself.
    reference = [tokens_of(post(P, "/v1/completions", completion(p))) for p in prompts]
    got = [tokens_of(post(proxy, "/v1/completions", completion(p, stream=i % 2 == 1)))
           for i, p in enumerate(prompts)]
    assert got == reference
    # A second turn: the conversation so far is the decode engine's own; only the new blocks are pulled.
    turn2 = prompts[0] + reference[0] + draw(1, 60, 3)[0]
    assert tokens_of(post(proxy, "/v1/completions", completion(turn2))) == \
        tokens_of(post(P, "/v1/completions", completion(turn2)))
    after = metrics(D)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    pulled = sum(full_blocks(p) for p in prompts) + full_blocks(turn2) - full_blocks(prompts[0])
    print({k: v for k, v in after.items() if "dynkv" in k or "by_source" in k})
    assert delta("vllm:dynkv_pages_moved_total|direction=remote_to_host") == pulled
    assert delta("vllm:dynkv_hits_total|tier=remote") == pulled
    assert delta("vllm:dynkv_load_errors_total|reason=remote") == 0
    # No prefill computed on the decode engine beyond each prompt's last, partial block.
    tails = sum(computed_on_decode(p) for p in [*prompts, turn2])
    assert delta("vllm:prompt_tokens_by_source_total|source=local_compute") == tails
    assert delta("vllm:prompt_tokens_cached_by_source_total|source=p2p") == pulled * BLOCK
    # Every export was released by the decode engine: the prefill engine holds no pins for it.
    assert metrics(P).get("vllm:dynkv_exports_total|outcome=expired", 0.0) == 0


def test_chat_through_the_proxy(deployment: Deployment) -> None:
    P, proxy = deployment.url("PREFILL_PORT"), deployment.url("PROXY_PORT")
    words = " ".join(f"w{i}" for i in draw(1, 120, 4)[0])
    body = {"model": "tiny", "messages": [{"role": "user", "content": words}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    ref = post(P, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    assert post(proxy, "/v1/chat/completions", body)["choices"][0]["message"]["content"] == ref


def test_prefill_killed_after_answering(deployment: Deployment) -> None:
    """Runs last of the deployment's tests: it kills the prefill engine."""
    P, D = deployment.url("PREFILL_PORT"), deployment.url("DECODE_PORT")
    prompt = draw(1, 200, 5)[0]
    reference = tokens_of(post(P, "/v1/completions", completion(prompt)))
    answer = post(P, "/v1/completions", completion(prompt, max_tokens=1,
                                                   kv_transfer_params={"do_remote_decode": True}))
    params = answer["kv_transfer_params"]
    assert params["do_remote_prefill"] and len(params["dynkv"]["slots"]) == len(prompt) // BLOCK
    pgid = deployment.engine_pgid("PREFILL_PORT")
    leftovers = shm_files(pgid)  # a killed engine unlinks nothing: vLLM's queues (dynkv's pool is a memfd)
    os.killpg(pgid, signal.SIGKILL)
    for path in leftovers:
        Path(path).unlink(missing_ok=True)
    before = metrics(D)
    assert tokens_of(post(D, "/v1/completions", completion(prompt, kv_transfer_params=params))) == reference
    after = metrics(D)
    lost = after.get("vllm:dynkv_load_errors_total|reason=remote", 0) - before.get(
        "vllm:dynkv_load_errors_total|reason=remote", 0)
    assert lost == full_blocks(prompt)
    assert after["vllm:prompt_tokens_by_source_total|source=local_compute"] - before[
        "vllm:prompt_tokens_by_source_total|source=local_compute"] == len(prompt)
    # The proxy serves on without its prefill engine: the decode engine computes the prompt.
    assert tokens_of(post(deployment.url("PROXY_PORT"), "/v1/completions", completion(prompt[:150]))) == \
        tokens_of(post(D, "/v1/completions", completion(prompt[:150], cache_salt="recompute")))
    deployment.stop()


def test_prefill_tp2_feeds_decode_tp1(model_dir: str, tmp_path: Path) -> None:
    """Heterogeneous TP on vLLM's CPU build: pages written by two ranks are read whole by one."""
    d = Deployment(model_dir, tmp_path, PREFILL_TP="2", DECODE_TP="1",
                   PREFILL_ENV="VLLM_CPU_OMP_THREADS_BIND=0|1", DECODE_ENV="VLLM_CPU_OMP_THREADS_BIND=1")
    try:
        d.wait_ready()
        D, proxy = d.url("DECODE_PORT"), d.url("PROXY_PORT")
        prompts = draw(2, 200, 6)
        before = metrics(D)
        got = [tokens_of(post(proxy, "/v1/completions", completion(p))) for p in prompts]
        after = metrics(D)
        # The decode engine (TP=1) recomputing by itself is the reference: TP=2 sums in another order.
        reference = [tokens_of(post(D, "/v1/completions", completion(p, kv_transfer_params=None,
                                                                      cache_salt="recompute"))) for p in prompts]
        assert got == reference
        pulled = after["vllm:dynkv_pages_moved_total|direction=remote_to_host"] - before.get(
            "vllm:dynkv_pages_moved_total|direction=remote_to_host", 0)
        assert pulled == sum(full_blocks(p) for p in prompts)
        assert after.get("vllm:dynkv_load_errors_total|reason=remote", 0) == 0
        groups = [d.engine_pgid(w) for w in ("PREFILL_PORT", "DECODE_PORT")]
        pools = {f for g in groups for f in shm_files(g, "/memfd:dynkv-")}
        assert len(pools) == 2
        assert not {f for g in groups for f in shm_files(g) if "/dynkv-" in f}, "the pools are memfds, not in /dev/shm"
        d.stop()
        assert not pools & shm_files(None, "/memfd:dynkv-"), "a stopped engine's host pool is still mapped"
    finally:
        d.stop()
        for name in os.listdir("/dev/shm"):  # vLLM's CPU TP group leaves these when it is stopped
            if name.startswith("vllm_dist_"):
                Path("/dev/shm", name).unlink(missing_ok=True)
