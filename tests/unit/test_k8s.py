"""``paramserver k8s manifest``: the generated YAML has the objects and wiring it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest

from paramserver.errors import ConfigError
from paramserver.k8s import PodResources, manifest_objects

yaml = pytest.importorskip(
    "yaml", reason="PyYAML is not installed (pip install 'paramserver[ops]')"
)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_cli_writes_services_and_jobs_that_complete(tmp_path: Any) -> None:
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
        ("PersistentVolumeClaim", "paramserver-checkpoints"),
        ("Service", "paramserver-coordinator"),
        ("Job", "paramserver-coordinator"),
        ("Service", "paramserver-server"),
        ("Job", "paramserver-server"),
        ("Job", "paramserver-worker"),
    }
    coord_svc = by[("Service", "paramserver-coordinator")]["spec"]
    assert {p["port"] for p in coord_svc["ports"]} == {7070, 9100}

    coord = by[("Job", "paramserver-coordinator")]["spec"]
    assert coord["completions"] == 1
    assert coord["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert coord["template"]["metadata"]["labels"] == coord_svc["selector"]
    c = coord["template"]["spec"]["containers"][0]
    assert c["command"] == ["paramserver", "coordinator"]
    assert c["args"][c["args"].index("-s") + 1] == "4"
    assert c["args"][c["args"].index("-w") + 1] == "16"
    assert "--metrics-port" in c["args"] and "--insecure" in c["args"]
    # the coordinator ends the job once the workers are done: its Job completes
    assert "--exit-when-done" in c["args"]
    assert c["args"][c["args"].index("--restart-grace") + 1] == "300"

    servers = by[("Job", "paramserver-server")]["spec"]
    assert servers["completionMode"] == "Indexed"
    assert servers["completions"] == servers["parallelism"] == 4
    pod = servers["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["subdomain"] == "paramserver-server"
    assert by[("Service", "paramserver-server")]["spec"]["clusterIP"] == "None"
    s = pod["containers"][0]
    assert s["args"][s["args"].index("--coordinator") + 1] == "paramserver-coordinator:7070"
    # an Indexed Job's pod hostname is JOB-INDEX, resolvable under the headless Service
    advertise = s["args"][s["args"].index("--advertise") + 1]
    assert advertise == "paramserver-server-$(JOB_COMPLETION_INDEX).paramserver-server"

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
        servers=1, workers=1, image="x", token_secret="ps-token", namespace="ml", command=["t"]
    )
    for d in docs:
        assert d["metadata"]["namespace"] == "ml"
        if d["kind"] == "Job":
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert env_of(c)["PS_TOKEN"] == {"secretKeyRef": {"name": "ps-token", "key": "token"}}
            assert "--insecure" not in c.get("args", [])


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        manifest_objects(servers=0, workers=1, image="x")


def test_objects_pass_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for kwargs in (
        {},
        {"token_secret": "ps-token", "namespace": "ml", "storage_class": "nfs"},
        {
            "checkpoint_claim": "shared-ckpt",
            "worker_resources": PodResources(cpu="4", memory="8Gi", gpus=1),
            "server_resources": PodResources(cpu="500m"),
        },
    ):
        objs = manifest_objects(
            servers=3, workers=2, image="me/train:1", command=["python", "t.py"], **kwargs
        )
        for obj in objs:
            # strict: a misspelt or misplaced field is an error too, not ignored
            kv.validate(obj, "1.30", strict=True)


def test_servers_take_rank_from_completion_index_and_checkpoint_on_the_claim() -> None:
    objs = manifest_objects(servers=2, workers=1, image="x", command=["t"], name="ctr")
    by = {(d["kind"], d["metadata"]["name"]): d for d in objs}
    claim = by[("PersistentVolumeClaim", "ctr-checkpoints")]["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]
    for role in ("coordinator", "server"):
        pod = by[("Job", f"ctr-{role}")]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["volumes"] == [
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ctr-checkpoints"}}
        ]
        assert c["volumeMounts"] == [{"name": "checkpoints", "mountPath": "/checkpoints"}]
        assert c["readinessProbe"]["tcpSocket"] and c["livenessProbe"]["tcpSocket"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    coord = by[("Job", "ctr-coordinator")]["spec"]["template"]["spec"]["containers"][0]
    assert coord["args"][coord["args"].index("--checkpoint-dir") + 1] == "/checkpoints"
    s = by[("Job", "ctr-server")]["spec"]["template"]["spec"]["containers"][0]
    assert s["args"][s["args"].index("--rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    # named in the container's env (from the completion-index annotation), so $(...) expands
    assert env_of(s)["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    # every object is found by the one label the cleanup deletes by
    assert all(d["metadata"]["labels"]["app.kubernetes.io/instance"] == "ctr" for d in objs)


def test_worker_gpus_and_resources_from_the_command_line(tmp_path: Any) -> None:
    got = subprocess.run(
        [
            sys.executable, "-m", "paramserver.cli", "k8s", "manifest", "-s", "1", "-w", "2",
            "--image", "i", "--worker-cpu", "4", "--worker-memory", "8Gi", "--worker-gpus", "1",
            "--", "python", "t.py",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert "kubectl delete job,service -l app.kubernetes.io/instance=paramserver" in got.stdout
    job = next(
        d
        for d in yaml.safe_load_all(got.stdout)
        if d["kind"] == "Job" and d["metadata"]["name"] == "paramserver-worker"
    )
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {
        "requests": {"cpu": "4", "memory": "8Gi"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": 1},
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "My_Cluster"}, "--name 'My_Cluster' must be a DNS-1123 label"),
        ({"name": "-x"}, "must be a DNS-1123 label"),
        ({"name": "a" * 41}, "at most 40 characters"),
        ({"namespace": "ML"}, "--namespace 'ML' must be a DNS-1123 label"),
        ({"token_secret": "bad secret"}, "--token-secret 'bad secret' is not a valid"),
        ({"command": []}, "give the worker command after --"),
        ({"command": None}, "give the worker command after --"),
        ({"port": 70000}, "--port must be a port"),
        ({"metrics_port": 7070}, "the ports must differ"),
        ({"checkpoint_size": "ten gigs"}, "--checkpoint-size 'ten gigs' is not a quantity"),
        ({"restart_grace": -1.0}, "--restart-grace must be >= 0"),
        ({"worker_resources": "x"}, None),
    ],
)
def test_bad_names_and_an_empty_command_are_refused(kwargs: dict[str, Any], match: str) -> None:
    if match is None:  # a quantity that is not one
        with pytest.raises(ConfigError, match="is not a Kubernetes quantity"):
            PodResources(memory="8 gigs")
        return
    args: dict[str, Any] = {"servers": 1, "workers": 1, "image": "x", "command": ["t"]}
    with pytest.raises(ConfigError, match=re.escape(match)):
        manifest_objects(**{**args, **kwargs})


def test_cli_refuses_an_empty_worker_command() -> None:
    got = subprocess.run(
        [sys.executable, "-m", "paramserver.cli", "k8s", "manifest", "-s", "1", "-w", "1",
         "--image", "i"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 2 and "give the worker command after --" in got.stderr, got.stderr
