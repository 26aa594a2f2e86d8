"""Quality while pretraining runs: the training monitors, a list behind one small protocol (`Monitor`).

Every module named in barlow.spec.MONITORS has `build(spec, proc, source, model) -> Monitor | None` (None where its
settings turn it off); `build_all` imports each and builds the list, and the training loop drives every monitor the
same way: `observe` on each step, `counts`/`at_log` on each log step, `due`/`measure` for a periodic measurement,
its checkpoint part, its phrase in the 'monitor:' line and the keys the progress line shows.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from barlow import runsetup
from barlow.data.source import Source
from barlow.spec import MONITORS, PretrainSpec


class Monitor:
    """A training monitor; the defaults do nothing, so a monitor overrides only what it uses."""

    name = ""  # how the run finds it, and its checkpoint part's name when `checkpointed`
    KEYS: tuple[str, ...] = ()  # the metric keys it reports that the progress line shows
    observes = False  # True: `observe` sees every training step (the step then returns view 1's features)
    checkpointed = False  # True: its state_dict is checkpoint part `name` (optional: older checkpoints lack it)

    def describe(self) -> str:
        """Its phrase in the run's 'monitor:' line."""
        return self.name

    def observe(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        """One training step: view 1's detached pooled backbone features and the labels (device work only, no sync)."""

    def counts(self) -> list[torch.Tensor]:
        """Device counts since the last log line, summed over ranks in the log step's one collective."""
        return []

    def at_log(self, totals: list[float]) -> dict[str, float]:
        """The log line's values from `counts` summed over all ranks."""
        return {}

    def due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        """Whether `measure` runs after optimizer step `step` (every rank gets the same answer)."""
        return False

    def measure(self, model: nn.Module) -> dict[str, float]:
        """A periodic measurement's scalars, logged as their own metrics line (empty: nothing to log on this rank);
        the model's mode is left as it was."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Its state from a checkpoint (only when `checkpointed`)."""


class Off(Monitor):
    """A monitor that is off for a reason the 'monitor:' line states (e.g. the data has no labels)."""

    def __init__(self, note: str):
        self.note = note

    def describe(self) -> str:
        return self.note


def epoch_due(step: int, steps_per_epoch: int, total_steps: int, every: int) -> bool:
    """Whether optimizer step `step` ends an epoch that is a multiple of `every`, or is the last step."""
    return step == total_steps or (step % steps_per_epoch == 0 and (step // steps_per_epoch) % every == 0)


def build_all(spec: PretrainSpec, proc: runsetup.RunContext, source: Source, model: nn.Module) -> list[Monitor]:
    """The run's monitors, in barlow.spec.MONITORS order: each module's `build`, those its settings turn on."""
    built = (importlib.import_module(module).build(spec, proc, source, model) for module in MONITORS)
    return [m for m in built if m is not None]


def monitor_line(monitors: list[Monitor]) -> str | None:
    """The 'monitor:' line (None when no monitor is on): the phrases joined by commas, a phrase ending in ';' by
    a space."""
    if not monitors:
        return None
    phrases = [m.describe() for m in monitors]
    line = phrases[0]
    for before, phrase in zip(phrases, phrases[1:], strict=False):
        line += (" " if before.endswith(";") else ", ") + phrase
    return "monitor: " + line


def progress_keys(monitors: list[Monitor]) -> tuple[str, ...]:
    """The keys the monitors report that the progress line shows."""
    return tuple(k for m in monitors for k in m.KEYS)
