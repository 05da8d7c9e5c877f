"""Kubernetes manifests for a cluster: ``paramserver k8s manifest -s 4 -w 16 --image IMAGE``.

The roles are placed the way DESIGN.md's "Many hosts" says, with the ``PS_*`` variables wired:

- the coordinator: a StatefulSet of one pod behind a Service (``NAME-coordinator``), which
  also exposes its Prometheus metrics port;
- the servers: a StatefulSet of ``servers`` pods behind a headless Service (``NAME-server``),
  each advertising its stable DNS name (``NAME-server-3.NAME-server``);
- the workers: an Indexed Job of ``workers`` pods; each pod's completion index is its
  ``PS_RANK``; ``PS_COORDINATOR``, ``PS_NUM_WORKERS`` and ``PS_NUM_SERVERS`` are set.

With ``token_secret`` (a Secret with the key ``token``) every pod gets ``PS_TOKEN`` from it;
without one the roles are started with ``--insecure`` (a trusted network only).
"""

from __future__ import annotations

import json
from typing import Any

from paramserver.errors import ConfigError

__all__ = ["manifest", "manifest_objects"]


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def manifest_objects(
    *,
    servers: int,
    workers: int,
    image: str,
    command: list[str] | None = None,
    name: str = "paramserver",
    namespace: str | None = None,
    port: int = 7070,
    server_port: int = 7071,
    metrics_port: int = 9100,
    token_secret: str | None = None,
) -> list[dict[str, Any]]:
    """The Kubernetes objects of a cluster, as plain maps (see the module docstring).

    Example:
        objs = manifest_objects(servers=4, workers=16, image="me/train:1", command=["python", "t.py"])
    """
    if servers < 1 or workers < 1:
        raise ConfigError(f"need at least 1 server and 1 worker, got {servers} and {workers}")
    if not image:
        raise ConfigError("k8s manifest: --image is required")
    coord, srv, wrk = f"{name}-coordinator", f"{name}-server", f"{name}-worker"
    address = f"{coord}:{port}"
    common = [
        _env("PS_COORDINATOR", address),
        _env("PS_NUM_SERVERS", str(servers)),
        _env("PS_NUM_WORKERS", str(workers)),
    ]
    insecure: list[str] = []
    if token_secret:
        common.append(
            {
                "name": "PS_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}},
            }
        )
    else:
        insecure = ["--insecure"]

    def labels(role: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": role}

    coordinator_pod = {
        "metadata": {"labels": labels("coordinator")},
        "spec": {
            "containers": [
                {
                    "name": "coordinator",
                    "image": image,
                    "command": ["paramserver", "coordinator"],
                    "args": [
                        "--bind",
                        f"0.0.0.0:{port}",
                        "-s",
                        str(servers),
                        "-w",
                        str(workers),
                        "--metrics-port",
                        str(metrics_port),
                        "--metrics-host",
                        "0.0.0.0",
                        *insecure,
                    ],
                    "env": common,
                    "ports": [
                        {"name": "coordinator", "containerPort": port},
                        {"name": "metrics", "containerPort": metrics_port},
                    ],
                }
            ]
        },
    }
    server_pod = {
        "metadata": {"labels": labels("server")},
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": image,
                    "command": ["paramserver", "server"],
                    "args": [
                        "--coordinator",
                        address,
                        "--host",
                        "0.0.0.0",
                        "--port",
                        str(server_port),
                        "--advertise",
                        f"$(POD_NAME).{srv}",
                        *insecure,
                    ],
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        *common,
                    ],
                    "ports": [{"name": "data", "containerPort": server_port}],
                }
            ]
        },
    }
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    worker_pod = {
        "metadata": {"labels": labels("worker")},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    **({"command": list(command)} if command else {}),
                    "env": [
                        {"name": "PS_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
                        *common,
                    ],
                }
            ],
        },
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(coord, namespace, labels("coordinator")),
            "spec": {
                "selector": labels("coordinator"),
                "ports": [
                    {"name": "coordinator", "port": port, "targetPort": port},
                    {"name": "metrics", "port": metrics_port, "targetPort": metrics_port},
                ],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _meta(coord, namespace, labels("coordinator")),
            "spec": {
                "serviceName": coord,
                "replicas": 1,
                "selector": {"matchLabels": labels("coordinator")},
                "template": coordinator_pod,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(srv, namespace, labels("server")),
            "spec": {
                "clusterIP": "None",
                "selector": labels("server"),
                "ports": [{"name": "data", "port": server_port, "targetPort": server_port}],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _meta(srv, namespace, labels("server")),
            "spec": {
                "serviceName": srv,
                "replicas": servers,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": labels("server")},
                "template": server_pod,
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": _meta(wrk, namespace, labels("worker")),
            "spec": {
                "completionMode": "Indexed",
                "completions": workers,
                "parallelism": workers,
                "backoffLimit": workers,
                "template": worker_pod,
            },
        },
    ]


def manifest(**kwargs: Any) -> str:
    """The objects of :func:`manifest_objects` as one multi-document YAML text (JSON documents,
    which are YAML too, when PyYAML is not installed).

    Example:
        open("ps.yaml", "w").write(manifest(servers=4, workers=16, image="me/train:1"))
    """
    objects = manifest_objects(**kwargs)
    try:
        import yaml
    except ImportError:
        return "".join("---\n" + json.dumps(o, indent=2) + "\n" for o in objects)
    return yaml.safe_dump_all(objects, sort_keys=False)
