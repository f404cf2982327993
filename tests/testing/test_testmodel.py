"""The random-weight test model: byte-identical per seed, prompt-sensitive, servable tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynkv.testing.model import FIRST_WORD_ID, PRESETS, greedy_report, vocabulary, write_model

# Fixed prompts (not the per-run rng): the sensitivity thresholds below are
# properties of this model and these prompts.
PROMPTS = [[FIRST_WORD_ID + (17 * i + 5 * k) % 900 for k in range(24)] for i in range(5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", seed=0)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = write_model(tmp_path / "again", preset="tiny", seed=0)
    assert _files(again) == _files(tiny)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_files(tiny))
    other = write_model(tmp_path / "other", preset="tiny", seed=1)
    assert _files(other)["model.safetensors"] != _files(tiny)["model.safetensors"]


def test_idempotent_and_refuses_a_different_model(tiny: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    assert write_model(tiny, preset="tiny", seed=0) == tiny
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before
    with pytest.raises(FileExistsError, match="different model"):
        write_model(tiny, preset="tiny", seed=3)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        write_model(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="num_heads"):
        write_model(tmp_path / "y", preset="tiny", num_heads=3)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dynkv test model"):
        write_model(tmp_path / "z")


def test_config_is_float32_llama(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    spec = PRESETS["tiny"]
    assert cfg["model_type"] == "llama" and cfg["dtype"] == "float32"
    assert cfg["num_hidden_layers"] == spec.num_layers and cfg["vocab_size"] == spec.vocab_size
    assert cfg["max_position_embeddings"] >= 4096
    assert spec.head_dim in (32, 64, 80, 96, 112, 128)  # vLLM's CPU attention head sizes


def test_tokenizer_one_token_per_word_and_chat_template(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    words = vocabulary(PRESETS["tiny"].vocab_size)
    text = " ".join(words[FIRST_WORD_ID:FIRST_WORD_ID + 10])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(range(FIRST_WORD_ID, FIRST_WORD_ID + 10))
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    chat_ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert list(chat_ids) == [tok.convert_tokens_to_ids("<|user|>"), *ids, tok.convert_tokens_to_ids("<|end|>"),
                              tok.convert_tokens_to_ids("<|assistant|>")]


def test_vocabulary_bounds() -> None:
    v = vocabulary(2048)
    assert len(v) == len(set(v)) == 2048
    with pytest.raises(ValueError, match="vocab_size"):
        vocabulary(10**6)


def test_greedy_outputs_depend_on_the_prompt(tiny: Path) -> None:
    r = greedy_report(tiny, PROMPTS, steps=6)
    print({k: v for k, v in r.items() if k != "outputs"})
    assert r["distinct"] == len(PROMPTS)
    # Decisive: a gap of 1e-3 in log-prob is far above float32 noise, so two
    # correct servers agree token for token.
    assert r["min_top2_gap"] > 1e-3
    assert r["median_top2_gap"] > 0.1
    assert greedy_report(tiny, PROMPTS, steps=6)["digest"] == r["digest"]
