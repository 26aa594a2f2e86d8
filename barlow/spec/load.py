"""A spec from YAML (a key given twice is refused) or a dict, with `--set key.path=value` overrides; the resolved spec
as YAML, and the JSON schema of a spec file."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from barlow.spec.base import Section
from barlow.spec.errors import SpecError
from barlow.spec.evaluation import FollowUpEvalSpec
from barlow.spec.run import AnySpec, EvalRunSpec, PretrainSpec, RunSpec

_ADAPTER: TypeAdapter[PretrainSpec | EvalRunSpec] = TypeAdapter(AnySpec)


def parse_spec(data: Any, source: str | None = None) -> PretrainSpec | EvalRunSpec:
    """Validate a spec given as a dict; raises SpecError."""
    if not isinstance(data, dict):
        raise SpecError([f"{source or 'spec'}: must be a mapping of sections (kind, name, data, ...)"], source)
    if "kind" not in data:
        raise SpecError(["kind: required field is missing (pretrain or eval)"], source)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpecError.from_validation(err, source) from None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> PretrainSpec | EvalRunSpec:
    """Read and validate a spec file (UTF-8 YAML), with `--set key.path=value` overrides; raises SpecError naming the
    file or the fields."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"], str(path)) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: is a folder, not a spec file"], str(path)) from None
    except OSError as e:
        raise SpecError([f"{path}: cannot read ({e.strerror})"], str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the spec "
                         "as UTF-8"], str(path)) from None
    return loads_spec(text, str(path), overrides)


def loads_spec(text: str, source: str = "spec", overrides: Sequence[str] = ()) -> PretrainSpec | EvalRunSpec:
    """Validate a spec given as YAML text (a file's content, or BARLOW_SPEC in a pod), with `--set` overrides."""
    data = _yaml_load(text, source)
    if not overrides:
        return parse_spec(data, source)
    if not isinstance(data, dict):
        return parse_spec(data, source)  # the one-line "must be a mapping" error
    changed = {}
    for item in overrides:
        key, value = parse_override(item)
        try:
            data = set_path(data, key, value)
        except SpecError as e:
            raise SpecError([f"--set {item}: {e.problems[0]}"], source) from None
        changed[key] = item
    try:
        return parse_spec(data, source)
    except SpecError as e:
        raise SpecError([_from_override(line, changed) for line in e.problems], source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, [], set())
        return super().construct_document(node)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, path: str, line: int, first: int):
        super().__init__(f"duplicate key '{path}' (first at line {first}); a key may appear once")
        self.path, self.line, self.first = path, line, first


def _check_unique_keys(node: yaml.Node, path: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias repeats a node already checked (and may point back at its parent)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                _check_unique_keys(value, path, seen)
                continue
            here = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                raise DuplicateKey(".".join([*path, key.value]), here, first[(key.tag, key.value)])
            first[(key.tag, key.value)] = here
            _check_unique_keys(value, [*path, key.value], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, [*path, str(i)], seen)


def _yaml_load(text: str, source: str) -> Any:
    """YAML text as Python data; any YAML problem (duplicate keys included) is one SpecError line with its line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except DuplicateKey as e:
        raise SpecError([f"{source}: line {e.line}: {e}"], source) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}:" if where else ""
        raise SpecError([f"{source}:{line} not valid YAML ({getattr(e, 'problem', None) or e})"], source) from None


OVERRIDE_HELP = "Set a spec field, as in the file: key.path=value (repeatable; the value is YAML: 4, true, [1.0, 0.1])."


def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` as (key path, the value parsed as YAML); raises SpecError naming the item."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError([f"--set {item}: must be key.path=value (e.g. --set optim.epochs=100)"])
    try:
        value = _yaml_load(text, f"--set {key}")  # empty: null, as in a YAML file
    except SpecError as e:
        raise SpecError([e.problems[0]]) from None
    return key, value


def _from_override(line: str, changed: dict[str, str]) -> str:
    """A validation line about a field that `--set` gave says so."""
    field = line.split(": ", 1)[0]
    item = changed.get(field)
    return f"{line} (from --set {item})" if item else line


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML (what `barlow validate` prints and a pod receives)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


REMOVE = object()  # a value for set_path: delete the field instead of setting it


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of a spec's dict with the dotted `path` set to `value` (REMOVE deletes it); raises SpecError
    where the path runs through a value that is not a section."""
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = out
    for i, p in enumerate(parents):
        if node.get(p) is None:  # an absent section, or one written empty (`eval:`)
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise SpecError([f"{'.'.join(parents[:i + 1])}: is a value, not a section (it has no field "
                             f"'{'.'.join([*parents[i + 1:], last])}')"])
    if value is REMOVE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def with_fields(spec: RunSpec, changes: dict[str, Any], source: str | None = None) -> PretrainSpec | EvalRunSpec:
    """The spec with dotted fields changed (`{"runtime.nproc_per_node": 4}`), validated again; raises SpecError."""
    data = spec.model_dump(mode="json")
    for path, value in changes.items():
        data = set_path(data, path, value)
    return parse_spec(data, source)


def json_schema() -> dict[str, Any]:
    """JSON schema of a spec file, for editors."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "barlow run spec"
    for model in (PretrainSpec, EvalRunSpec, FollowUpEvalSpec, *Section.__subclasses__()):
        props = schema["$defs"].get(model.__name__, {}).get("properties", {})
        for name, field in model.model_fields.items():  # pydantic drops descriptions beside a $ref with a default
            if field.description and name in props:
                props[name].setdefault("description", field.description)
    return schema
