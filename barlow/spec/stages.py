"""Pipeline stages: the runs `barlow run|render|submit STAGE` makes of a spec, the follow-up eval included."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ValidationError

from barlow.spec.errors import SpecError
from barlow.spec.evaluation import EvalClusterSpec, EvalRuntimeSpec
from barlow.spec.run import EvalRunSpec, PretrainSpec


class Stage(StrEnum):
    """What `barlow run|render|submit STAGE` makes of a spec (the rules are `stage_runs`)."""

    pretrain = "pretrain"
    eval = "eval"
    pipeline = "pipeline"


STAGE_HELP = "pretrain, eval (of an eval spec, or of a pretrain spec's checkpoint), or pipeline (pretrain, then eval)."


def follow_up_eval(spec: PretrainSpec) -> EvalRunSpec:
    """The eval of a pretrain spec's checkpoint; raises SpecError naming it (checked before anything runs)."""
    try:
        return spec.eval_spec()
    except ValidationError as e:
        err = SpecError.from_validation(e, "the follow-up eval")
        raise SpecError([_override_path(p) for p in err.problems], err.source) from None


def _override_path(problem: str) -> str:
    # a problem with the eval's size is fixed in the pretrain spec's eval.runtime / eval.cluster: name that field
    section, _, rest = problem.partition(".")
    model = {"runtime": EvalRuntimeSpec, "cluster": EvalClusterSpec}.get(section)
    return f"eval.{problem}" if model and rest.split(":", 1)[0] in model.model_fields else problem


UNLABELLED_EVAL = ("eval.data: the pretraining data has no labels ({what}); the eval needs a labelled set: set "
                   "eval.data (train, val, format)")


def stage_runs(spec: PretrainSpec | EvalRunSpec, stage: str, source: str | None = None) -> list[PretrainSpec | EvalRunSpec]:
    """The runs `stage` makes of `spec`, in order: pretrain [spec]; eval [spec] for an eval spec, the follow-up eval
    for a pretrain spec; pipeline [spec, its follow-up eval]. Raises SpecError before anything runs or is submitted."""
    if stage in (Stage.pretrain, Stage.pipeline) and not isinstance(spec, PretrainSpec):
        raise SpecError([f"kind is '{spec.kind}'; `{stage}` needs a pretrain spec"], source)
    if stage not in tuple(Stage):
        raise SpecError([f"stage must be one of {', '.join(Stage)} (got '{stage}')"], source)
    if isinstance(spec, EvalRunSpec):
        return [spec]
    if stage == Stage.pretrain:
        return [spec]
    if spec.data.labels == "none" and spec.eval.data is None:
        raise SpecError([UNLABELLED_EVAL.format(what="data.labels is none")], source)
    return [follow_up_eval(spec)] if stage == Stage.eval else [spec, follow_up_eval(spec)]
