"""The training image runs the rendered pods' own commands as the cluster does (see containers.py): a TrainJob's two
nodes finish a pretrain; a PyTorchJob's stopped node checkpoints and exits 143, and both resume and finish; a node
waiting for peers that never come stops at once on SIGTERM; a bad spec is one `error` line and exit 2."""

from __future__ import annotations

import re
import time

import pytest
from containers import engine, free_port, operator_env, pod_containers, run_spec, run_two_nodes, start_nodes

from barlow import checkpoint, storage
from barlow.errors import EXIT_INVALID_SPEC, is_retryable

pytestmark = pytest.mark.slow


def total_steps(log: str) -> int:
    per_epoch, epochs = re.search(r"(\d+) steps/epoch × (\d+) epochs", log).groups()
    return int(per_epoch) * int(epochs)


def step_of(url: str | None) -> int:
    assert url, "no complete checkpoint"
    return int(re.findall(r"\d+", url.rstrip("/").rsplit("/", 1)[-1])[-1])


def test_two_nodes_finish_a_pretrain(s3, finished_run):  # s3: this process reads the run's files too
    """The TrainJob's pods (the PyTorchJob's finish theirs in the resume test below)."""
    check_finished(finished_run["spec"], finished_run["codes"], finished_run["logs"])


def check_finished(spec: dict, codes: list[int], logs: list[str]) -> None:
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert "Traceback" not in log and "never retrieved" not in log, log[-4000:]
    out = spec["output"]["url"]
    total = total_steps(logs[0])
    assert f"step {total} " in logs[0]  # every step ran (log_every divides the total here)
    assert step_of(checkpoint.latest(out)) == total
    assert storage.exists(f"{out}/backbone.pt")


@pytest.mark.parametrize("workers", [0, 2])  # 2: the stop signal reaches the loader workers too (issue 21)
def test_a_stopped_node_checkpoints_and_both_resume(pods, s3, demo_on_s3, workers):
    spec = run_spec(s3.server, demo_on_s3, f"stop-{workers}", "pytorchjob", **{"data.workers": workers})
    names = start_nodes(pods, s3.server, spec, f"stop{workers}")
    pods.wait_for_log(names[0], "step 6 ")  # node 0 logs the steps
    assert engine("stop", "--time", "100", names[1], timeout=130).returncode == 0  # SIGTERM, as a deleted pod gets
    stopped = pods.wait(names[1], timeout=60)
    peer = pods.wait(names[0], timeout=180)
    logs = [pods.logs(n) for n in names]
    assert stopped == 143, logs[1][-3000:]
    assert is_retryable(peer), logs[0][-3000:]  # the master sees its peer go (or was stopped along): retryable
    out = spec["output"]["url"]
    at = step_of(checkpoint.latest(out))
    assert 6 <= at < total_steps(logs[0])

    run = run_two_nodes(pods, s3.server, spec, f"stop{workers}-again")  # ExitCode restarts both pods
    check_finished(spec, run["codes"], run["logs"])
    assert f"resuming at step {at}" in run["logs"][0], run["logs"][0][-2000:]  # node 0 logs for both


def test_a_node_waiting_for_its_peers_stops_at_once(pods, s3, demo_on_s3):
    """Node 1 alone: the master never comes. Its command is the container's PID 1; SIGTERM must end it within
    seconds, with a code that lets the pod be restarted."""
    spec = run_spec(s3.server, demo_on_s3, "alone", "trainjob")
    container = pod_containers(spec, {"s3-credentials": dict(s3.server.env)})[1]
    name = pods.start("barlow-alone-1", container, operator_env("trainjob", 1, 2, 1, free_port()))
    time.sleep(8)  # torchrun is in its rendezvous by now
    assert engine("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true", pods.logs(name)
    start = time.monotonic()
    assert engine("stop", "--time", "60", name, timeout=90).returncode == 0
    took = time.monotonic() - start
    code = pods.wait(name)
    # 143: it stopped on the SIGTERM itself; sitting out the 60 s grace would end in SIGKILL, 137
    assert code == 143 and is_retryable(code) and took < 20, (took, code, pods.logs(name)[-2000:])


def test_a_bad_spec_is_one_error_line_and_exit_2(pods, s3, demo_on_s3):
    spec = run_spec(s3.server, demo_on_s3, "bad", "trainjob")
    container = pod_containers(spec, {"s3-credentials": dict(s3.server.env)})[0]
    container.env["BARLOW_SPEC"] += "epocs: 2\n"
    env = {**operator_env("trainjob", 0, 1, 1, free_port()), "PET_NNODES": "1"}
    name = pods.start("barlow-bad-0", container, env)
    code = pods.wait(name)
    log = pods.logs(name)
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert code == EXIT_INVALID_SPEC and len(errors) == 1 and "epocs" in errors[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
