"""What a pretrain checkpoint must match to be resumed, what the run says when it resumes, and the exit codes."""

from __future__ import annotations

import pytest

from barlow import errors
from barlow.distributed import Placement
from barlow.train import check_same_run, resume_note

NOW = {"model": {"arch": "resnet18", "width": 8}, "batch_size": 128, "world_size": 1, "workers": 0, "seed": 7}


@pytest.mark.parametrize("change, accepted", [
    ({}, True),
    ({"world_size": 2, "per_rank_batch": 64}, True),  # another world size, same global batch: resumable
    ({"workers": 4, "seed": 8}, True),
    ({"batch_size": 256}, False),
    ({"model": {"arch": "resnet50", "width": 8}}, False),
    ({"model": None}, False),  # a checkpoint without a run record
])
def test_which_checkpoints_resume(change, accepted):
    saved = {**NOW, **change}
    if accepted:
        check_same_run(saved, NOW, "out/checkpoints/step-00000004")
    else:
        with pytest.raises(errors.OutputHoldsAnotherRun, match="out/checkpoints/step-00000004 holds a run with another"):
            check_same_run(saved, NOW, "out/checkpoints/step-00000004")


@pytest.mark.parametrize("saved, note", [
    (None, ""),
    ({"world_size": 1}, ", resuming at step 12"),
    ({"world_size": 2}, ", resuming at step 12 (world_size 2 -> 1: same global batch and schedule; "),
])
def test_resume_note(saved, note):
    import torch

    place = Placement(0, 1, 0, torch.device("cpu"), None)
    got = resume_note(saved, place, 12)
    assert got.startswith(note) and (note != "" or got == "")


@pytest.mark.parametrize("exc, code", [
    (errors.StoppedOnSignal(15, "step 3"), 143),
    (errors.StoppedOnSignal(2, "step 3"), 130),
    (errors.TooFewImages("x"), errors.EXIT_FAILED),
    (errors.OutputHoldsAnotherRun("x"), 1),
    (errors.WrongPlacement("x"), 1),
])
def test_exit_codes(exc, code):
    assert exc.exit_code == code


def test_entrypoint_keeps_its_exit_code_names():
    from barlow import entrypoint

    assert (entrypoint.EXIT_OK, entrypoint.EXIT_FAILED, entrypoint.EXIT_INVALID_SPEC, entrypoint.EXIT_PEER_LOST) == (0, 1, 2, 144)


@pytest.mark.parametrize("worker_code, code, retryable", [
    (0, 0, False),
    (1, 1, False),
    (2, 2, False),
    (144, 144, True),
    (-6, 134, True),  # SIGABRT: NCCL's watchdog aborted a collective that hung past runtime.collective_timeout_s
    (-9, 137, True),  # SIGKILL: the OOM killer or a node drain
    (-15, 143, True),
])
def test_torchrun_passes_worker_codes_on_with_their_meaning(worker_code, code, retryable):
    from barlow.torchrun import worker_exit_code

    assert worker_exit_code(worker_code) == code
    assert errors.is_retryable(code) is retryable


def test_every_exit_code_is_defined_once_in_errors():
    """The CLI, the restart budget and the follow-up Job use errors' constants, not numbers of their own."""
    from barlow import restarts
    from barlow.cli import cluster, common
    from barlow.launch.kubernetes import build_follow_up
    from barlow.spec import parse_spec

    assert common.EXIT_INVALID is errors.EXIT_INVALID_SPEC and cluster.EXIT_UNREACHABLE is errors.EXIT_UNREACHABLE
    assert restarts.PERMANENT == errors.EXIT_FAILED and errors.EXIT_WATCHDOG_ABORT == 134
    spec = parse_spec({"kind": "pretrain", "name": "p", "data": {"train": "d/train", "val": "d/val"},
                       "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64}, "output": {"url": "s3://b/o"},
                       "cluster": {"image": "registry.example/barlow:1"}})
    rules = build_follow_up(spec).spec.pod_failure_policy.rules
    assert rules[0].on_exit_codes.values == list(errors.FOLLOW_UP_PERMANENT) == [1, 2]
    assert not any(errors.is_retryable(c) for c in errors.FOLLOW_UP_PERMANENT)
