"""Loss benchmark: the direct (D x D) path against the lean (N x N) path on the CPU, forward + backward; bytes sent.

    .venv/bin/python bench/loss.py                        # D = 8192, N in 64 256 1024
    .venv/bin/python bench/loss.py --dim 2048 --batches 128 512
    .venv/bin/python bench/loss.py --bytes                # bytes per rank per step at N = 2048, D = 8192, W = 8 16 32

--bytes: the bytes each rank sends per step (forward + backward) in the loss's collectives, from the collectives'
sizes (barlow.loss.bytes_sent), for the official code's all-reduce of C and the direct, lean (all-gather) and
sharded paths; then a check of that count on real gloo processes at small sizes: each rank's bytes written to its
sockets during one forward + backward (the `wchar` of /proc/self/io; gloo's TCP transport writes with writev), against
the formula.

Every (path, N) case runs in fresh subprocesses, so neither path inherits the other's allocator state:
- time: one warm-up forward + backward of BarlowTwinsLoss on random float32 [N, D] views, then the median wall time
  of `--repeats` more, on `--threads` torch threads (default 1: on a small shared machine two threads contend with
  other work and time mostly the contention; the direct/lean ratio is the point).
- memory: one cold forward + backward under MALLOC_MMAP_THRESHOLD_=65536 (allocations of 64 KiB and up are mapped
  and unmapped one by one, so freed memory leaves the resident set at once); peak resident memory (VmHWM, reset
  through /proc/self/clear_refs after the inputs exist) minus the resident memory before the call. That is every
  byte the loss and its backward had resident at once (C, its squares, gradients, Gram matrices, library scratch),
  inputs excluded.
Prints a markdown table with direct/lean ratios; the last line states them at N = 256.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from barlow.loss import BarlowTwinsLoss, bytes_sent

MIB = 2**20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _inputs(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=g)
    z2 = 0.5 * z1 + torch.randn(n, d, generator=g)
    return z1.requires_grad_(), z2.requires_grad_()


def _step(loss_fn: BarlowTwinsLoss, z1: torch.Tensor, z2: torch.Tensor) -> float:
    z1.grad = z2.grad = None
    loss = loss_fn(z1, z2)
    loss.backward()
    return loss.item()


def run_case(path: str, n: int, d: int, mode: str, repeats: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(threads)
    loss_fn = BarlowTwinsLoss(path=path)
    z1, z2 = _inputs(n, d)
    if mode == "memory":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
        _step(loss_fn, z1, z2)
        return {"peak_mib": (_status_kib("VmHWM") - before) / 1024}
    value = _step(loss_fn, z1, z2)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(loss_fn, z1, z2)
        times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "loss": value, "threads": torch.get_num_threads()}


def measure(path: str, n: int, d: int, mode: str, repeats: int, threads: int) -> dict:
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--case", path, str(n), "--dim", str(d), "--mode", mode, "--repeats", str(repeats),
           "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"case {path} N={n} ({mode}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


BYTES_PATHS = ("official", "direct", "lean", "sharded")


def bytes_table(n: int, d: int, worlds: list[int]) -> str:
    lines = [f"Bytes each rank sends per step in the loss (forward + backward, float32), N = {n}, D = {d}:\n",
             "| W | official all-reduce of C MiB | direct MiB | lean (all-gather) MiB | sharded MiB "
             "| official/sharded | lean/sharded |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for w in worlds:
        b = {p: bytes_sent(p, n, d, w) for p in BYTES_PATHS}
        lines.append(f"| {w} | {b['official'] / MIB:.1f} | {b['direct'] / MIB:.1f} | {b['lean'] / MIB:.1f} "
                     f"| {b['sharded'] / MIB:.1f} | {b['official'] / b['sharded']:.1f}x | {b['lean'] / b['sharded']:.1f}x |")
    return "\n".join(lines)


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(re.search(r"^wchar: (\d+)", f.read(), re.M).group(1))


def _gloo_rank(rank: int, world: int, port: int, n: int, d: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        z1, z2 = _inputs(n, d)
        mine = [z.detach().chunk(world)[rank].clone().requires_grad_() for z in (z1, z2)]
        sent = {}
        for path in ("direct", "lean", "sharded"):
            loss_fn = BarlowTwinsLoss(path=path)
            _step(loss_fn, *mine)  # warm-up (gloo sets up its pairs lazily)
            dist.barrier()
            before = _wchar()
            loss_fn(*mine).backward()
            sent[path] = _wchar() - before
            dist.barrier()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(sent, f)
    finally:
        dist.destroy_process_group()


def measured_bytes(n: int, d: int, world: int) -> dict[str, float]:
    """Mean over ranks of the bytes each wrote to its sockets in one forward + backward, per path."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_gloo_rank, args=(world, port, n, d, out), nprocs=world)
        ranks = [json.load(open(f"{out}/rank{r}.json")) for r in range(world)]
    return {p: statistics.mean(r[p] for r in ranks) for p in ranks[0]}


def check_table(n: int, d: int, worlds: list[int]) -> str:
    lines = [f"Measured on gloo (bytes written to sockets per rank, mean over ranks), N = {n}, D = {d}:\n",
             "| W | path | formula KiB | measured KiB | measured/formula |", "|---:|---|---:|---:|---:|"]
    for w in worlds:
        for path, got in measured_bytes(n, d, w).items():
            want = bytes_sent(path, n, d, w)
            lines.append(f"| {w} | {path} | {want / 1024:.1f} | {got / 1024:.1f} | {got / want:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=8192, help="projector width D")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="global batch sizes N")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of each case")
    ap.add_argument("--bytes", action="store_true", help="bytes sent per rank per step (formula + a gloo check)")
    ap.add_argument("--global-batch", type=int, default=2048, help="global batch N of the --bytes table")
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32], help="world sizes of the --bytes table")
    ap.add_argument("--check", type=int, nargs=3, default=[256, 1024, 4], metavar=("N", "D", "MAX_W"),
                    help="sizes of the gloo check of --bytes (W = 2 .. MAX_W, powers of 2)")
    ap.add_argument("--mode", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--case", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.dim, args.mode, args.repeats, args.threads)))
        return
    if args.bytes:
        print(bytes_table(args.global_batch, args.dim, args.worlds))
        n, d, max_w = args.check
        print()
        print(check_table(n, d, [w for w in (2, 4, 8, 16, 32) if w <= max_w]))
        return

    rows = []
    for n in args.batches:
        r = {"n": n}
        for path in ("direct", "lean"):
            r[path] = {**measure(path, n, args.dim, "time", args.repeats, args.threads),
                       **measure(path, n, args.dim, "memory", 1, args.threads)}
            print(f"N={n} {path}: {r[path]['ms']:.1f} ms, {r[path]['peak_mib']:.1f} MiB peak", file=sys.stderr, flush=True)
        rows.append(r)

    print(f"Barlow Twins loss, forward + backward, float32, D = {args.dim}, CPU "
          f"({rows[0]['direct']['threads']} torch threads, {os.cpu_count()} cores), median of {args.repeats}:\n")
    print("| N | direct ms | lean ms | speed-up (direct/lean) | direct peak MiB | lean peak MiB "
          "| memory (direct/lean) | loss rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["direct"], r["lean"]
        diff = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        print(f"| {r['n']} | {a['ms']:.1f} | {b['ms']:.1f} | {a['ms'] / b['ms']:.1f}x | {a['peak_mib']:.1f} "
              f"| {b['peak_mib']:.1f} | {a['peak_mib'] / b['peak_mib']:.1f}x | {diff:.1e} |")
    at = next((r for r in rows if r["n"] == 256), rows[0])
    a, b = at["direct"], at["lean"]
    print(f"\nAt N={at['n']}, D={args.dim}: lean is {a['ms'] / b['ms']:.1f}x faster and uses "
          f"{a['peak_mib'] / b['peak_mib']:.1f}x less peak memory than direct.")


if __name__ == "__main__":
    main()
