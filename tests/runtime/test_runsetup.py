"""The scaffolding pretrain and eval share, across two real gloo processes: the sharded kNN equals one process's,
the stop signal is agreed on, and each images/s rate belongs to its own interval."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from barlow import runsetup
from barlow.distributed import Placement
from barlow.knn import knn_correct, knn_top1
from barlow.storage import S3Settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # real processes


def _spawn(fn, tmp_path, *args, world: int = 2) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes (a file rendezvous under tmp_path)."""
    mp.start_processes(_join, args=(fn, world, str(tmp_path / "rendezvous"), *args), nprocs=world, start_method="spawn")


def _join(rank: int, fn, world: int, rendezvous: str, *args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _features(n_train: int, n_val: int, dim: int, classes: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g)
    train_labels = torch.randint(classes, (n_train,), generator=g)
    val_labels = torch.randint(classes, (n_val,), generator=g)
    train = (centres[train_labels] + 1.5 * torch.randn(n_train, dim, generator=g)).to(dtype)
    val = (centres[val_labels] + 1.5 * torch.randn(n_val, dim, generator=g)).to(dtype)
    return train, train_labels, val, val_labels


# Uneven shards: rank 0 holds more train rows and fewer val rows than rank 1, and k exceeds one shard's rows.
KNN_CASES = [
    ("float32", torch.float32, 300, 200, 20, [250, 50], [60, 140]),
    ("bf16", torch.bfloat16, 300, 200, 20, [100, 200], [200, 0]),
    ("k-beyond-a-shard", torch.float32, 40, 50, 30, [10, 30], [25, 25]),
]


def _knn_ranks(rank: int, world: int, out: str) -> None:
    results = {}
    for name, dtype, n_train, n_val, k, train_split, val_split in KNN_CASES:
        train, train_labels, val, val_labels = _features(n_train, n_val, 16, 7, dtype)
        t0, v0 = sum(train_split[:rank]), sum(val_split[:rank])
        mine = (train[t0:t0 + train_split[rank]], train_labels[t0:t0 + train_split[rank]],
                val[v0:v0 + val_split[rank]], val_labels[v0:v0 + val_split[rank]])
        results[name] = {"hits": knn_correct(*mine, k=k, num_classes=7, chunk=32),
                         "top1": knn_top1(*mine, k=k, num_classes=7)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def sharded_knn(tmp_path_factory):
    """Every case's per-rank results of two gloo processes (one spawn for all cases: spawning is slow)."""
    tmp = tmp_path_factory.mktemp("knn")
    _spawn(_knn_ranks, tmp, str(tmp / "knn"))
    return [json.load(open(tmp / f"knn.{r}")) for r in range(2)]


@pytest.mark.parametrize("name, dtype, n_train, n_val, k", [c[:5] for c in KNN_CASES], ids=[c[0] for c in KNN_CASES])
def test_sharded_knn_equals_one_process(sharded_knn, name, dtype, n_train, n_val, k):
    train, train_labels, val, val_labels = _features(n_train, n_val, 16, 7, dtype)
    alone = knn_correct(train, train_labels, val, val_labels, k=k, num_classes=7)
    assert 0.3 * n_val < alone < n_val  # the clusters are learnable, not trivial: a wrong merge would show
    ranks = [r[name] for r in sharded_knn]
    assert sum(r["hits"] for r in ranks) == alone
    assert ranks[0]["top1"] == ranks[1]["top1"] == pytest.approx(100 * alone / n_val)


SLOW_S = 0.8


def _loop_ranks(rank: int, world: int, out: str) -> None:
    """The agreed stop, then two log intervals of two steps each, rank 1 slow in the first interval's last step."""
    place = Placement(rank, world, 0, torch.device("cpu"), None)
    got = [runsetup.agreed_stop(lambda: None, place),  # nobody was signalled
           runsetup.agreed_stop(lambda: signal.SIGINT if rank == 1 else None, place)]  # only rank 1 was
    with open(f"{out}/stop.{rank}", "w") as f:
        json.dump(got, f)
    _log_intervals(rank, place, out)


def _log_intervals(rank: int, place: Placement, out: str) -> None:
    from barlow.checkpoint import Checkpointer
    from barlow.loss import BarlowTwinsLoss
    from barlow.metrics import Metrics
    from barlow.train import Interval, Run, log_step

    loss_fn = BarlowTwinsLoss(0.005)
    loss = loss_fn(torch.randn(8, 4), torch.randn(8, 4))
    model = torch.nn.Linear(2, 2)
    metrics = Metrics(out, enabled=rank == 0, total_steps=4)
    run = Run(spec=None, place=place, s3=None, source=None, steps_per_epoch=4, total_steps=4, model=model,
              forward=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), schedule=None, loss_fn=loss_fn,
              autocast=None, position=None, metrics=metrics,
              checkpointer=Checkpointer(out, every=None, keep=1, is_main=rank == 0, parts={}, run={}))  # no saves: no stall
    dist.barrier()  # both ranks start the first interval together
    interval = Interval(batch_size=64)
    corrupt = torch.zeros((), dtype=torch.float64)
    for step in (1, 2, 3, 4):
        if rank == 1 and step == 2:
            time.sleep(SLOW_S)  # a slow last step of the first interval: rank 0 meets it in the log step's sync
        interval.steps += 1
        if step % 2 == 0:
            log_step(run, step, loss.detach(), corrupt, interval)
    metrics.close()


@pytest.fixture(scope="module")
def two_rank_loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    _spawn(_loop_ranks, out, str(out))
    return out


def test_every_rank_stops_when_one_is_signalled(two_rank_loop):
    got = [json.load(open(two_rank_loop / f"stop.{r}")) for r in range(2)]
    assert got == [[None, signal.SIGTERM], [None, signal.SIGINT]]


def test_each_images_per_s_belongs_to_its_interval(two_rank_loop):
    rows = [json.loads(line) for line in (two_rank_loop / "metrics.jsonl").read_text().splitlines()]
    first, second = (r["images_per_s"] for r in rows if "images_per_s" in r)  # not the attempt's start line
    assert first <= 2 * 64 / (0.95 * SLOW_S), "the first interval's rate does not include its slow step"
    assert second > 3 * first, "the second interval's rate carries the first one's slow step"


def test_s3_settings_are_built_from_the_spec():
    from barlow.spec import parse_spec

    spec = parse_spec({"kind": "pretrain", "name": "p", "data": {"train": "d/train", "s3": {
        "endpoint_url": "http://minio:9000", "region": "eu-1", "addressing_style": "path", "retries": 4}},
        "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64}, "output": {"url": "s3://b/o"}})
    s3 = S3Settings.of_spec(spec)
    assert (s3.endpoint_url, s3.region, s3.addressing_style, s3.attempts) == ("http://minio:9000", "eu-1", "path", 4)
