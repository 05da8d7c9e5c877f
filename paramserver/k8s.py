"""Kubernetes manifests for a cluster: ``paramserver k8s manifest -s 4 -w 16 --image IMAGE``.

The roles are placed the way docs/operations.md's "Kubernetes" section says, with the ``PS_*``
variables wired:

- the checkpoints: one PersistentVolumeClaim (``NAME-checkpoints``, ReadWriteMany) mounted at
  ``/checkpoints`` by the coordinator and every server. One claim shared by all, not one per
  server: a checkpoint is one directory that every server writes its shards into and the
  coordinator completes with one rename, and a replaced server reads any server's shards;
- the coordinator: a Job of one pod behind a Service (``NAME-coordinator``), which also
  exposes its Prometheus metrics port; it writes a checkpoint every ``checkpoint_every``
  seconds into the claim (``--checkpoint-dir``) and runs with ``--exit-when-done``;
- the servers: an Indexed Job of ``servers`` pods behind a headless Service (``NAME-server``,
  the pods' subdomain), each advertising its stable DNS name (``NAME-server-3.NAME-server``)
  and taking its rank from its completion index (``--rank $(JOB_COMPLETION_INDEX)``): a
  restarted server pod replaces the dead server of its rank and restores its shards from the
  newest checkpoint;
- the workers: an Indexed Job of ``workers`` pods; each pod's completion index is its
  ``PS_RANK``; ``PS_COORDINATOR``, ``PS_NUM_WORKERS`` and ``PS_NUM_SERVERS`` are set.

Completion. The coordinator and server pods restart on failure (``restartPolicy:
OnFailure``) and complete on a clean exit. Once every worker left (a dead one: not restarted
within ``restart_grace`` seconds), the coordinator writes a final checkpoint, stops the
servers (they exit 0) and exits 0 (paramserver.coordinator.completion): all three Jobs
complete by themselves. What remains are the Services, the completed Jobs' objects and the
claim: ``kubectl delete job,service -l app.kubernetes.io/instance=NAME`` removes them but the
claim (every object carries that label); the YAML's first lines say so.

Every container has resource requests (and memory and GPU limits) and the coordinator and the
servers have readiness and liveness probes on their ports.

With ``token_secret`` (a Secret with the key ``token``) every pod gets ``PS_TOKEN`` from it;
without one the roles are started with ``--insecure`` (a trusted network only).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Any

from paramserver.errors import ConfigError

__all__ = [
    "PodResources",
    "add_manifest_arguments",
    "manifest",
    "manifest_from_arguments",
    "manifest_objects",
]

CHECKPOINTS = "/checkpoints"  # where the checkpoint claim is mounted
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
# A Job's pods are named after it plus an index and 6 characters, and their hostname (an
# Indexed Job's NAME-server-INDEX) must fit a DNS label's 63: kept with room to spare.
_MAX_NAME = 52 - len("-coordinator")


@dataclass(frozen=True)
class PodResources:
    """Requests of one container (``cpu`` and ``memory`` as Kubernetes quantities: ``"2"``,
    ``"500m"``, ``"4Gi"``); memory is also its limit, and ``gpus`` (``nvidia.com/gpu``) a
    limit.

    Example:
        PodResources(cpu="4", memory="16Gi", gpus=1)
    """

    cpu: str | None = None
    memory: str | None = None
    gpus: int = 0

    def __post_init__(self) -> None:
        for what, v in (("cpu", self.cpu), ("memory", self.memory)):
            if v is not None and not _QUANTITY.fullmatch(str(v)):
                raise ConfigError(
                    f"k8s manifest: {what} {v!r} is not a Kubernetes quantity (e.g. 2, 500m, 4Gi)"
                )
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ConfigError(f"k8s manifest: gpus must be an integer >= 0, got {self.gpus!r}")

    def to_k8s(self) -> dict[str, Any]:
        requests = {k: str(v) for k, v in (("cpu", self.cpu), ("memory", self.memory)) if v}
        limits: dict[str, Any] = {"memory": str(self.memory)} if self.memory else {}
        if self.gpus:
            limits["nvidia.com/gpu"] = self.gpus
        out: dict[str, Any] = {}
        if requests:
            out["requests"] = requests
        if limits:
            out["limits"] = limits
        return out


_DEFAULTS = {
    "coordinator": PodResources(cpu="500m", memory="512Mi"),
    "server": PodResources(cpu="1", memory="2Gi"),
    "worker": PodResources(cpu="1", memory="2Gi"),
}


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _probes(port: int) -> dict[str, Any]:
    """Ready once the role listens on ``port``; restarted when it stops listening for ~1 min
    (a TCP connect: it needs no cluster token and costs the role nothing)."""
    return {
        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 5},
        "livenessProbe": {
            "tcpSocket": {"port": port},
            "initialDelaySeconds": 30,
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
    }


def _check(
    name: str,
    namespace: str | None,
    token_secret: str | None,
    checkpoint_claim: str | None,
    ports: dict[str, int],
    command: list[str] | None,
) -> None:
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _DNS_LABEL.fullmatch(name):
        raise ConfigError(
            f"k8s manifest: --name {name!r} must be a DNS-1123 label of at most {_MAX_NAME} "
            "characters (lower-case letters, digits and '-', starting and ending with a letter "
            "or digit): objects are named NAME-coordinator, NAME-server-0, ..."
        )
    if namespace is not None and (len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace)):
        raise ConfigError(
            f"k8s manifest: --namespace {namespace!r} must be a DNS-1123 label "
            "(lower-case letters, digits and '-', at most 63 characters)"
        )
    for flag, v in (("--token-secret", token_secret), ("--checkpoint-claim", checkpoint_claim)):
        if v is not None and (len(v) > 253 or not _DNS_SUBDOMAIN.fullmatch(v)):
            raise ConfigError(
                f"k8s manifest: {flag} {v!r} is not a valid object name (DNS-1123 subdomain: "
                "lower-case letters, digits, '-' and '.')"
            )
    for flag, p in ports.items():
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ConfigError(f"k8s manifest: {flag} must be a port in 1..65535, got {p!r}")
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"k8s manifest: the ports must differ, got {ports}")
    if not command or not all(isinstance(c, str) and c for c in command):
        raise ConfigError(
            "k8s manifest: give the worker command after --, e.g. "
            "paramserver k8s manifest -s 2 -w 4 --image IMAGE -- python train.py"
        )


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
    checkpoint_size: str = "10Gi",
    storage_class: str | None = None,
    checkpoint_claim: str | None = None,
    checkpoint_every: float = 600.0,
    restart_grace: float = 300.0,
    coordinator_resources: PodResources | None = None,
    server_resources: PodResources | None = None,
    worker_resources: PodResources | None = None,
) -> list[dict[str, Any]]:
    """The Kubernetes objects of a cluster, as plain maps (see the module docstring).
    ``checkpoint_claim`` names an existing claim to use instead of making one of
    ``checkpoint_size`` (in ``storage_class``, which must offer ReadWriteMany);
    ``restart_grace`` is how long the coordinator waits for a dead worker's restart before it
    ends the job.

    Example:
        objs = manifest_objects(servers=4, workers=16, image="me/train:1",
                                command=["python", "t.py"],
                                worker_resources=PodResources(cpu="4", memory="8Gi", gpus=1))
    """
    if servers < 1 or workers < 1:
        raise ConfigError(f"need at least 1 server and 1 worker, got {servers} and {workers}")
    if not image:
        raise ConfigError("k8s manifest: --image is required")
    _check(
        name,
        namespace,
        token_secret,
        checkpoint_claim,
        {"--port": port, "--server-port": server_port, "--metrics-port": metrics_port},
        command,
    )
    if not _QUANTITY.fullmatch(checkpoint_size):
        raise ConfigError(
            f"k8s manifest: --checkpoint-size {checkpoint_size!r} is not a quantity (e.g. 50Gi)"
        )
    if not checkpoint_every > 0:
        raise ConfigError(f"k8s manifest: --checkpoint-every must be > 0, got {checkpoint_every}")
    if not restart_grace >= 0:
        raise ConfigError(f"k8s manifest: --restart-grace must be >= 0, got {restart_grace}")
    res = {
        "coordinator": coordinator_resources or _DEFAULTS["coordinator"],
        "server": server_resources or _DEFAULTS["server"],
        "worker": worker_resources or _DEFAULTS["worker"],
    }
    coord, srv, wrk = f"{name}-coordinator", f"{name}-server", f"{name}-worker"
    claim = checkpoint_claim or f"{name}-checkpoints"
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
        return {
            "app.kubernetes.io/name": "paramserver",
            "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": role,
        }

    mount = [{"name": "checkpoints", "mountPath": CHECKPOINTS}]
    volume = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}]

    def pod(
        role: str, restart: str, container: dict[str, Any], serves: int | None = None, **spec: Any
    ) -> dict[str, Any]:
        """The pod template of ``role``: one container of the image, named for the role; one
        that ``serves`` on a port has the checkpoint volume and probes of that port."""
        box = {"name": role, "image": image, **container, "resources": res[role].to_k8s()}
        if serves is not None:
            box |= {"volumeMounts": mount, **_probes(serves)}
            spec = {**spec, "containers": [box], "volumes": volume}
        else:
            spec = {**spec, "containers": [box]}
        return {"metadata": {"labels": labels(role)}, "spec": {"restartPolicy": restart, **spec}}

    coordinator_pod = pod(
        "coordinator",
        "OnFailure",
        {
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
                "--checkpoint-dir",
                CHECKPOINTS,
                "--checkpoint-every",
                f"{checkpoint_every:g}",
                "--exit-when-done",
                "--restart-grace",
                f"{restart_grace:g}",
                *insecure,
            ],
            "env": common,
            "ports": [
                {"name": "coordinator", "containerPort": port},
                {"name": "metrics", "containerPort": metrics_port},
            ],
        },
        serves=port,
    )
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    server_pod = pod(
        "server",
        "OnFailure",
        {
            "command": ["paramserver", "server"],
            "args": [
                "--coordinator",
                address,
                "--host",
                "0.0.0.0",
                "--port",
                str(server_port),
                "--advertise",
                f"{srv}-$(JOB_COMPLETION_INDEX).{srv}",
                "--rank",
                "$(JOB_COMPLETION_INDEX)",
                *insecure,
            ],
            "env": [
                # set by the Job controller too; named here so that $(...) expands it
                {
                    "name": "JOB_COMPLETION_INDEX",
                    "valueFrom": {"fieldRef": {"fieldPath": index}},
                },
                *common,
            ],
            "ports": [{"name": "data", "containerPort": server_port}],
        },
        serves=server_port,
        subdomain=srv,  # with the headless Service: NAME-server-3.NAME-server resolves
    )
    worker_pod = pod(
        "worker",
        "Never",
        {
            "command": list(command or []),
            "env": [
                {"name": "PS_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
                *common,
            ],
        },
    )
    objects: list[dict[str, Any]] = []
    if checkpoint_claim is None:
        pvc_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": checkpoint_size}},
        }
        if storage_class:
            pvc_spec["storageClassName"] = storage_class
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": _meta(claim, namespace, labels("checkpoints")),
                "spec": pvc_spec,
            }
        )
    objects += [
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
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": _meta(coord, namespace, labels("coordinator")),
            "spec": {"completions": 1, "backoffLimit": 6, "template": coordinator_pod},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(srv, namespace, labels("server")),
            "spec": {
                "clusterIP": "None",
                # a server registers its name before its probe passes: resolvable at once
                "publishNotReadyAddresses": True,
                "selector": labels("server"),
                "ports": [{"name": "data", "port": server_port, "targetPort": server_port}],
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": _meta(srv, namespace, labels("server")),
            "spec": {
                "completionMode": "Indexed",
                "completions": servers,
                "parallelism": servers,
                "backoffLimit": 6 * servers,  # restarts in place, counted over all servers
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
    return objects


def add_manifest_arguments(m: argparse.ArgumentParser) -> None:
    """The flags of ``paramserver k8s manifest``, one per argument of :func:`manifest_objects`.

    Example:
        add_manifest_arguments(argparse.ArgumentParser())
    """
    m.add_argument("-s", "--servers", type=int, required=True, help="number of servers")
    m.add_argument("-w", "--workers", type=int, required=True, help="number of workers")
    m.add_argument("--image", required=True, help="container image with paramserver installed")
    m.add_argument("--name", default="paramserver", help="prefix of every object's name")
    m.add_argument("--namespace", default=None, help="namespace of every object")
    m.add_argument("--port", type=int, default=7070, help="coordinator port")
    m.add_argument("--server-port", type=int, default=7071, help="servers' data port")
    m.add_argument("--metrics-port", type=int, default=9100, help="coordinator metrics port")
    m.add_argument(
        "--token-secret",
        default=None,
        help="name of a Secret with key 'token': sets PS_TOKEN everywhere (else --insecure)",
    )
    m.add_argument("--checkpoint-size", default="10Gi", help="size of the checkpoint claim")
    m.add_argument(
        "--storage-class",
        default=None,
        help="storage class of the claim (must offer ReadWriteMany)",
    )
    m.add_argument(
        "--checkpoint-claim", default=None, help="use this existing claim for the checkpoints"
    )
    m.add_argument(
        "--checkpoint-every", type=float, default=600.0, help="seconds between checkpoints"
    )
    for role in ("coordinator", "server", "worker"):
        m.add_argument(
            f"--{role}-cpu", default=None, help=f"CPU request of a {role} (e.g. 2, 500m)"
        )
        m.add_argument(
            f"--{role}-memory", default=None, help=f"memory request and limit of a {role} (4Gi)"
        )
    m.add_argument(
        "--restart-grace",
        type=float,
        default=300.0,
        help="seconds the coordinator waits for a dead worker's restart before it ends the job",
    )
    m.add_argument("--worker-gpus", type=int, default=0, help="nvidia.com/gpu limit of a worker")
    m.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    m.add_argument(
        "worker_command",
        nargs=argparse.REMAINDER,
        metavar="command",
        help="the worker command, e.g. -- python train.py",
    )


def manifest_from_arguments(args: argparse.Namespace) -> str:
    """The YAML of ``paramserver k8s manifest`` for parsed :func:`add_manifest_arguments`.

    Example:
        manifest_from_arguments(parser.parse_args(["-s", "1", "-w", "1", "--image", "i", "t.py"]))
    """

    def resources(role: str) -> PodResources | None:
        cpu, memory = getattr(args, f"{role}_cpu"), getattr(args, f"{role}_memory")
        gpus = getattr(args, f"{role}_gpus", 0)
        if cpu is None and memory is None and not gpus:
            return None  # the defaults
        return PodResources(cpu=cpu, memory=memory, gpus=gpus)

    command = args.worker_command
    return manifest(
        servers=args.servers,
        workers=args.workers,
        image=args.image,
        command=command[1:] if command[:1] == ["--"] else command,
        name=args.name,
        namespace=args.namespace,
        port=args.port,
        server_port=args.server_port,
        metrics_port=args.metrics_port,
        token_secret=args.token_secret,
        checkpoint_size=args.checkpoint_size,
        storage_class=args.storage_class,
        checkpoint_claim=args.checkpoint_claim,
        checkpoint_every=args.checkpoint_every,
        restart_grace=args.restart_grace,
        coordinator_resources=resources("coordinator"),
        server_resources=resources("server"),
        worker_resources=resources("worker"),
    )


def _header(name: str, namespace: str | None) -> str:
    ns = f" -n {namespace}" if namespace else ""
    return (
        f"# paramserver cluster {name!r}: kubectl apply{ns} -f THIS_FILE\n"
        f"# the Jobs complete by themselves: once every worker left, the coordinator writes a\n"
        f"# final checkpoint, stops the servers and exits. Then remove what remains (the claim,\n"
        f"# with the checkpoints, stays; add pvc to remove it too):\n"
        f"#   kubectl wait{ns} --for=condition=complete job/{name}-coordinator --timeout=-1s\n"
        f"#   kubectl delete{ns} job,service -l app.kubernetes.io/instance={name}\n"
    )


def manifest(**kwargs: Any) -> str:
    """The objects of :func:`manifest_objects` as one multi-document YAML text (JSON documents,
    which are YAML too, when PyYAML is not installed), after comment lines that say how to
    apply it and how to remove what remains once the Jobs completed.

    Example:
        open("ps.yaml", "w").write(manifest(servers=4, workers=16, image="me/train:1",
                                            command=["python", "train.py"]))
    """
    objects = manifest_objects(**kwargs)
    head = _header(kwargs.get("name", "paramserver"), kwargs.get("namespace"))
    try:
        import yaml
    except ImportError:
        return head + "".join("---\n" + json.dumps(o, indent=2) + "\n" for o in objects)
    return head + yaml.safe_dump_all(objects, sort_keys=False)
