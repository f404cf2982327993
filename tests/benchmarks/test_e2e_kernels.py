"""`bench e2e` holds engines to each other's bits only where they computed alike: the same kernels (eager in every
engine, or compiled without timing in every one), first steps of one shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dynkv.benchmarks.e2e.engine import kernels
from dynkv.benchmarks.e2e.report import format_table, summarize
from dynkv.benchmarks.e2e.run import eager_kernels, engine_args, plan

_LENGTH = 128  # four 32-token blocks


def _gpu_args(**extra: Any) -> dict[str, Any]:
    return engine_args(True, plan("tiny", [_LENGTH], 32, 2, 8), 16, extra)


def test_kernels_eager_runs_every_engine_eager_unless_told_otherwise() -> None:
    eargs = _gpu_args()
    assert "enforce_eager" not in eargs, "tuned, the default: vLLM's own compile"
    eager = eager_kernels(eargs)
    assert eager == {**eargs, "enforce_eager": True}
    mine = _gpu_args(enforce_eager=False)  # --engine-arg enforce_eager=false: the user's word stands
    assert eager_kernels(mine) == mine


def _config(eager: bool, mode: int | None, inductor: dict[str, Any], level: int | None = None) -> SimpleNamespace:
    cc = SimpleNamespace(inductor_compile_config=inductor)
    if mode is not None:
        cc.mode = mode
    if level is not None:
        cc.level = level
    return SimpleNamespace(compilation_config=cc, model_config=SimpleNamespace(enforce_eager=eager))


def test_an_engine_says_how_its_kernels_were_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    det = {"deterministic": True}
    assert kernels(_config(False, 3, det)) == {"compiled": True, "deterministic": True}
    assert kernels(_config(False, 3, {})) == {"compiled": True, "deterministic": False}
    assert kernels(_config(True, 3, det)) == {"compiled": False, "deterministic": False}, "enforce_eager: eager"
    assert kernels(_config(False, 0, det))["compiled"] is False, "mode NONE compiles nothing"
    assert kernels(_config(False, None, det, level=3))["deterministic"] is True, "vLLM that still says level"
    monkeypatch.setenv("TORCHINDUCTOR_DETERMINISTIC", "1")
    assert kernels(_config(False, 3, {}))["deterministic"] is True, "torch's own switch"


def test_kernels_of_a_real_vllm_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM keeps the mode in its config, where the engine reads it (CPU build)."""
    from vllm.engine.arg_utils import EngineArgs

    from dynkv.testing.model import write_model

    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    model = str(write_model(tmp_path / "model", preset="tiny"))
    base = {"model": model, "dtype": "float32", "block_size": 32, "max_model_len": 256, "enforce_eager": False}
    assert kernels(EngineArgs(**base).create_engine_config()) == {"compiled": True, "deterministic": False}
    eager = eager_kernels({k: v for k, v in base.items() if k != "enforce_eager"})
    assert kernels(EngineArgs(**eager).create_engine_config()) == {"compiled": False, "deterministic": False}
    det = {**base, "compilation_config": {"inductor_compile_config": {"deterministic": True}}}
    assert kernels(EngineArgs(**det).create_engine_config()) == {"compiled": True, "deterministic": True}


def _check(tokens: list[int], cached: int) -> dict[str, Any]:
    return {"tokens": tokens, "logprobs": [-1.0] * len(tokens), "top2_gaps": [0.5] * len(tokens),
            "cached_tokens": cached}


def _engine(path: str, check: dict[str, Any], deterministic: bool = True) -> dict[str, Any]:
    rec = {"ttft_s": 0.01, "token": check["tokens"][0], "cached_tokens": check["cached_tokens"]}
    return {"lengths": {str(_LENGTH): {path: [rec], "checks": {path: check}}},
            "kernels": {"compiled": True, "deterministic": deterministic}}


def _reports(host_tokens: list[int], offload_tokens: list[int], dynkv_deterministic: bool = True) -> dict[str, Any]:
    ref = _check([5, 6, 7], _LENGTH - 32)  # vLLM's hit computes the last block
    vllm = _engine("device", ref)
    vllm["lengths"][str(_LENGTH)]["checks"]["recompute"] = _check([5, 6, 7], 0)
    return {"vllm": vllm, "dynkv": _engine("host", _check(host_tokens, _LENGTH - 32), dynkv_deterministic),
            # OffloadingConnector serves every block: one token to compute
            "offload": _engine("offload", _check(offload_tokens, _LENGTH))}


def _greedy_targets(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in s["targets"] if t["target"].startswith("greedy")}


def test_a_hit_whose_first_step_has_the_reference_shape_is_held_to_identical_tokens() -> None:
    s = summarize(_reports([5, 6, 7], [5, 6, 7]), [_LENGTH])
    assert s["kernels"]["alike"] is True
    held = _greedy_targets(s)
    name = f"greedy tokens = vLLM prefix-cache hit: dynkv host tier, {_LENGTH} tokens"
    assert list(held) == [name] and held[name]["met"], held
    # The same tokens but one: the target fails, at that token.
    s = summarize(_reports([5, 9, 7], [5, 6, 7]), [_LENGTH])
    assert _greedy_targets(s)[name] == {"target": name, "limit": "identical", "measured": "differ from token 1",
                                        "met": False}


def test_a_hit_of_every_block_is_shown_but_not_held_to_the_reference() -> None:
    s = summarize(_reports([5, 6, 7], [8, 6, 7]), [_LENGTH])
    row = s["lengths"][str(_LENGTH)]["paths"]["offload/offload"]
    assert row["greedy"]["identical"] is False and row["greedy"]["first_difference"] == 0
    assert row["greedy"]["not_held"] == "its first step computes 1 prompt token, vLLM's prefix-cache hit 32"
    assert not any("OffloadingConnector" in t for t in _greedy_targets(s)), "another shape is no target"
    table = format_table(s)
    assert "no (from token 0) (not held: its first step computes 1 prompt token, vLLM's prefix-cache hit 32)" in table
    assert "kernels: compiled in every engine in Inductor's deterministic mode (chosen without timing)" in table


def test_engines_whose_kernels_were_tuned_apart_are_shown_but_not_held() -> None:
    s = summarize(_reports([5, 9, 7], [5, 6, 7], dynkv_deterministic=False), [_LENGTH])
    assert s["kernels"]["alike"] is False
    table = format_table(s)
    assert ("kernels: NOT alike (vllm: compiled, deterministic; dynkv: compiled, tuned by timing; "
            "offload: compiled, deterministic)") in table
    assert _greedy_targets(s) == {}, "kernels not alike: no greedy target can be held"
    row = s["lengths"][str(_LENGTH)]["paths"]["dynkv/host"]
    assert row["greedy"]["identical"] is False and row["greedy"]["not_held"] == "the engines' kernels were not alike"
    assert "no (from token 1) (not held: the engines' kernels were not alike)" in table
    mixed = _reports([5, 6, 7], [5, 6, 7])
    mixed["offload"]["kernels"] = {"compiled": False, "deterministic": False}
    assert summarize(mixed, [_LENGTH])["kernels"]["alike"] is False, "eager and compiled kernels differ"
    eager = {k: {**r, "kernels": {"compiled": False, "deterministic": False}}
             for k, r in _reports([5, 9, 7], [5, 6, 7]).items()}
    s = summarize(eager, [_LENGTH])
    assert s["kernels"]["alike"] is True and "kernels: eager in every engine" in format_table(s)
    (t,) = _greedy_targets(s).values()
    assert t["measured"] == "differ from token 1" and not t["met"], "alike kernels: held, and it fails"
