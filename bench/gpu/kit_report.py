"""report.md of the GPU check kit, from whatever its parts have left in OUT so far (bench/gpu.sh calls it after every
part, so a part stopped at its time limit, or a kit killed from outside, leaves the parts before it reported).

    python bench/gpu/kit_report.py OUT DRY START    # DRY: 1 for a dry run; START: the kit's start (Unix seconds)

Reads OUT/parts.tsv (name, exit code, seconds, limit), preflight.md, tests.xml and tests-compile.xml (JUnit; where
pytest was stopped before writing one, its verbose log tests.log / compile-tests.log),
gpu-bench.json / gpu-bench-compile.json (bench/gpu/gpu.py), views.log (bench/views.py); writes OUT/report.md whole
(a temporary file renamed over it). Standard library only: it runs where a part's imports failed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SYNC_TEST = "test_train_steps_between_log_steps_do_not_sync"


def parts(out: Path) -> list[dict]:
    rows = []
    path = out / "parts.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, secs, limit = (line.split("\t") + ["", "", ""])[:4]
        rows.append({"name": name, "rc": rc, "seconds": secs, "limit": limit})
    return rows


def part_result(rc: str) -> str:
    if rc == "skipped":
        return "skipped: the kit's time budget was spent"
    if rc in ("0", "5"):
        return "passed" if rc == "0" else "passed (nothing collected)"
    if rc in ("124", "137"):
        return "stopped at its time limit"
    return f"failed (exit {rc})"


def junit(path: Path) -> list[tuple[str, str, str]]:
    """(test id, outcome, first line of the message) per test case."""
    if not path.exists():
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return []
    out = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "").strip().splitlines()[:1]
                message = message[0][:200] if message else ""
                break
        out.append((name, outcome, message))
    return out


VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def tests_of(xml: Path, log: Path) -> list[tuple[str, str, str]]:
    """The JUnit file's cases; where pytest was stopped before writing it, the tests its verbose log shows finished."""
    if xml.exists():
        return junit(xml)
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        m = VERBOSE_LINE.match(line)
        if m:
            outcome = {"PASSED": "passed", "SKIPPED": "skipped"}.get(m.group(2), m.group(2))
            out.append((m.group(1), outcome, "from the log: the part was stopped before its summary"))
    return out


def bench_rows(path: Path) -> tuple[dict, list[dict]]:
    if not path.exists():
        return {}, []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}, []
    return data.get("meta", {}), data.get("rows", [])


VIEWS_ROW = re.compile(r"^\|\s*[^|]+\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d,]+)\s*views/s\s*\|")


def views_rates(path: Path) -> dict[str, float]:
    """bench/views.py's GPU rows: label -> views/s."""
    rates = {}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = VIEWS_ROW.match(line.strip())
        if m:
            rates[m.group(1)] = float(m.group(4).replace(",", ""))
    return rates


def milestones(dry: bool, bench: list[dict], views: dict[str, float], tests: list[tuple[str, str, str]]) -> list[str]:
    """Issue 16's first milestones on one H100/H200, each with what this run measured."""
    def row(mode: str, config: str = "reference") -> dict | None:
        return next((r for r in bench if r.get("mode") == mode and r.get("config") == config and "pairs_per_s" in r), None)

    def verdict(value: float | None, target: float) -> str:
        if value is None:
            return "not measured"
        return "dry run: not a measurement" if dry else ("met" if value >= target else "NOT met")

    ref, shards = row("synthetic"), row("shards")
    pairs = ref["pairs_per_s"] if ref else None
    fed = shards["pairs_per_s"] / pairs if shards and pairs else None
    both = next((v for k, v in views.items() if k.startswith("both views only") and "linear" not in k), None)
    decode = views.get("decode + both views")
    decode_images = decode / 2 if decode is not None else None  # two views per decoded image
    sync = next(((o, m) for n, o, m in tests if n.endswith(SYNC_TEST)), None)
    sync_text = "not run" if sync is None else {"passed": "0 (sync debug mode raised nothing)",
                                               "skipped": f"skipped: {sync[1]}"}.get(sync[0], f"{sync[0]}: {sync[1]}")
    sync_verdict = "not measured" if sync is None or sync[0] == "skipped" else (
        "dry run" if dry else ("met" if sync[0] == "passed" else "NOT met"))

    gap = shards.get("gpu_gap_ms_max") if shards else None
    idle = shards.get("gpu_idle_pct") if shards else None
    gap_verdict = "not measured" if gap is None else (
        "dry run: not a measurement" if dry else ("met" if gap < MAX_GAP_MS else "NOT met"))

    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    return ["| milestone (issue 16) | target | this run | verdict | part |", "|---|---:|---:|---|---|",
            f"| ResNet-50 pairs/s, batch 256, bf16, synthetic | >= 1,200 | {num(pairs, ',.0f')} | {verdict(pairs, 1200)} | bench |",
            f"| shard-fed / synthetic pairs/s | >= 0.90x | {num(fed, '.2f')}x | {verdict(fed, 0.9)} | bench |",
            f"| device views (both views, no decode) | >= 10,000 views/s | {num(both, ',.0f')} | {verdict(both, 10000)} | views |",
            f"| GPU decode (with both views: a lower bound) | >= 5,000 images/s | {num(decode_images, ',.0f')} "
            f"| {verdict(decode_images, 5000)} | views |",
            f"| host syncs between log steps | 0 | {sync_text} | {sync_verdict} | tests |",
            f"| shard-fed steps: longest GPU idle gap (profiler) | < {MAX_GAP_MS:g} ms | {num(gap, '.2f')} ms "
            f"({num(idle, '.1f')} % idle) | {gap_verdict} | bench |"]


MAX_GAP_MS = 2.0  # a decode on the critical path leaves tens of ms a step; launch gaps are microseconds


def numbers(dry: bool, meta: dict, bench: list[dict], views: dict[str, float]) -> list[str]:
    """The kit's last table: each number the README's GPU section and barlow/launch/throughput.py take from a run."""
    def row(mode: str) -> dict | None:
        return next((r for r in bench if r.get("mode") == mode and r.get("config") == "reference"
                     and "pairs_per_s" in r), None)

    ref, shards = row("synthetic"), row("shards")
    gpu = str(meta.get("device_name", "unknown")).replace(" ", "-")
    sizes = meta.get("sizes", {})

    def num(r: dict | None, key: str, fmt: str) -> str:
        return "—" if r is None or r.get(key) is None else format(r[key], fmt)

    rate = shards or ref  # what training reads through barlow's data path; synthetic where the shards did not run
    measured = "—" if rate is None or dry else (
        f'`Measured(gpu="{gpu}", arch="{sizes.get("arch")}", image_size={sizes.get("image")}, precision="bf16", '
        f'images_per_s_per_gpu={rate["pairs_per_s"]:.0f}.0, source="bench/gpu.sh, '
        f'{datetime.date.today().isoformat()}, 1 GPU, batch {sizes.get("batch")}, '
        f'{"shard-fed" if shards else "synthetic"}")`')
    both = next((v for k, v in views.items() if k.startswith("both views only") and "linear" not in k), None)
    decode = views.get("decode + both views")
    return ["| number | value | goes to |", "|---|---:|---|",
            f"| GPU (`nvidia.com/gpu.product`) | {gpu}{' (DRY RUN)' if dry else ''} | throughput.py `gpu` |",
            f"| synthetic pairs/s (reference) | {num(ref, 'pairs_per_s', ',.0f')} | README GPU section |",
            f"| shard-fed pairs/s (reference) | {num(shards, 'pairs_per_s', ',.0f')} | README GPU section; "
            f"throughput.py `images_per_s_per_gpu` |",
            f"| step ms, synthetic / shard-fed | {num(ref, 'step_ms', '.1f')} / {num(shards, 'step_ms', '.1f')} "
            f"| README GPU section |",
            f"| longest GPU gap ms, synthetic / shard-fed | {num(ref, 'gpu_gap_ms_max', '.2f')} / "
            f"{num(shards, 'gpu_gap_ms_max', '.2f')} | README GPU section |",
            f"| device views/s (both views) | {'—' if both is None else format(both, ',.0f')} | README GPU section |",
            f"| GPU decode + both views, views/s | {'—' if decode is None else format(decode, ',.0f')} "
            f"| README GPU section |",
            f"| throughput.py row | {measured} | `MEASURED` in barlow/launch/throughput.py |"]


def _tail(path: Path, n: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-n:] if path.exists() else ["(no output)"]


def render(out: Path, dry: bool, start: float) -> str:
    runs = parts(out)
    tests = tests_of(out / "tests.xml", out / "tests.log") + tests_of(out / "tests-compile.xml", out / "compile-tests.log")
    meta, bench = bench_rows(out / "gpu-bench.json")
    _, compiled = bench_rows(out / "gpu-bench-compile.json")
    views = views_rates(out / "views.log")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(commit) and subprocess.run(["git", "diff", "--quiet"], capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = ["# GPU check kit report", "",
             f"- {now}, {time.time() - start:.0f} s since the kit started{'; DRY RUN on the CPU: nothing here is a GPU measurement' if dry else ''}",
             f"- commit {commit or 'unknown'}{' (with local changes)' if dirty else ''}",
             f"- device: {meta.get('device_name', 'see the preflight')}", "",
             "## Parts", "", "| part | result | seconds | limit s |", "|---|---|---:|---:|"]
    lines += [f"| {p['name']} | {part_result(p['rc'])} | {p['seconds']} | {p['limit']} |" for p in runs]
    done = {p["name"] for p in runs}
    lines += [f"| {name} | not reached |  |  |" for name in ("preflight", "tests", "bench", "views", "compile-tests",
                                                             "compile-bench") if name not in done]
    lines += ["", "## Milestones", "", *milestones(dry, bench + compiled, views, tests), ""]
    pre = out / "preflight.md"
    lines += pre.read_text().splitlines() if pre.exists() else ["## Preflight", "", "(not run)"]
    counts: dict[str, int] = {}
    for _, outcome, _ in tests:
        counts[outcome] = counts.get(outcome, 0) + 1
    lines += ["", "## Tests", "", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "(no results)", ""]
    lines += [f"- {o}: `{n}`{' — ' + m if m else ''}" for n, o, m in tests if o not in ("passed", "skipped")]
    reasons: dict[str, int] = {}
    for _, outcome, message in tests:
        if outcome == "skipped":
            reasons[message] = reasons.get(message, 0) + 1
    lines += [f"- skipped {n}: {reason or '(no reason given)'}" for reason, n in sorted(reasons.items())]
    for name in ("gpu-bench.md", "gpu-bench-compile.md"):
        f = out / name
        if f.exists():  # its title one level down
            lines += ["", *(f"#{line}" if line.startswith("# ") else line for line in f.read_text().splitlines())]
    lines += ["", "## bench/views.py", "", "```", *_tail(out / "views.log", 25), "```"]
    lines += ["", "## Numbers to take (README GPU section, barlow/launch/throughput.py)", "",
              *numbers(dry, meta, bench, views)]
    return "\n".join(lines) + "\n"


def main() -> int:
    out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
    text = render(out, dry, start)
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
