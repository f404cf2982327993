"""DynKVConfig: defaults, dict over environment, strict parsing, errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from dynkv.config import DEFAULT_HOST_GB, DynKVConfig
from dynkv.policy import EVICTION_POLICIES


def test_defaults() -> None:
    c = DynKVConfig.from_dict(None, env={})
    assert c == DynKVConfig()
    assert c.host_gb == DEFAULT_HOST_GB and c.host_pages is None
    assert c.disk_gb == 0.0 and c.disk_paths == ()
    assert c.eviction == "lru"
    assert c.disk_admit_min_hits == 2 and c.io_threads == 4
    assert c.init_timeout_s == 120.0 and c.metrics_port is None
    assert c.disk_direct_io is True and c.layerwise is True


def test_disagg_keys() -> None:
    c = DynKVConfig.from_dict(None, env={})
    assert (c.side_channel_host, c.side_channel_port) == ("127.0.0.1", 0)
    assert c.transfer_timeout_s == 30.0 and c.export_timeout_s == 120.0
    c = DynKVConfig.from_dict({"side_channel_host": " 0.0.0.0 ", "transfer_timeout_s": "2.5"},
                              env={"DYNKV_SIDE_CHANNEL_PORT": "5600", "DYNKV_EXPORT_TIMEOUT_S": "9"})
    assert (c.side_channel_host, c.side_channel_port) == ("0.0.0.0", 5600)
    assert c.transfer_timeout_s == 2.5 and c.export_timeout_s == 9.0


def test_frozen() -> None:
    c = DynKVConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.io_threads = 8  # type: ignore[misc]


def test_every_key_has_an_env_var() -> None:
    for key in DynKVConfig.keys():
        assert DynKVConfig.env_var(key) == "DYNKV_" + key.upper()


def test_dict_values() -> None:
    c = DynKVConfig.from_dict(
        {
            "host_pages": 128,
            "disk_gb": 50,
            "disk_paths": ["/nvme0/kv", "/nvme1/kv"],
            "eviction": "FIFO",
            "disk_admit_min_hits": 0,
            "io_threads": 16,
            "init_timeout_s": 30,
            "metrics_port": 9400,
            "layerwise": False,
            "disk_direct_io": "off",
        },
        env={},
    )
    assert c.host_pages == 128 and c.host_gb is None
    assert c.disk_gb == 50.0 and isinstance(c.disk_gb, float)
    assert c.disk_paths == ("/nvme0/kv", "/nvme1/kv")
    assert c.eviction == "fifo"
    assert c.disk_admit_min_hits == 0 and c.io_threads == 16
    assert c.init_timeout_s == 30.0 and c.metrics_port == 9400
    assert c.layerwise is False and c.disk_direct_io is False


def test_env_values() -> None:
    env = {
        "DYNKV_HOST_GB": "2.5",
        "DYNKV_DISK_GB": "1e2",
        "DYNKV_DISK_PATHS": "/a, /b:/c,",
        "DYNKV_EVICTION": "fifo",
        "DYNKV_DISK_ADMIT_MIN_HITS": "3",
        "DYNKV_IO_THREADS": " 8 ",
        "DYNKV_INIT_TIMEOUT_S": "0.5",
        "DYNKV_METRICS_PORT": "9100",
        "DYNKV_LAYERWISE": " No",
        "DYNKV_DISK_DIRECT_IO": "0",
        "DYNKV_TEST_SEED": "7",  # other DYNKV_ variables are not config keys
        "DYNKV_CUDA": "OFF",
    }
    c = DynKVConfig.from_dict({}, env=env)
    assert c.host_gb == 2.5 and c.disk_gb == 100.0
    assert c.disk_paths == ("/a", "/b", "/c")
    assert c.eviction == "fifo" and c.disk_admit_min_hits == 3 and c.io_threads == 8
    assert c.init_timeout_s == 0.5 and c.metrics_port == 9100
    assert c.layerwise is False and c.disk_direct_io is False


def test_disk_write_backlog_from_dict_and_env() -> None:
    assert DynKVConfig.from_dict(None, env={}).disk_write_backlog_gb == 1.0
    assert DynKVConfig.from_dict({"disk_write_backlog_gb": 0.25}, env={}).disk_write_backlog_gb == 0.25
    c = DynKVConfig.from_dict(None, env={"DYNKV_DISK_WRITE_BACKLOG_GB": "2"})
    assert c.disk_write_backlog_gb == 2.0


def test_dict_overrides_env() -> None:
    env = {"DYNKV_IO_THREADS": "8", "DYNKV_EVICTION": "fifo", "DYNKV_METRICS_PORT": "9100"}
    c = DynKVConfig.from_dict({"io_threads": 2, "metrics_port": None}, env=env)
    assert c.io_threads == 2  # dict wins
    assert c.eviction == "fifo"  # env fills what the dict leaves out
    assert c.metrics_port is None  # an explicit None in the dict wins too


def test_bad_env_is_not_read_when_dict_overrides() -> None:
    c = DynKVConfig.from_dict({"io_threads": 2}, env={"DYNKV_IO_THREADS": "abc"})
    assert c.io_threads == 2


def test_empty_env_var_is_unset() -> None:
    c = DynKVConfig.from_dict(None, env={"DYNKV_IO_THREADS": "", "DYNKV_HOST_GB": "  "})
    assert c.io_threads == 4 and c.host_gb == DEFAULT_HOST_GB


def test_host_size_in_dict_replaces_env_in_either_unit() -> None:
    c = DynKVConfig.from_dict({"host_pages": 64}, env={"DYNKV_HOST_GB": "8"})
    assert c.host_pages == 64 and c.host_gb is None
    c = DynKVConfig.from_dict({"host_gb": 1}, env={"DYNKV_HOST_PAGES": "64"})
    assert c.host_gb == 1.0 and c.host_pages is None
    c = DynKVConfig.from_dict({}, env={"DYNKV_HOST_PAGES": "64"})
    assert c.host_pages == 64 and c.host_gb is None


def test_host_gb_and_pages_both_in_dict() -> None:
    with pytest.raises(ValueError, match=r"'host_gb'.*'host_pages'.*one unit"):
        DynKVConfig.from_dict({"host_gb": 1, "host_pages": 8}, env={})


def test_host_gb_and_pages_both_in_env() -> None:
    with pytest.raises(ValueError, match=r"DYNKV_HOST_GB.*DYNKV_HOST_PAGES"):
        DynKVConfig.from_dict(None, env={"DYNKV_HOST_GB": "1", "DYNKV_HOST_PAGES": "8"})


def test_host_gb_and_pages_both_direct() -> None:
    with pytest.raises(ValueError, match="host_gb.*host_pages"):
        DynKVConfig(host_gb=1.0, host_pages=8)


def test_disk_gb_needs_paths() -> None:
    with pytest.raises(ValueError, match=r"'disk_gb'.*'disk_paths'"):
        DynKVConfig.from_dict({"disk_gb": 10}, env={})
    with pytest.raises(ValueError, match=r"DYNKV_DISK_GB.*disk_paths"):
        DynKVConfig.from_dict(None, env={"DYNKV_DISK_GB": "10"})
    # Paths without a size are fine: the disk tier is off.
    assert DynKVConfig.from_dict({"disk_paths": "/x"}, env={}).disk_gb == 0.0


def test_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'io_thread'.*did you mean 'io_threads'.*accepted keys: host_gb"):
        DynKVConfig.from_dict({"io_thread": 4}, env={})
    with pytest.raises(ValueError, match=r"unknown key 'zzz'; accepted keys"):
        DynKVConfig.from_dict({"zzz": 1}, env={})


BAD_VALUES = [
    ("host_gb", 0, "> 0"),
    ("host_gb", -1.5, "> 0"),
    ("host_gb", "abc", "> 0"),
    ("host_gb", float("nan"), "finite"),
    ("host_gb", float("inf"), "finite"),
    ("host_gb", True, "finite"),
    ("host_pages", 0, ">= 1"),
    ("host_pages", 1.5, ">= 1"),
    ("host_pages", "12x", ">= 1"),
    ("disk_gb", -1, ">= 0"),
    ("disk_gb", [1], ">= 0"),
    ("disk_paths", 5, "directory paths"),
    ("disk_paths", ["/a", 3], "directory paths"),
    ("disk_paths", ["/a", "/a"], "repeated: /a"),
    ("eviction", "random", "'lru', 'fifo'"),
    ("eviction", 1, "'lru', 'fifo'"),
    ("disk_admit_min_hits", -1, ">= 0"),
    ("disk_admit_min_hits", "two", ">= 0"),
    ("io_threads", 0, r"\[1, 256\]"),
    ("io_threads", 257, r"\[1, 256\]"),
    ("io_threads", None, r"\[1, 256\]"),
    ("io_threads", False, r"\[1, 256\]"),
    ("disk_write_backlog_gb", 0, "> 0"),
    ("disk_write_backlog_gb", "lots", "> 0"),
    ("init_timeout_s", 0, "> 0"),
    ("init_timeout_s", "soon", "> 0"),
    ("metrics_port", 0, r"\[1, 65535\]"),
    ("metrics_port", 65536, r"\[1, 65535\]"),
    ("metrics_port", "http", r"\[1, 65535\]"),
    ("layerwise", "maybe", "boolean"),
    ("layerwise", 1, "boolean"),
    ("disk_direct_io", None, "boolean"),
    ("side_channel_host", "a b", "host name or IP"),
    ("side_channel_host", 127, "host name or IP"),
    ("side_channel_port", -1, r"\[0, 65535\]"),
    ("side_channel_port", 70000, r"\[0, 65535\]"),
    ("transfer_timeout_s", 0, "> 0"),
    ("export_timeout_s", "later", "> 0"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_bad_dict_value_names_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=rf"key '{key}': got {value!r}".replace("[", r"\[").replace("(", r"\(")) as e:
        DynKVConfig.from_dict({key: value}, env={})
    assert "DYNKV_" not in str(e.value)
    assert e.match(expected)


@pytest.mark.parametrize(("key", "value", "expected"), [b for b in BAD_VALUES if isinstance(b[1], str)])
def test_bad_env_value_names_variable(key: str, value: str, expected: str) -> None:
    var = DynKVConfig.env_var(key)
    with pytest.raises(ValueError, match=rf"environment variable {var} \(key '{key}'\): got '{value}'") as e:
        DynKVConfig.from_dict(None, env={var: value})
    assert e.match(expected)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("io_threads", "4.0"),
        ("io_threads", "0x10"),
        ("io_threads", "1_000"),
        ("host_pages", "1e3"),
        ("host_gb", "nan"),
        ("host_gb", "inf"),
        ("host_gb", "1,5"),
        ("disk_admit_min_hits", "2 3"),
        ("layerwise", "2"),
        ("layerwise", "y"),
        ("metrics_port", "80.5"),
    ],
)
def test_env_parsing_is_strict(key: str, text: str) -> None:
    var = DynKVConfig.env_var(key)
    with pytest.raises(ValueError, match=var):
        DynKVConfig.from_dict(None, env={var: text})


def test_env_none_words_for_optional_port() -> None:
    assert DynKVConfig.from_dict(None, env={"DYNKV_METRICS_PORT": "none"}).metrics_port is None
    assert DynKVConfig.from_dict({"metrics_port": "off"}, env={}).metrics_port is None


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="key 'io_threads'"):
        DynKVConfig(io_threads=0)
    with pytest.raises(ValueError, match="key 'eviction'"):
        DynKVConfig(eviction="mru")
    assert DynKVConfig(disk_paths=["/x"], disk_gb=1).disk_paths == ("/x",)  # type: ignore[arg-type]


def test_eviction_choices_match_index() -> None:
    for name in EVICTION_POLICIES:
        assert DynKVConfig.from_dict({"eviction": name}, env={}).eviction == name


@pytest.mark.parametrize(
    "d",
    [
        {},
        {"host_pages": 7, "metrics_port": 1},
        {
            "host_gb": 0.25,
            "disk_gb": 3.5,
            "disk_paths": ["/d0", "/d1"],
            "eviction": "fifo",
            "disk_admit_min_hits": 0,
            "io_threads": 1,
            "init_timeout_s": 1e-3,
            "metrics_port": 65535,
            "layerwise": True,
            "disk_direct_io": False,
        },
    ],
)
def test_to_dict_round_trip(d: dict[str, object]) -> None:
    c = DynKVConfig.from_dict(d, env={})
    out = c.to_dict()
    assert not ("host_gb" in out and "host_pages" in out)
    assert isinstance(out["disk_paths"], list)
    assert DynKVConfig.from_dict(out, env={}) == c
    # What to_dict gives also wins over any environment.
    env = {DynKVConfig.env_var(k): "junk" for k in DynKVConfig.keys() if k not in ("host_gb", "host_pages")}
    assert DynKVConfig.from_dict(out, env=env) == c


def test_transfer_keys_and_the_secret_never_shown() -> None:
    secret = "9f" * 20
    c = DynKVConfig.from_dict(None, env={"DYNKV_TRANSFER_SECRET": secret})
    assert c.transfer_secret == secret and secret not in repr(c) and secret not in str(c)
    assert c.accept_remote_prefill is False and c.ucx_net_devices is None
    assert DynKVConfig.from_dict(None, env={}).transfer_secret is None
    for bad in ("short-secret-1234", 12345):
        with pytest.raises(ValueError, match=r"key 'transfer_secret'.*value not shown.*at least 32") as e:
            DynKVConfig.from_dict({"transfer_secret": bad}, env={})
        assert "short-secret" not in str(e.value) and "12345" not in str(e.value)
    with pytest.raises(ValueError, match="DYNKV_TRANSFER_SECRET"):
        DynKVConfig.from_dict(None, env={"DYNKV_TRANSFER_SECRET": "x"})
    c = DynKVConfig.from_dict({"accept_remote_prefill": "yes", "ucx_net_devices": "mlx5_0:1,eth0"}, env={})
    assert c.accept_remote_prefill is True and c.ucx_net_devices == "mlx5_0:1,eth0"
    with pytest.raises(ValueError, match="key 'ucx_net_devices'.*UCX device names"):
        DynKVConfig.from_dict({"ucx_net_devices": "eth0; rm -rf"}, env={})


def test_each_data_parallel_rank_gets_its_own_disk_directory_and_ports(tmp_path) -> None:
    cfg = DynKVConfig.from_dict({"host_pages": 8, "disk_gb": 1, "disk_paths": [str(tmp_path / "a"), str(tmp_path / "b")],
                                 "metrics_port": 9100, "side_channel_port": 5600}, env={})
    ranks = [cfg.for_rank(r) for r in range(2)]
    assert ranks[0].disk_paths == (str(tmp_path / "a" / "dp0"), str(tmp_path / "b" / "dp0"))
    assert ranks[1].disk_paths == (str(tmp_path / "a" / "dp1"), str(tmp_path / "b" / "dp1"))
    assert [(r.metrics_port, r.side_channel_port) for r in ranks] == [(9100, 5600), (9101, 5601)]
    # Ports count by the rank on this node; disk directories by the rank in the whole deployment.
    third = cfg.for_rank(3, dp_rank_local=1)
    assert third.disk_paths[0].endswith("dp3") and third.metrics_port == 9101
    free = DynKVConfig.from_dict({"host_pages": 8}, env={}).for_rank(1)
    assert (free.metrics_port, free.side_channel_port) == (None, 0)  # none, or any free one: as configured
    with pytest.raises(ValueError, match="metrics_port=65535: data-parallel rank 1 would listen on 65536"):
        DynKVConfig.from_dict({"host_pages": 8, "metrics_port": 65535}, env={}).for_rank(1)
