"""Resume reads the checkpoint once: the main rank loads it from storage and the others receive it over the process
group (gloo ranks here, as on the CPU), so N ranks pull one checkpoint's bytes from S3, and each rank ends with the
weights a load of its own would give."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from s3server import SlowDownProxy

from barlow import checkpoint, storage


def _parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.BatchNorm1d(600))  # 1.4 MB of weights and buffers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 600)).sum().backward()
    optimizer.step()  # a momentum buffer to carry over
    return {"model": model, "optimizer": optimizer}


def _rank_main(rank: int, world: int, port: int, out: str, endpoint: str, results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fresh = _parts(seed=100 + rank)  # every rank starts from other weights
        reader = checkpoint.Checkpointer(out, every=1, keep=1, is_main=rank == 0, parts=fresh, run={"world_size": world},
                                         s3=storage.S3Settings(endpoint_url=endpoint, retries=3))
        step = reader.resume()
        torch.save({"step": step, "run": reader.resumed_run, "model": fresh["model"].state_dict(),
                    "optimizer": fresh["optimizer"].state_dict()}, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_resuming_from_s3_read_one_checkpoint(s3, tmp_path, world):
    out = f"{s3.url}/run"
    saved = _parts(seed=1)
    checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts=saved, run={"world_size": 1},
                            s3=s3.settings).save(7, wait=True)
    url = checkpoint.latest(out, s3.settings)
    size = storage.size(storage.join(url, "state.pt"), s3.settings)
    today = checkpoint.load(url, s3.settings)  # what every rank read for itself before

    with SlowDownProxy(int(s3.server.endpoint_url.rsplit(":", 1)[1])) as proxy:
        ctx = mp.spawn(_rank_main, args=(world, free_port(), out, proxy.url, str(tmp_path)), nprocs=world, join=False)
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {world} ranks did not resume in 240 s")
    read = proxy.sent.get("GET", 0)
    assert size <= read < 1.2 * size, f"{world} ranks read {read} bytes for a checkpoint of {size}"
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["step"] == 7 and got["run"] == {"world_size": 1}
        _assert_equal(got["model"], today["model"])
        _assert_equal(got["optimizer"], today["optimizer"])


class TwoParts(torch.nn.Module):
    """A stand-in for BarlowTwins: a backbone and a projector much larger than it, as at the paper's size."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(100, 100)
        self.projector = torch.nn.Linear(100, 4000)


@pytest.mark.parametrize("layout", ["with its backbone", "from before checkpoints had one"])
def test_an_eval_of_a_checkpoint_reads_only_its_backbone(s3, layout):
    from barlow.evaluate import backbone_state
    from barlow.train import backbone_of

    out, model = f"{s3.url}/run", TwoParts()
    exports = {"backbone.pt": backbone_of} if layout == "with its backbone" else {}
    checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts={"model": model}, run={}, s3=s3.settings,
                            exports=exports).save(3, wait=True)
    state_size = storage.size(storage.join(checkpoint.latest(out, s3.settings), "state.pt"), s3.settings)
    with SlowDownProxy(int(s3.server.endpoint_url.rsplit(":", 1)[1])) as proxy:
        got = backbone_state(out, is_export=False, s3=storage.S3Settings(endpoint_url=proxy.url, retries=3))
    assert got.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.backbone.state_dict().items())
    read = proxy.sent.get("GET", 0)
    if exports:
        assert read < state_size / 10, f"read {read} bytes for a backbone of a {state_size}-byte checkpoint"
    else:
        assert read >= state_size
