"""``dynkv bench shared`` at a tiny size against a real redis-server: the report's shape and its checks."""

from __future__ import annotations

import json

import pytest

redis = pytest.importorskip("redis", reason="the shared tier's Redis client: pip install 'dynkv[shared]'")
from stores import RedisServer

from dynkv.cli import main


def test_bench_shared_smoke(redis_server: RedisServer, tmp_path, capsys) -> None:
    out = tmp_path / "shared.json"
    assert main(["bench", "shared", "--url", redis_server.url, "--pages", "6", "--page-kib", "9", "--batch-pages",
                 "4", "--repeat", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["gbps"]) == {"dynkv_put", "dynkv_get", "store_put", "store_get"}
    assert all(v > 0 for v in report["gbps"].values())
    assert all(len(s) == 2 for s in report["seconds"].values())
    assert report["config"]["store"] == "redis" and report["config"]["value_bytes"] == 64 + 9 * 1024
    assert "ratio" in capsys.readouterr().out
    # Every page and raw value of the bench was deleted after its pass.
    assert redis.Redis(port=redis_server.ports[0]).dbsize() == 0
