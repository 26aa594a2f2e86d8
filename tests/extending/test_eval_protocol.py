"""A toy eval protocol with no head and nothing to train (nearest class mean of the frozen backbone's features):
its own module and its line in EVAL_PROTOCOLS, then a real eval of a tiny pretrained checkpoint with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOY = '''"""eval.mode nearest_mean: each validation image takes the class whose mean train feature is nearest (cosine)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from barlow import distributed
from barlow.evaluate.protocol import EvalProtocol


class NearestClassMean(EvalProtocol):
    def measure(self, val, train, num_classes):
        feats, labels = train
        means = torch.zeros(num_classes, feats.shape[1], device=feats.device)
        means.index_add_(0, labels, F.normalize(feats.float(), dim=1))
        if dist.is_initialized():
            dist.all_reduce(means)
        val_feats, val_labels = val
        nearest = (F.normalize(val_feats.float(), dim=1) @ F.normalize(means, dim=1).T).argmax(dim=1)
        hits, n = distributed.all_sum([(nearest == val_labels).sum(), len(val_labels)], feats.device)
        return {"nearest_mean_top1": 100 * hits / n}


PROTOCOL = NearestClassMean
'''
TINY = {"arch": "resnet18", "projector": "64-64", "small_images": True, "width": 8}
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 230)]  # one class each: the classes a random backbone tells apart


def _colour_folder(root: Path, per_class: int, seed: int) -> None:
    """`root/c<k>/<i>.png`: 16 px images of class k's colour with a little noise."""
    rng = np.random.default_rng(seed)
    for k, colour in enumerate(COLOURS):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{k}" / f"{i}.png")


def _pretrained(out: Path) -> None:
    """An output folder as a pretraining leaves it: a checkpoint whose run record names its model."""
    from barlow import checkpoint
    from barlow.model import BarlowTwins

    torch.manual_seed(0)
    net = BarlowTwins(TINY["arch"], TINY["projector"], TINY["small_images"], TINY["width"])
    checkpoint.save(str(out), 4, {"model": net.state_dict(), "step": 4, "run": {"model": TINY, "batch_size": 8}}, keep=1)


def _registry_file(root: Path) -> str:
    """The file of the copy that defines EVAL_PROTOCOLS (the spec, wherever its package keeps the table)."""
    (path,) = [p for p in (root / "barlow").rglob("*.py") if "\nEVAL_PROTOCOLS = " in p.read_text()]
    return str(path.relative_to(root))


def test_a_protocol_without_a_head_is_its_module_and_one_registration(package_copy, tmp_path):
    package_copy.add_module("barlow/evaluate/nearest_mean.py", TOY)
    package_copy.register(_registry_file(package_copy.root), "EVAL_PROTOCOLS = ",
                          'EVAL_PROTOCOLS["nearest_mean"] = "barlow.evaluate.nearest_mean"')
    package_copy.check_cost()

    data, pretrain, out = tmp_path / "data", tmp_path / "pretrain", tmp_path / "eval"
    _colour_folder(data / "train", 6, seed=0)
    _colour_folder(data / "val", 3, seed=1)
    _pretrained(pretrain)
    spec = {"kind": "eval", "name": "toy", "data": {"train": str(data / "train"), "val": str(data / "val"),
                                                    "image_size": 16, "workers": 0},
            "runtime": {"device": "cpu", "seed": 1}, "output": {"url": str(out)},
            "eval": {"mode": "nearest_mean", "checkpoint": str(pretrain), "batch_size": 6, "knn_k": 3}}
    done = package_copy.run("import json, sys, torch\n"
                            "torch.set_num_threads(1)\n"
                            "from barlow.evaluate import evaluate\n"
                            "from barlow.spec import parse_spec\n"
                            f"evaluate(parse_spec(json.loads({json.dumps(json.dumps(spec))})))\n", timeout=120)

    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "nearest_mean" and results["val_images"] == 9
    assert results["nearest_mean_top1"] == 100.0  # three colours: the class means of any backbone's features part them
    assert 0.0 <= results["knn_top1"] <= 100.0  # the loop's kNN, measured beside the protocol's result
    assert "nothing to train" in done.stdout
    assert not (out / "checkpoints").exists()  # no head, no optimizer, no epochs: nothing to checkpoint
