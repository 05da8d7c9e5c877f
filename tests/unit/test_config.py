"""Settings, PS_* variables and the public API."""

from __future__ import annotations

import pytest

import paramserver as ps
from paramserver.config import cluster_to_env, from_env, normalize_address, parse_consistency
from paramserver.errors import ConfigError


def test_env_is_parsed_in_one_place() -> None:
    env = from_env(
        {
            "PS_COORDINATOR": "10.0.0.1:7000",
            "PS_RANK": "3",
            "PS_NUM_WORKERS": "4",
            "PS_HEARTBEAT_TIMEOUT": "7.5",
        }
    )
    assert env.coordinator == "tcp://10.0.0.1:7000"
    assert (env.rank, env.num_workers) == (3, 4)
    assert env.timeouts.heartbeat_timeout == 7.5
    assert from_env({}).coordinator is None


def test_a_clusters_env_reads_back_as_its_settings() -> None:
    t = ps.Timeouts(heartbeat_interval=0.1, heartbeat_timeout=0.7, request=3.25, connect=9.0)
    env = from_env(cluster_to_env("tcp://10.0.0.1:7000", 4, 2, t, "secret"))
    assert env.coordinator == "tcp://10.0.0.1:7000"
    assert (env.num_workers, env.num_servers, env.rank) == (4, 2, None)
    assert env.timeouts == t
    assert env.token == "secret"
    assert "PS_TOKEN" not in cluster_to_env("tcp://10.0.0.1:7000", 4, 2, t, None)


@pytest.mark.parametrize(
    "name,value",
    [
        ("PS_RANK", "-1"),
        ("PS_HEARTBEAT_TIMEOUT", "soon"),
        ("PS_COORDINATOR", "nohost"),
        ("PS_REQUEST_TIMEOUT", "0"),
    ],
)
def test_bad_env_values_are_config_errors_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*{value}"):
        from_env({name: value})


def test_addresses_and_consistency() -> None:
    assert normalize_address("tcp://h:1") == "tcp://h:1"
    for bad in ("h", "h:0", "h:99999", "udp://h:1", ""):
        with pytest.raises(ConfigError):
            normalize_address(bad)
    assert parse_consistency("ssp:0") == ("ssp", 0)
    for bad in ("ssp", "ssp:x", "bsp", "ssp:-1"):
        with pytest.raises(ConfigError):
            parse_consistency(bad)


def test_heartbeat_timeout_must_exceed_interval() -> None:
    with pytest.raises(ConfigError, match="twice"):
        ps.Timeouts(heartbeat_interval=1.0, heartbeat_timeout=1.5)


def test_public_api_is_pinned() -> None:
    assert sorted(ps.__all__) == sorted(
        [
            "CacheSpec",
            "Client",
            "DenseTable",
            "Future",
            "LocalCluster",
            "SparseTable",
            "Timeouts",
            "__version__",
            "connect",
            "errors",
            "init",
            "launch",
            "optim",
            "ray",
        ]
    )
    for name in ps.__all__:
        assert getattr(ps, name) is not None
    assert {"SGD", "Momentum", "Adagrad", "Adam", "FTRL"} <= set(ps.optim.__all__)
    assert {"Zeros", "Constant", "Normal", "Uniform"} <= set(ps.init.__all__)
    assert issubclass(ps.errors.PSTimeoutError, TimeoutError)
