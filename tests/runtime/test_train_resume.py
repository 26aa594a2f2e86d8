"""What a pretrain checkpoint must match to be resumed, what the run says when it resumes, and the exit codes."""

from __future__ import annotations

import signal
import sys

import pytest
import torch

from barlow import errors
from barlow.distributed import Placement
from barlow.evaluate import eval_record
from barlow.spec import parse_spec
from barlow.train import resume_note, run_record, schedule_change

PRETRAIN = {"kind": "pretrain", "name": "p", "data": {"train": "d/train", "val": "d/val", "workers": 0},
            "model": {"arch": "resnet18", "width": 8}, "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 128},
            "runtime": {"seed": 7}, "output": {"url": "out"}}
URL = "out/checkpoints/step-00000004"


def place(world_size: int) -> Placement:
    return Placement(0, world_size, 0, torch.device("cpu"), None)


def saved_record(world_size: int = 1, **change) -> dict:
    return {**run_record(parse_spec(PRETRAIN), place(world_size)).as_dict(), **change}


@pytest.mark.parametrize("saved, refused", [
    (saved_record(), None),
    (saved_record(world_size=2), None),  # another world size, same global batch: resumable
    (saved_record(workers=4, seed=8), None),
    (saved_record(batch_size=256), "(optim.batch_size 256 -> 128)"),
    (saved_record(model={**saved_record()["model"], "arch": "resnet50"}), "(model.arch resnet50 -> resnet18)"),
    ({"world_size": 1}, "model (not recorded) -> "),  # a checkpoint without a run record
])
def test_which_checkpoints_resume(saved, refused):
    record = run_record(parse_spec(PRETRAIN), place(1))
    if refused is None:
        record.check(saved, URL)
    else:
        with pytest.raises(errors.OutputHoldsAnotherRun, match=rf"^output.url: {URL} holds a run with other settings") as e:
            record.check(saved, URL)
        assert refused in str(e.value) and str(e.value).endswith("; use a new output.url")


def test_the_record_keeps_what_is_checked_or_noted_and_nothing_else():
    assert set(saved_record()) == {"model", "batch_size", "world_size", "workers", "seed", "epochs"}


def _replanned(epochs: int, saved_epochs: int | None, step: int, steps_per_epoch: int = 10) -> str:
    from barlow.optim import WarmupCosine

    spec = parse_spec({**PRETRAIN, "optim": {**PRETRAIN["optim"], "epochs": epochs}})
    schedule = WarmupCosine(steps_per_epoch, steps_per_epoch * epochs, 128)
    return schedule_change(spec, None if saved_epochs is None else {"epochs": saved_epochs}, step, steps_per_epoch,
                           schedule)


def test_another_optim_epochs_is_named_with_what_it_does_to_the_lr():
    # a finished 2-epoch run (20 steps, the lr at its floor) continued to 4 epochs: the cosine restarts high
    note = _replanned(4, 2, 20)
    assert note == ("optim.epochs 2 -> 4: the warmup + cosine schedule now ends at step 40, not 20, so the lr at step "
                    "20 is 0.07037, not 0.0001")
    got = resume_note(run_record(parse_spec(PRETRAIN), place(2)), saved_record(1), 20, note)
    assert got == (", resuming at step 20 (world_size 1 -> 2: same global batch; the data order is exact only with the "
                   "same world size, loader workers and seed) (" + note + ")")
    assert _replanned(4, 4, 20) == "" and _replanned(4, None, 20) == ""  # the same, or a checkpoint from before


def test_fewer_optim_epochs_than_the_checkpoint_has_done_are_refused():
    assert _replanned(3, 4, 30).startswith("optim.epochs 4 -> 3: ")  # at the new end: the run finishes
    with pytest.raises(errors.OutputHoldsAnotherRun) as e:
        _replanned(2, 4, 30)
    assert str(e.value) == ("output.url: out holds a run at step 30 (optim.epochs 4), past the end of optim.epochs 2 "
                            "(20 steps): set optim.epochs 4 or more, or use a new output.url")


@pytest.mark.parametrize("saved, note", [
    (None, ""),
    (saved_record(1), ", resuming at step 12"),
    (saved_record(2), ", resuming at step 12 (world_size 2 -> 1: same global batch and schedule; "),
    (saved_record(1, workers=4), ", resuming at step 12 (workers 4 -> 0: "),
])
def test_resume_note(saved, note):
    got = resume_note(run_record(parse_spec(PRETRAIN), place(1)), saved, 12)
    assert got.startswith(note) and (note != "" or got == "")
    assert ("(" in got) == ("->" in note)


def test_an_eval_names_the_eval_field_that_differs():
    spec = parse_spec({**PRETRAIN, "eval": {"epochs": 6}}).eval_spec()
    record = eval_record(spec, place(1))
    with pytest.raises(errors.OutputHoldsAnotherRun, match=r"holds an evaluation with other settings"):
        record.check({**record.as_dict(), "epochs": 9}, URL)
    with pytest.raises(errors.OutputHoldsAnotherRun, match=r"\(eval.epochs 9 -> 6\)"):
        record.check({**record.as_dict(), "epochs": 9}, URL)
    record.check({**record.as_dict(), "world_size": 4, "seed": 3}, URL)


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
    assert errors.child_exit_code(worker_code) == code
    assert errors.is_retryable(code) is retryable


def test_every_exit_code_is_defined_once_in_errors():
    """The CLI, the restart budget and the follow-up Job use errors' constants, not numbers of their own."""
    from barlow import restarts
    from barlow.cli import cluster, common
    from barlow.launch.render import build_follow_up
    from barlow.spec import parse_spec

    assert common.EXIT_INVALID is errors.EXIT_INVALID_SPEC and cluster.EXIT_UNREACHABLE is errors.EXIT_UNREACHABLE
    assert restarts.PERMANENT == errors.EXIT_FAILED and errors.EXIT_WATCHDOG_ABORT == 134
    spec = parse_spec({"kind": "pretrain", "name": "p", "data": {"train": "d/train", "val": "d/val"},
                       "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64}, "output": {"url": "s3://b/o"},
                       "cluster": {"image": "registry.example/barlow:1"}})
    rules = build_follow_up(spec).spec.pod_failure_policy.rules
    assert rules[0].on_exit_codes.values == list(errors.FOLLOW_UP_PERMANENT) == [1, 2]
    assert not any(errors.is_retryable(c) for c in errors.FOLLOW_UP_PERMANENT)


@pytest.mark.parametrize("sig, code", [(signal.SIGABRT, 134), (signal.SIGKILL, 137)])
def test_a_local_run_whose_torchrun_dies_of_a_signal_exits_128_plus_it(monkeypatch, sig, code):
    """`barlow run` exits as a shell would (128 + the signal), not with the negative code wrapped to 250 or 247."""
    from barlow.launch import local

    monkeypatch.setattr(local, "torchrun_command", lambda nproc: [
        sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), {int(sig)})"])
    spec = parse_spec({"kind": "pretrain", "name": "dies", "data": {"train": "/nowhere"}, "output": {"url": "/tmp/x"}})
    assert local.run_local(spec) == code
