"""A new data format is its source module plus its line in DATA_FORMATS: the toy reads a CSV of `path,class` lines
(paths relative to the CSV's folder), and a fresh process that imports the copy counts it as `barlow plan` does and
pretrains on it for two epochs, ending with a checkpoint."""

from __future__ import annotations

import json

import yaml
from imagesets import write_jpeg_folder

TOY = "listfile"
ANCHOR = '"imagefolder": "barlow.data.imagefolder"'  # the built-in format's entry in the formats table

SOURCE_MODULE = '''"""data.format listfile (a toy): data.train is a CSV of `path,class` lines, paths relative to its folder."""

from barlow import storage
from barlow.data import register_format
from barlow.data.imagefolder import ImageFolderSource
from barlow.data.source import PersistentLoader


@register_format("listfile")
class ListFileSource(ImageFolderSource):
    """An image folder whose listing is a file: the loader, subsets and resume are the folder's."""

    def __init__(self, url, data, cache=None, keep=False):
        self.url, self.data = url, data
        self.s3 = storage.S3Settings(**data.s3.model_dump())
        rows = [line.split(",") for line in storage.read_text(url, self.s3).splitlines() if line.strip()]
        self.classes = sorted({name for _, name in rows})
        folder = url.rsplit("/", 1)[0]
        self.files = [(storage.join(folder, path), self.classes.index(name)) for path, name in rows]
        self.keys = [f"{name}/{path.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" for path, name in rows]
        self.num_samples = len(self.files)
        self._loader = PersistentLoader()

    def describe(self):
        return f"{self.num_samples} images listed in {self.url.rsplit('/', 1)[-1]}, {len(self.classes)} classes"
'''

CHECK = '''
import json, subprocess, sys
import barlow
from barlow.data import summarize
from barlow.spec import load_spec

spec = load_spec("spec.yaml")
summary = summarize(spec.data)
run = subprocess.run([sys.executable, "-m", "barlow.cli", "run", "pretrain", "spec.yaml"], capture_output=True, text=True)
print(json.dumps({"package": barlow.__file__, "images": summary.images, "classes": summary.classes, "text": summary.text,
                  "rc": run.returncode, "out": run.stdout + run.stderr}))
'''


def _list_file(root, split: str, n: int, seed: int) -> str:
    """JPEGs under root/<split>/ and their CSV at root/<split>.csv (the layout says nothing: the file names the class)."""
    write_jpeg_folder(root / split, n, classes=2, seed=seed)
    files = sorted((root / split).rglob("*.jpg"))
    lines = [f"{p.relative_to(root)},{'cat' if p.parent.name == 'class_1' else 'dog'}" for p in files]
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return str(root / f"{split}.csv")


def test_a_toy_format_is_its_module_and_its_line_in_the_table(package_copy, tmp_path):
    package_copy.add_module(f"barlow/data/{TOY}.py", SOURCE_MODULE)
    (table,) = [p for p in (package_copy.root / "barlow").rglob("*.py") if ANCHOR in p.read_text()]
    anchor = next(line for line in table.read_text().splitlines() if ANCHOR in line)
    package_copy.register(str(table.relative_to(package_copy.root)), ANCHOR,
                          " " * (len(anchor) - len(anchor.lstrip())) + f'"{TOY}": "barlow.data.{TOY}",')
    package_copy.check_cost()
    spec = {
        "kind": "pretrain", "name": "toy-format",
        "data": {"format": TOY, "train": _list_file(tmp_path, "train", 48, 0), "val": _list_file(tmp_path, "val", 12, 1),
                 "image_size": 16, "workers": 0},
        "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "64-64-64"},
        "optim": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1},
        "runtime": {"nproc_per_node": 1, "device": "cpu", "log_every": 1, "seed": 7},
        "output": {"url": str(tmp_path / "out"), "checkpoint_every": 3},
    }
    (package_copy.root / "spec.yaml").write_text(yaml.safe_dump(spec))

    found = json.loads(package_copy.run(CHECK, timeout=600).stdout.splitlines()[-1])

    assert found["package"].startswith(str(package_copy.root))  # the copy ran, not the installed package
    assert (found["images"], found["classes"], found["text"]) == (48, 2, "48 images listed in train.csv, 2 classes")
    assert found["rc"] == 0, found["out"][-3000:]
    assert "48 images listed in train.csv" in found["out"]  # the run names its data as the toy describes it
    done = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert done and done[-1].endswith("6"), done  # 2 epochs of 3 steps: the final checkpoint is step 6
