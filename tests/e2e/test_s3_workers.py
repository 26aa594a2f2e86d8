"""A healthy pretrain from and to S3 with loader workers leaves logs without a traceback or a warning. An s3fs
filesystem made in the training process crossed the fork into each loader worker and was finalized there,
closing the parent's aiobotocore session on the worker's event loop ("Task exception was never retrieved ...
RuntimeError: ... attached to a different loop"); barlow.storage now disowns such sessions in a forked child."""

from __future__ import annotations

import pytest
from runner import barlow, tiny_spec, write_spec

from barlow import checkpoint, storage

pytestmark = pytest.mark.slow


def test_s3_run_with_loader_workers_logs_no_traceback(demo_data, s3, tmp_path):
    data = f"{s3.url}/data"
    for split in ("train", "val"):
        made = barlow("data", "shard", str(demo_data / split), f"{data}/{split}", "--shard-size-mb", "1",
                      "--endpoint-url", s3.server.endpoint_url)
        assert made.returncode == 0, made.stderr[-2000:]
    out = f"{s3.url}/run"
    spec = tiny_spec(demo_data, out, **{"optim.epochs": 2, "data.workers": 2, "runtime.nproc_per_node": 1})
    spec["data"].update(format="shards", train=f"{data}/train/index.json", val=f"{data}/val/index.json",
                        shuffle_buffer=200, s3={"endpoint_url": s3.server.endpoint_url, "retries": 10})
    result = barlow("run", "pretrain", str(write_spec(tmp_path, spec)))
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-3000:]
    assert checkpoint.latest(out) and storage.exists(f"{out}/backbone.pt")
    for bad in ("Traceback", "Warning", "never retrieved", "different loop"):
        assert bad not in logs, logs[-4000:]
