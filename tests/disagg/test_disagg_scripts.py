"""The disaggregated launch scripts' plans (``DRY_RUN=1``): ports, GPUs, roles and TP sizes per engine.

The scripts really start vLLM in ``test_disagg_vllm.py``; here their command
lines are checked for every layout without starting anything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[2] / "worker"


def plan(script: str, *args: str, **env: str) -> dict[str, dict[str, str]]:
    """``name -> {VAR: value, ..., "argv": [...]}`` of each process the script would start."""
    out = subprocess.run([str(WORKER / script), *args], env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "0", **env},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    procs: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        name, _, cmd = line.partition(": ")
        words = shlex.split(cmd)
        if words[0] == "env":
            words = words[1:]
        fields: dict = {}
        while words and re.match(r"^[A-Z_]+=", words[0]):
            k, _, v = words.pop(0).partition("=")
            fields[k] = v
        fields["argv"] = words
        procs[name] = fields
    return procs


def test_1p1d_roles_ports_and_side_channel() -> None:
    p = plan("disagg_1p1d.sh", "--max-num-seqs", "8", PREFILL_TP="2", DECODE_TP="1", PREFILL_PORT="9100",
             DECODE_PORT="9200", PROXY_PORT="9000", SIDE_CHANNEL_PORT="7000")
    assert set(p) == {"prefill0", "decode0", "proxy"}
    pre, dec = p["prefill0"], p["decode0"]
    assert json.loads(pre["KV_TRANSFER_CONFIG"])["kv_role"] == "kv_producer"
    assert json.loads(dec["KV_TRANSFER_CONFIG"])["kv_role"] == "kv_consumer"
    assert (pre["PORT"], pre["TP"], dec["PORT"], dec["TP"]) == ("9100", "2", "9200", "1")
    assert pre["DYNKV_SIDE_CHANNEL_PORT"] == "7000" and pre["HOST"] == "127.0.0.1"
    assert pre["argv"][-2:] == ["--max-num-seqs", "8"] and pre["argv"][0].endswith("agg.sh")
    assert "CUDA_VISIBLE_DEVICES" not in pre  # no GPU: vLLM's CPU build
    assert p["proxy"]["argv"][-8:] == ["--prefill", "http://127.0.0.1:9100", "--decode", "http://127.0.0.1:9200",
                                       "--host", "127.0.0.1", "--port", "9000"]
    assert p["proxy"]["argv"][:3] == ["-u", "DYNKV_TRANSFER_SECRET", "python3"]  # the proxy never holds the secret


def test_2p2d_takes_tp2_with_eight_gpus_and_hands_out_distinct_ones() -> None:
    p = plan("disagg_2p2d.sh", NUM_GPUS="8", SIDE_CHANNEL_PORT="7000")
    engines = ["prefill0", "prefill1", "decode0", "decode1"]
    assert [p[e]["TP"] for e in engines] == ["2"] * 4
    assert [p[e]["CUDA_VISIBLE_DEVICES"] for e in engines] == ["0,1", "2,3", "4,5", "6,7"]
    assert len({p[e]["PORT"] for e in engines}) == 4
    assert [p[e]["DYNKV_SIDE_CHANNEL_PORT"] for e in ("prefill0", "prefill1")] == ["7000", "7001"]
    assert p["proxy"]["argv"].count("--prefill") == 2 and p["proxy"]["argv"].count("--decode") == 2
    fewer = plan("disagg_2p2d.sh", NUM_GPUS="4")
    assert [fewer[e]["TP"] for e in engines] == ["1"] * 4
    assert [fewer[e]["CUDA_VISIBLE_DEVICES"] for e in engines] == ["0", "1", "2", "3"]


def test_too_few_gpus_is_refused() -> None:
    out = subprocess.run([str(WORKER / "disagg_2p2d.sh")], env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "6",
                                                                 "TP": "2"}, capture_output=True, text=True)
    assert out.returncode == 2 and "need 8 GPUs but 6 are visible" in out.stderr


@pytest.mark.parametrize("port", ["0", "5600"])
def test_nixl_connector_deployment_for_comparisons(port: str) -> None:
    env = {"KV_CONNECTOR": "NixlConnector", "KV_BUFFER_DEVICE": "cpu", "SIDE_CHANNEL_PORT": port}
    if port == "0":
        out = subprocess.run([str(WORKER / "disagg_1p1d.sh")], env={**os.environ, "DRY_RUN": "1", **env},
                             capture_output=True, text=True)
        assert out.returncode == 2 and "NixlConnector needs SIDE_CHANNEL_PORT > 0" in out.stderr
        return
    p = plan("disagg_1p1d.sh", **env)
    cfgs = [json.loads(p[e]["KV_TRANSFER_CONFIG"]) for e in ("prefill0", "decode0")]
    assert [c["kv_connector"] for c in cfgs] == ["NixlConnector"] * 2
    assert [c["kv_role"] for c in cfgs] == ["kv_producer", "kv_consumer"] and cfgs[0]["kv_buffer_device"] == "cpu"
    assert [p[e]["VLLM_NIXL_SIDE_CHANNEL_PORT"] for e in ("prefill0", "decode0")] == ["5600", "5601"]


def test_the_transfer_secret_is_never_on_a_command_line() -> None:
    secret = "f00d" * 16
    out = subprocess.run([str(WORKER / "disagg_1p1d.sh")], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "0", "DYNKV_TRANSFER_SECRET": secret})
    assert out.returncode == 0 and "prefill0" in out.stdout, out.stderr
    assert secret not in out.stdout + out.stderr
