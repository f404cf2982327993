"""dynkv in real vLLM (CPU build) on sliding-window models: hybrid (full and sliding-window layers) and Mistral-style.

The hybrid model alternates sliding-window and full-attention layers, so vLLM's
hybrid KV-cache manager runs two KV-cache groups over one block pool; the
Mistral-style model slides in every layer (one sliding-window group). The
window (64 tokens) is shorter than the 200-token prompts. Prompts evicted
from vLLM's device cache must come back from dynkv's host tier with the
tokens of plain vLLM: the full-attention group's blocks of the whole prefix,
the sliding-window group's blocks of the window only (vLLM holds no block
before it). A run where both groups' pages share keys loads one group's KV
into the other's blocks, and the output shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BASE_SEED

from dynkv.testing.model import FIRST_WORD_ID, write_model

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).resolve().parents[1] / "support" / "vllm_driver.py"
BLOCK = 32
WINDOW = 64
PROMPT_TOKENS = 200
FULL_BLOCKS = (PROMPT_TOKENS - 1) // BLOCK  # blocks dynkv serves: vLLM computes the last token itself
# Blocks of a sliding-window group vLLM holds after a hit of FULL_BLOCKS: those within the window's reach.
WINDOW_BLOCKS = FULL_BLOCKS - (FULL_BLOCKS * BLOCK - (WINDOW - 1)) // BLOCK
# The device cache holds about four prompts (of both groups' blocks, or one group's window and the blocks
# a prefill holds at once): the fill prompts evict the first ones.
ENGINE = {"num_gpu_blocks_override": 40}
ALL_SLIDING_ENGINE = {"num_gpu_blocks_override": 12, "max_model_len": 256}
HYBRID = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")


def run_engine(tmp: Path, spec: dict[str, Any], timeout: float = 420) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = tmp / "spec.json", tmp / "out.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(DRIVER), str(spec_file), str(out_file)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    (tmp / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, f"engine failed (log in {tmp / 'stderr.txt'}):\n{proc.stderr[-4000:]}"
    return json.loads(out_file.read_text())


def sample(phase: dict, name: str, **labels: str) -> float:
    return phase["samples"].get(name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}", 0.0)


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(BASE_SEED)
    print(f"prompt seed {BASE_SEED}")
    return {name: rng.integers(FIRST_WORD_ID, 1024, size=(n, PROMPT_TOKENS)).tolist()
            for name, n in (("P", 3), ("F", 4))}


def phases(prompts: dict) -> list[dict]:
    return [{"name": "cold", "prompts": prompts["P"]}, {"name": "fill", "prompts": prompts["F"]},
            {"name": "host", "prompts": prompts["P"]}]


@pytest.mark.parametrize("layer_types", [HYBRID, None], ids=["hybrid", "all-sliding"])
def test_sliding_window_model_hits_the_host_tier(layer_types: tuple[str, ...] | None, prompts: dict,
                                                 tmp_path: Path) -> None:
    model = str(write_model(tmp_path / "model", preset="tiny", num_layers=4, sliding_window=WINDOW,
                            layer_types=layer_types))
    engine = ENGINE if layer_types else ALL_SLIDING_ENGINE
    plain = run_engine(tmp_path / "plain", {"model": model, "engine": engine, "dynkv": None,
                                            "phases": phases(prompts)})
    out = run_engine(tmp_path / "dynkv", {"model": model, "engine": engine, "dynkv": {"host_pages": 128},
                                          "phases": phases(prompts)})
    cold, _, host = out["phases"]
    base_cold, _, base_host = plain["phases"]
    assert cold["tokens"] == base_cold["tokens"] and host["tokens"] == base_host["tokens"]
    d = max_diff(host["logprobs"], base_host["logprobs"])
    print(f"host phase: max logprob diff to plain vLLM {d:.3g}")
    assert d < 1e-3
    n = len(prompts["P"])
    # Hybrid: the full-attention group's blocks of the prefix and the sliding group's blocks of the window.
    # All sliding: the window's blocks only.
    per_prompt = (FULL_BLOCKS if layer_types else 0) + WINDOW_BLOCKS
    assert sample(host, "dynkv_hits_total", tier="host") == n * per_prompt
    assert sample(host, "dynkv_pages_moved_total", direction="h2d") == n * per_prompt
    assert sample(host, "dynkv_load_errors_total", reason="worker") == 0
    assert sample(host, "dynkv_hits_total", tier="device") == 0  # the fill phase evicted them from vLLM


def test_one_groups_pages_in_anothers_blocks_change_the_output(prompts: dict, tmp_path: Path) -> None:
    """What per-group keys prevent: with one key per block for both groups, a group loads the other's KV."""
    model = str(write_model(tmp_path / "model", preset="tiny", num_layers=4, sliding_window=WINDOW,
                            layer_types=HYBRID))
    good = run_engine(tmp_path / "good", {"model": model, "engine": ENGINE, "dynkv": None,
                                          "phases": phases(prompts)})
    out = run_engine(tmp_path / "mixed", {"model": model, "engine": ENGINE, "dynkv": {"host_pages": 128},
                                          "same_group_keys": True, "phases": phases(prompts)})
    host, base = out["phases"][2], good["phases"][2]
    assert sample(host, "dynkv_hits_total", tier="host") > 0
    far = max_diff(host["logprobs"], base["logprobs"]) > 1e-1
    assert host["tokens"] != base["tokens"] or far, "another group's KV left the output unchanged: a blind model"
