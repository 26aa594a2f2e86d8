"""A toy training monitor, added as a contributor would: its own module in barlow/monitors/ and its line after
barlow.spec.MONITORS, nothing else. A tiny pretraining run from the package copy then logs its key to metrics.jsonl
and shows it on the printed progress line, and `barlow status` of the output folder shows it too."""

from __future__ import annotations

import json

TOY = '''"""A toy label-free monitor: the mean L2 norm of view 1's backbone features, every 2 steps."""

from __future__ import annotations

import torch

from barlow.monitors import Monitor

EVERY = 2


def build(spec, proc, source, model):
    return MeanNorm(proc.place.device)


class MeanNorm(Monitor):
    name, KEYS, observes = "mean_norm", ("mean_feature_norm",), True

    def __init__(self, device):
        self.total, self.rows = torch.zeros((), device=device), torch.zeros((), device=device)

    def describe(self):
        return f"mean feature norm every {EVERY} steps"

    def observe(self, features, labels):
        self.total += features.float().norm(dim=1).sum()  # device work only
        self.rows += len(features)

    def due(self, step, steps_per_epoch, total_steps):
        return step % EVERY == 0

    def measure(self, model):
        mean = float(self.total / self.rows)  # sync: when due
        self.total.zero_()
        self.rows.zero_()
        return {"mean_feature_norm": mean}
'''

RUN = '''
import json
from barlow.data.demo import write_demo
from barlow.spec import parse_spec
from barlow.train import pretrain

spec = json.loads({spec!r})
write_demo(spec["data"]["train"].rsplit("/", 1)[0], size=16)
pretrain(parse_spec(spec))

from barlow.status import runfiles  # what `barlow status` shows of the output folder
print("status:", json.dumps(dict(runfiles.lines(runfiles.read(spec["output"]["url"])))))
'''


def test_a_toy_monitor_is_its_module_and_one_line(package_copy, tmp_path):
    registry = next(p for p in sorted((package_copy.root / "barlow").rglob("*.py")) if "MONITORS = (" in p.read_text())
    package_copy.add_module("barlow/monitors/meannorm.py", TOY)
    package_copy.register(str(registry.relative_to(package_copy.root)), after="MONITORS = (",
                          line='MONITORS += ("barlow.monitors.meannorm",)')
    package_copy.check_cost()

    demo, out = tmp_path / "demo", tmp_path / "out"
    spec = {"kind": "pretrain", "name": "toy",
            "data": {"train": str(demo / "train"), "val": str(demo / "val"), "image_size": 16, "workers": 0},
            "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "64-64"},
            "optim": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
            "runtime": {"device": "cpu", "log_every": 5, "seed": 7},
            "monitor": {"knn_every_epochs": 0, "rank_every_epochs": 0},
            "output": {"url": str(out), "checkpoint_every": 1000}}
    done = package_copy.run(RUN.format(spec=json.dumps(spec)))

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    norms = {r["step"]: r["mean_feature_norm"] for r in rows if "mean_feature_norm" in r}
    assert sorted(norms) == [2, 4, 6, 8, 10], rows  # 1433 images, 128 a batch: 11 steps, measured every 2
    assert all(v > 0 for v in norms.values()), norms
    printed = [line for line in done.stdout.splitlines() if line.startswith("step ") and "mean_feature_norm " in line]
    assert [line.split()[1] for line in printed] == ["2", "4", "6", "8", "10"], done.stdout
    assert "monitor: online probe on 10 classes, mean feature norm every 2 steps" in done.stdout, done.stdout
    status = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("status: "))[len("status: "):])
    assert status["mean_feature_norm"] == f"{norms[10]:.4g}", status  # the latest, as status writes a number
