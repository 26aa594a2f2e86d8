"""Pods as the cluster starts them, with a real container engine: the container of a rendered TrainJob or
PyTorchJob (command, args, env, working directory, user), the environment the training operator injects, the host
network (the S3 test server is on loopback). Used by the tests in this folder (conftest.py has their fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from barlow.launch.render import render
from barlow.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
ENGINE = os.environ.get("ENGINE", "docker")
TORCH_BASE = os.environ.get("TORCH_BASE", "barlow-standin/torch:2.14.1")
PYTHON_BASE = os.environ.get("PYTHON_BASE", "barlow-standin/python:bookworm")
IMAGE, CLI_IMAGE = "barlow-test:ci", "barlow-test-cli:ci"


def engine(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spec(server, data: str, name: str, backend: str, **overrides) -> dict:
    """A small CPU pretrain of two nodes, one process each, data (at `data`) and output on the test S3 server."""
    runs = f"s3://{server.bucket}/images-runs/{uuid.uuid4().hex[:8]}"
    spec = {
        "kind": "pretrain", "name": name,
        "data": {"format": "shards", "train": f"{data}/train/index.json", "val": f"{data}/val/index.json",
                 "shuffle_buffer": 200, "image_size": 16, "workers": 0,
                 "s3": {"endpoint_url": server.endpoint_url, "retries": 10, "addressing_style": "path"}},
        "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "128-128-128"},
        "optim": {"epochs": 2, "batch_size": 32, "warmup_epochs": 1},
        "runtime": {"nodes": 2, "nproc_per_node": 1, "device": "cpu", "log_every": 2, "seed": 7},
        "output": {"url": f"{runs}/{name}", "checkpoint_every": 4, "keep": 2},
        "monitor": {"online_probe": "off", "knn_every_epochs": 0},  # the pods' path, not quality: seconds saved
        "cluster": {"backend": backend, "cpu_only": True, "image": IMAGE, "s3_secret": "s3-credentials"},
    }
    for path, value in overrides.items():
        node = spec
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return spec


@dataclass
class Container:
    """What the kubelet would start: a pod's container, from the rendered manifest."""

    command: list[str]
    args: list[str]
    env: dict[str, str]
    working_dir: str | None
    user: str | None
    secrets: list[str] = field(default_factory=list)  # envFrom secretRef names / secretKeyRef names used


def _container(pod_spec: dict, container: dict, secrets: dict[str, dict[str, str]]) -> Container:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(secrets[source["secretRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    security = {**pod_spec.get("securityContext", {}), **container.get("securityContext", {})}
    user = f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}" if "runAsUser" in security else None
    return Container(container["command"], container.get("args", []), env, container.get("workingDir"), user)


def pod_containers(spec: dict, secrets: dict[str, dict[str, str]]) -> list[Container]:
    """One Container per node, from the rendered TrainJob (trainer + the runtime patch's pod) or PyTorchJob
    (Master, then Worker replicas)."""
    manifests = render(parse_spec(spec))
    job = next(m for m in manifests if m["kind"] in ("TrainJob", "PyTorchJob"))
    if job["kind"] == "PyTorchJob":
        out = []
        for role in ("Master", "Worker"):
            replica = job["spec"]["pytorchReplicaSpecs"].get(role)
            if replica:
                pod = replica["template"]["spec"]
                out += [_container(pod, pod["containers"][0], secrets)] * replica["replicas"]
        return out
    trainer = job["spec"]["trainer"]
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    node = {**pod["containers"][0], "command": trainer["command"], "args": trainer.get("args", []),
            "env": trainer.get("env", [])}
    return [_container(pod, node, secrets)] * trainer["numNodes"]


def operator_env(backend: str, rank: int, nodes: int, nproc: int, port: int) -> dict[str, str]:
    """What Trainer's torch runtime or the training operator injects into node `rank`'s pod."""
    env = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(rank),
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    if backend == "pytorchjob":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nodes), RANK=str(rank))
    return env


class Pods:
    """Containers started with the engine as a pod's: --entrypoint = command[0], the rest + args as arguments; each
    variable passed by name (`-e NAME`) from the engine client's environment, so multi-line values (the spec) pass."""

    def __init__(self, image: str):
        self.image = image
        self.names: list[str] = []

    def start(self, name: str, c: Container, extra_env: dict[str, str]) -> str:
        env = {**c.env, **extra_env}
        # a read-only root: the image writes nothing outside HOME, the temporary directory and the run's output
        cmd = [ENGINE, "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--read-only", "--tmpfs", "/tmp",
               "--tmpfs", "/home/barlow:uid=1000,gid=1000", "--entrypoint", c.command[0]]
        if c.user:
            cmd += ["--user", c.user]
        if c.working_dir:
            cmd += ["--workdir", c.working_dir]
        for k in env:
            cmd += ["-e", k]
        cmd += [self.image, *c.command[1:], *c.args]
        engine("rm", "-f", name)
        started = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert started.returncode == 0, started.stderr
        self.names.append(name)
        return name

    def wait(self, name: str, timeout: float = 600) -> int:
        out = engine("wait", name, timeout=timeout)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    def logs(self, name: str) -> str:
        out = engine("logs", name)
        return out.stdout + out.stderr

    def wait_for_log(self, name: str, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs(name):
                return
            time.sleep(1)
        raise AssertionError(f"{name}: no {text!r} in {timeout} s:\n{self.logs(name)[-3000:]}")

    def remove_all(self) -> None:
        for name in self.names:
            engine("rm", "-f", name)


def start_nodes(pods: Pods, server, spec: dict, tag: str) -> list[str]:
    """Both nodes of `spec`'s job, as the operator starts them; returns the container names (rank order)."""
    containers = pod_containers(spec, {"s3-credentials": dict(server.env)})
    assert len(containers) == 2
    port = free_port()
    return [pods.start(f"barlow-{tag}-{rank}", c, operator_env(spec["cluster"]["backend"], rank, 2, 1, port))
            for rank, c in enumerate(containers)]


def run_two_nodes(pods: Pods, server, spec: dict, tag: str) -> dict:
    names = start_nodes(pods, server, spec, tag)
    codes = [pods.wait(n) for n in names]
    return {"spec": spec, "codes": codes, "logs": [pods.logs(n) for n in names]}
