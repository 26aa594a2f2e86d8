"""SpecError: a spec that cannot run, one `field.path: message` line per problem, an unknown key with its did-you-mean."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from barlow.spec.run import EvalRunSpec, PretrainSpec


class SpecError(Exception):
    """A spec that cannot run: one `field.path: message` line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))

    @classmethod
    def from_validation(cls, err: ValidationError, source: str | None = None) -> SpecError:
        # a cross-field rule carries all its problems in one error, a line each
        return cls([line for e in err.errors(include_url=False) for line in _format_error(e).split("\n")], source)


def _format_error(e: dict[str, Any]) -> str:
    loc = [str(p) for p in e["loc"]]
    root = {"pretrain": PretrainSpec, "eval": EvalRunSpec}.get(loc[0]) if loc else None
    if root:
        loc = loc[1:]  # drop the discriminator tag pydantic puts first
    path = ".".join(loc)
    if e["type"] == "spec_rule":  # cross-field rules carry their own field path
        return e["msg"]
    if e["type"] == "union_tag_invalid":
        return f"kind: must be 'pretrain' or 'eval' (got '{e['ctx']['tag']}')"
    if e["type"] == "extra_forbidden":
        return f"{path}: unknown field{_did_you_mean(root, loc)}"
    if e["type"] == "missing":
        return f"{path}: required field is missing"
    msg = e["msg"]
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    return f"{path}: {msg}" if path else msg


def _did_you_mean(root: type[BaseModel] | None, loc: list[str]) -> str:
    """A field name for an unknown key: the same name in another section (`data.batch_size` -> `optim.batch_size`),
    else a close name in its own section."""
    elsewhere = [p for p in _field_paths(root) if p.rsplit(".", 1)[-1] == loc[-1] and p != ".".join(loc)]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    model = root
    for part in loc[:-1]:  # walk down to the section that holds the unknown key
        field = model.model_fields.get(part) if model else None
        model = _section_of(field.annotation) if field else None
    names = list(model.model_fields) if model else []
    close = difflib.get_close_matches(loc[-1], names, n=1) or [n for n in names if n.startswith(loc[-1])][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _section_of(annotation: Any) -> type[BaseModel] | None:
    args = getattr(annotation, "__args__", ())
    if type(None) in args and len(args) == 2:  # an optional section (an eval spec's `model`)
        annotation = next(a for a in args if a is not type(None))
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _field_paths(model: type[BaseModel] | None, prefix: str = "") -> list[str]:
    """Every dotted field path of a spec model, sections included, shallowest first."""
    if model is None:
        return []
    paths = [prefix + name for name in model.model_fields]
    for name, field in model.model_fields.items():
        paths += _field_paths(_section_of(field.annotation), f"{prefix}{name}.")
    return paths
