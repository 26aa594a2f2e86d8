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


@pytest.mark.parametrize("change, named", [
    ({"batch_size": 256}, "another optim.batch_size (256 there, 128 here); use a new output.url"),
    ({"model": {"arch": "resnet50", "width": 8}}, "another model.arch ('resnet50' there, 'resnet18' here); use"),
    ({"model": {"arch": "resnet18", "width": 16}, "batch_size": 64},
     "another model.width (16 there, 8 here), optim.batch_size (64 there, 128 here); use"),
    ({"model": None}, "another model.arch (None there, 'resnet18' here), model.width (None there, 8 here); use"),
])
def test_another_run_names_the_fields_that_differ(change, named):
    with pytest.raises(errors.OutputHoldsAnotherRun) as info:
        check_same_run({**NOW, **change}, NOW, "out/checkpoints/step-00000004")
    assert str(info.value).startswith(f"output.url: out/checkpoints/step-00000004 holds a run with {named}")
    assert str(info.value).endswith("use a new output.url")


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
