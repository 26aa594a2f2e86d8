"""A new cluster backend is its module in barlow/launch/ plus its line in the backends table (cluster.backend value ->
module): the toy renders a spec as a plain batch/v1 Indexed Job, one pod per node, and a fresh process that imports
the copy validates a spec with `cluster.backend: batchjob`, renders it with `barlow render`, and offers it to every
cluster command's --backend."""

from __future__ import annotations

import json
import textwrap

import yaml

TOY = "batchjob"
ANCHOR = '"trainjob": "barlow.launch.trainjob"'  # the built-in backend's entry in the backends table

BACKEND_MODULE = textwrap.dedent('''
    """The `batchjob` backend (a toy): a run spec as a batch/v1 Indexed Job, one pod per node."""

    from __future__ import annotations

    from typing import Any

    from kubernetes import client as k8s

    from barlow.launch.backend import Backend, condition_phase, counts, register
    from barlow.launch.manifest import (ANNOTATION_OUTPUT, COMMAND, RenderError, image, job_labels, job_name,
                                        pod_labels, quantities, security, to_dict, training_env)
    from barlow.spec import RunSpec

    CONTAINER = "train"
    JOB_NAME, COMPLETION_INDEX = "batch.kubernetes.io/job-name", "batch.kubernetes.io/job-completion-index"


    def build(spec: RunSpec) -> dict[str, Any]:
        c, nodes = spec.cluster, spec.runtime.nodes
        pod_security, container_security = security()
        container = k8s.V1Container(name=CONTAINER, image=image(spec), command=COMMAND, env=training_env(spec),
                                    resources=k8s.V1ResourceRequirements(requests=quantities(spec),
                                                                         limits=quantities(spec)),
                                    security_context=container_security)
        pod = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=pod_labels(spec)),
                                    spec=k8s.V1PodSpec(containers=[container], restart_policy="Never",
                                                       security_context=pod_security))
        return to_dict(k8s.V1Job(
            api_version="batch/v1", kind="Job",
            metadata=k8s.V1ObjectMeta(name=job_name(spec), namespace=c.namespace, labels=job_labels(spec),
                                      annotations={ANNOTATION_OUTPUT: spec.output.url}),
            spec=k8s.V1JobSpec(completion_mode="Indexed", completions=nodes, parallelism=nodes, template=pod)))


    def pod_selector(name: str, replica: str) -> str:
        kind, _, number = replica.partition("-")
        if replica != "master" and not (kind == "node" and number.isdigit()):
            raise RenderError(f"--replica must be master or node-N for a batchjob, not '{replica}'")
        return f"{JOB_NAME}={name},{COMPLETION_INDEX}={0 if replica == 'master' else int(number)}"


    def phase(obj: dict[str, Any]) -> tuple[str, str]:
        return condition_phase(obj, "Complete") or ("Running" if (obj.get("status") or {}).get("active") else "Pending", "")


    BACKEND = register(Backend(
        name="batchjob", group="batch", version="v1", plural="jobs", kind="Job", container=CONTAINER, build=build,
        pod_selector=pod_selector, phase=phase, replicas=lambda status: {"pods": counts(status)}, succeeded="Complete",
        installs="nothing (batch/v1 is built in)"))
''')

SPEC = {
    "kind": "pretrain", "name": "toy-run",
    "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
    "output": {"url": "s3://bucket/runs/toy-run"},
    "runtime": {"nodes": 3, "nproc_per_node": 2},
    "optim": {"batch_size": 96, "epochs": 4, "warmup_epochs": 1},
    "cluster": {"backend": TOY, "gpus_per_node": 2, "image": "registry.example.com/barlow:0.1.0"},
}

CHECK = textwrap.dedent('''
    import contextlib, io, json, sys
    import barlow
    from barlow.cli import main
    from barlow.cli.cluster import BackendName
    from barlow.launch import backend

    def barlow_cli(*args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            sys.argv = ["barlow", *args]
            try:
                main()
            except SystemExit as e:
                assert not e.code, f"barlow {' '.join(args)} exited {e.code}"
        return out.getvalue()

    b = backend.get("batchjob")
    print(json.dumps({"package": barlow.__file__, "api_version": b.api_version, "what": b.what,
                      "selector": b.pod_selector("toy-run", "node-2"),
                      "validated": barlow_cli("validate", "spec.yaml"),
                      "rendered": barlow_cli("render", "pretrain", "spec.yaml"),
                      "cli_backends": [b.value for b in BackendName]}))
''')


def _backends_table(package_copy) -> str:
    """The file of the package copy that holds the backends table (found by its entry, wherever the spec lives)."""
    found = [p for p in (package_copy.root / "barlow").rglob("*.py") if ANCHOR in p.read_text()]
    assert len(found) == 1, f"the backends table's entry {ANCHOR} is in {found}, not in one file"
    return str(found[0].relative_to(package_copy.root))


def test_a_toy_backend_is_its_module_and_its_line_in_the_table(package_copy):
    package_copy.add_module(f"barlow/launch/{TOY}.py", BACKEND_MODULE)
    table = _backends_table(package_copy)
    anchor = next(line for line in (package_copy.root / table).read_text().splitlines() if ANCHOR in line)
    entry, code = f'"{TOY}": "barlow.launch.{TOY}"', anchor.split("#")[0].rstrip()
    if code.endswith(","):  # one entry a line: the toy's is one more
        package_copy.register(table, ANCHOR, " " * (len(anchor) - len(anchor.lstrip())) + entry + ",")
    else:  # the table on one line (`NAME = {...}`): the toy's entry is set after it
        assert "=" in code and code.endswith("}"), f"no place for an entry after: {anchor}"
        package_copy.register(table, ANCHOR, f"{code.split('=')[0].strip()}[{entry.replace(': ', '] = ', 1)}")
    package_copy.check_cost()
    (package_copy.root / "spec.yaml").write_text(yaml.safe_dump(SPEC))

    found = json.loads(package_copy.run(CHECK).stdout.splitlines()[-1])

    assert found["package"].startswith(str(package_copy.root))  # the copy ran, not the installed package
    assert (found["api_version"], found["what"]) == ("batch/v1", "job")
    assert found["selector"] == "batch.kubernetes.io/job-name=toy-run,batch.kubernetes.io/job-completion-index=2"
    assert yaml.safe_load(found["validated"])["cluster"]["backend"] == TOY
    policy, job = yaml.safe_load_all(found["rendered"])
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("batch/v1", "Job", "toy-run")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 3, 3)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == SPEC["cluster"]["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # the job's NetworkPolicy, rendered by barlow and not by the toy, admits the toy's pods to each other
    peers = policy["spec"]["podSelector"]["matchLabels"]
    assert peers.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert found["cli_backends"] == ["pytorchjob", "trainjob", TOY]  # every cluster command's --backend follows the table
