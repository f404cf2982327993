"""Smoke runs of ``dynkv bench disk`` at tiny size: it runs and reports what it should.
Timings are never asserted on. (bench/test_bench_disk.py runs in test_bench_smoke.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynkv.cli import main


@pytest.mark.parametrize("extra", [[], ["--no-direct", "--baseline", "python"]], ids=["dd-direct", "python-buffered"])
def test_bench_disk_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    out = tmp_path / "disk.json"
    args = ["bench", "disk", "--path", str(tmp_path / "scratch"), "--pages", "6", "--page-mb", "0.05",
            "--threads", "1,3", "--repeat", "2", "--json", str(out), *extra]
    assert main(args) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["threads"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert r["write_gbps"] > 0 and r["read_gbps"] > 0 and r["read_pct_of_baseline"] > 0, r
        assert len(r["write_s"]) == len(r["read_s"]) == 2
    base = report["baseline"]
    assert base["tool"] == ("python" if extra else "dd") and base["bytes"] >= 6 * int(0.05 * 2**20)
    assert report["config"]["page_bytes"] == int(0.05 * 2**20) and report["crc32_gbps"] > 0
    assert report["fs"]["direct_io_active"] is (not extra)
    assert "% base" in table and "zlib.crc32" in table
    assert list((tmp_path / "scratch").iterdir()) == [], "the scratch directory is removed"


def test_bench_disk_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "disk", "--path", str(tmp_path), "--pages", "2", "--page-mb", "0.01", "--threads", "2",
                 "--repeat", "1", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["threads"] == 2


def test_bench_disk_bad_threads() -> None:
    with pytest.raises(SystemExit):
        main(["bench", "disk", "--threads", "0,x"])
