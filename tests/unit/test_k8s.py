"""``paramserver k8s manifest``: the generated YAML has the objects and wiring it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from paramserver.errors import ConfigError
from paramserver.k8s import manifest_objects

yaml = pytest.importorskip(
    "yaml", reason="PyYAML is not installed (pip install 'paramserver[ops]')"
)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_cli_writes_services_statefulsets_and_an_indexed_job(tmp_path: Any) -> None:
    out = tmp_path / "ps.yaml"
    got = subprocess.run(
        [
            sys.executable, "-m", "paramserver.cli", "k8s", "manifest", "-s", "4", "-w", "16",
            "--image", "me/train:1", "-o", str(out), "--", "python", "train.py", "--epochs", "3",
        ],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert set(by) == {
        ("Service", "paramserver-coordinator"),
        ("StatefulSet", "paramserver-coordinator"),
        ("Service", "paramserver-server"),
        ("StatefulSet", "paramserver-server"),
        ("Job", "paramserver-worker"),
    }
    coord_svc = by[("Service", "paramserver-coordinator")]["spec"]
    assert {p["port"] for p in coord_svc["ports"]} == {7070, 9100}

    coord = by[("StatefulSet", "paramserver-coordinator")]["spec"]
    assert coord["replicas"] == 1
    assert coord["selector"]["matchLabels"] == coord["template"]["metadata"]["labels"]
    assert coord["selector"]["matchLabels"] == coord_svc["selector"]
    c = coord["template"]["spec"]["containers"][0]
    assert c["command"] == ["paramserver", "coordinator"]
    assert c["args"][c["args"].index("-s") + 1] == "4"
    assert c["args"][c["args"].index("-w") + 1] == "16"
    assert "--metrics-port" in c["args"] and "--insecure" in c["args"]

    servers = by[("StatefulSet", "paramserver-server")]["spec"]
    assert servers["replicas"] == 4 and servers["serviceName"] == "paramserver-server"
    assert by[("Service", "paramserver-server")]["spec"]["clusterIP"] == "None"
    s = servers["template"]["spec"]["containers"][0]
    assert s["args"][s["args"].index("--coordinator") + 1] == "paramserver-coordinator:7070"
    assert "$(POD_NAME).paramserver-server" in s["args"]
    assert env_of(s)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    job = by[("Job", "paramserver-worker")]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == 16
    w = job["template"]["spec"]["containers"][0]
    assert w["command"] == ["python", "train.py", "--epochs", "3"]
    env = env_of(w)
    assert env["PS_COORDINATOR"] == "paramserver-coordinator:7070"
    assert env["PS_NUM_SERVERS"] == "4" and env["PS_NUM_WORKERS"] == "16"
    assert "job-completion-index" in env["PS_RANK"]["fieldRef"]["fieldPath"]
    assert "PS_TOKEN" not in env


def test_token_secret_replaces_insecure() -> None:
    docs = manifest_objects(
        servers=1, workers=1, image="x", token_secret="ps-token", namespace="ml"
    )
    for d in docs:
        assert d["metadata"]["namespace"] == "ml"
        if d["kind"] in ("StatefulSet", "Job"):
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert env_of(c)["PS_TOKEN"] == {"secretKeyRef": {"name": "ps-token", "key": "token"}}
            assert "--insecure" not in c.get("args", [])


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        manifest_objects(servers=0, workers=1, image="x")
