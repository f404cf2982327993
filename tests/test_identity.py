"""The weights identity in every page key: new weights or a new config at the same path never match old pages."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from connector_stubs import fake_config

from dynkv.connector.engine import model_geometry
from dynkv.identity import weights_identity
from dynkv.keys import ModelFingerprint, block_keys
from dynkv.testing.model import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", seed=0)


def test_new_weights_or_config_at_the_same_path_change_the_identity(model, tmp_path) -> None:
    d = tmp_path / "served"
    shutil.copytree(model, d)
    before = weights_identity(str(d))
    assert len(before) == 32 and before == weights_identity(str(d)), "stable"
    assert weights_identity(str(model)) == before, "the same files elsewhere: the same identity (no path, no mtime)"
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = float(cfg.get("rope_theta", 10000.0)) * 2
    (d / "config.json").write_text(json.dumps(cfg))
    rope = weights_identity(str(d))
    assert rope != before, "a changed config.json"
    shutil.rmtree(d)
    write_model(d, preset="tiny", seed=1)  # a fine-tune: the same architecture, sizes and headers
    assert weights_identity(str(d)) not in (before, rope)


def test_one_changed_weight_chunk_changes_the_identity(model, tmp_path) -> None:
    d = tmp_path / "one"
    shutil.copytree(model, d)
    before = weights_identity(str(d))
    weights = sorted(d.glob("*.safetensors"))
    assert weights, "the test model has safetensors weights"
    f = weights[0]
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # the last sampled chunk ends the file
    f.write_bytes(bytes(data))
    assert weights_identity(str(d)) != before


def test_no_weights_found_falls_back_to_the_revision_or_warns(tmp_path, caplog) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert weights_identity(str(tmp_path), "abc123") == "revision:abc123"
    with caplog.at_level(logging.WARNING, logger="dynkv.identity"):
        assert weights_identity("no-such-org/no-such-model") == ""
    assert "model_version" in caplog.text


def test_fingerprints_of_different_weights_share_no_key() -> None:
    base = dict(model_id="/models/m", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=4, block_size=4)
    a, b = ModelFingerprint(**base, weights="aa"), ModelFingerprint(**base, weights="bb")
    legacy = ModelFingerprint(**base)
    assert len({a.digest(), b.digest(), legacy.digest()}) == 3
    tokens = list(range(16))
    assert not set(block_keys(a, tokens)) & set(block_keys(b, tokens))
    with pytest.raises(ValueError, match="weights=3"):
        ModelFingerprint(**base, weights=3)  # type: ignore[arg-type]


def test_model_version_overrides_the_digest(model) -> None:
    vllm_config, kcc = fake_config()
    vllm_config.model_config.model = str(model)
    _, digested = model_geometry(vllm_config, kcc)
    assert digested.weights == weights_identity(str(model))
    _, named = model_geometry(vllm_config, kcc, model_version="ft-2026-12")
    assert named.weights == "version:ft-2026-12" and named.digest() != digested.digest()
