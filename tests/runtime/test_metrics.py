"""Metrics on a remote output: sync() uploads only what changed since the last sync (against the real S3 server)."""

from __future__ import annotations

import os

from barlow import storage
from barlow.metrics import Metrics


def remote_matches_local(metrics: Metrics, rel: str) -> bool:
    with open(os.path.join(metrics.local, rel), "rb") as f:
        return storage.read_bytes(storage.join(metrics.output_url, rel)) == f.read()


def test_sync_uploads_only_changed_files(s3):
    metrics = Metrics(s3.url, enabled=True, total_steps=10, s3=s3.settings)
    metrics.log(1, {"loss": 3.0})
    first = metrics.sync()
    events = [r for r in first if r.startswith("tensorboard/")]
    assert "metrics.jsonl" in first and len(events) == 1, first
    assert all(remote_matches_local(metrics, r) for r in first)

    assert metrics.sync() == []  # nothing new: nothing uploaded

    with open(os.path.join(metrics.local, "tensorboard", "notes.txt"), "w") as f:
        f.write("an extra file appears")
    assert metrics.sync() == ["tensorboard/notes.txt"]

    metrics.log(2, {"loss": 2.0})
    second = metrics.sync()
    assert set(second) == {"metrics.jsonl", events[0]}, second
    assert all(remote_matches_local(metrics, r) for r in second)
    assert storage.read_bytes(storage.join(s3.url, "metrics.jsonl")).count(b"\n") == 3  # the attempt's start, 2 steps
    metrics.close()


def test_a_line_with_nothing_to_show_is_not_printed(tmp_path, capsys):
    """The final checkpoint's stall has a metrics row of its own; in logs it printed a bare `step 275  epoch 25`."""
    metrics = Metrics(str(tmp_path / "run"), True, total_steps=10)
    try:
        metrics.log(5, {"epoch": 1.0, "checkpoint_stall_s": 0.25})
        metrics.log(10, {"epoch": 2.0, "loss": 12.5})
    finally:
        metrics.close()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 10  epoch 2  loss 12.5"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2  # both rows are kept in the file
