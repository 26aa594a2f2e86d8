"""`barlow run pretrain|eval|pipeline SPEC`: run a spec here, in local torchrun processes."""

from __future__ import annotations

import json

import typer

from barlow.cli.common import EXIT_INVALID, SET, SPEC, app, console, example, fail, invalid, load_or_exit
from barlow.spec import STAGE_HELP, UNLABELLED_EVAL, EvalRunSpec, PretrainSpec, SpecError, Stage, stage_runs, with_fields


@app.command(epilog=example("barlow run pipeline spec.yaml --set optim.epochs=5"))
def run(
    stage: Stage = typer.Argument(..., metavar="STAGE", help=STAGE_HELP),
    spec_path: str = SPEC,
    nproc: int = typer.Option(None, "--nproc", min=1, max=64, help="Override runtime.nproc_per_node."),
    overrides: list[str] = SET,
) -> None:
    """Run a spec on this machine with torchrun (Ctrl-C stops cleanly after a checkpoint; rerun to resume)."""
    from barlow.errors import OutputInUse
    from barlow.launch.local import run_local
    from barlow.lease import new_holder

    spec = load_or_exit(spec_path, overrides)
    if nproc is not None:
        spec = _with_nproc(spec, nproc, spec_path)
    if stage != Stage.pretrain:
        _check_eval_labels(spec, spec_path)  # first: it says why the eval of these data cannot run
    try:
        plan = stage_runs(spec, stage, spec_path)
    except SpecError as e:
        raise invalid(e.problems, f"{e.source}: " if e.source else "") from None
    holder = new_holder()  # one identity for the stages of this run
    for step in plan:
        try:
            code = run_local(step, holder)
        except (OutputInUse, OSError) as e:  # another run's lease, or an output folder that cannot be reached
            raise fail(str(e)) from None
        if code != 0:
            raise fail(f"{step.kind} '{step.name}' exited with code {code}", code)
    if isinstance(plan[-1], EvalRunSpec):
        from barlow import storage

        # the spec's own S3 settings: an endpoint that is not AWS's is only in data.s3
        results = json.loads(storage.read_text(storage.join(plan[-1].output.url, "results.json"),
                                               storage.S3Settings.of_spec(plan[-1])))
        console.print(f"[bold green]top-1 {results['top1']:.1f} %[/]  (kNN top-1 {results['knn_top1']:.1f} %) "
                      f"on {results['val_images']} val images -> {plan[-1].output.url}/results.json")
    else:
        console.print(f"[bold green]done[/]: backbone at {plan[-1].output.url}/backbone.pt")


def _with_nproc(spec: PretrainSpec | EvalRunSpec, nproc: int, source: str) -> PretrainSpec | EvalRunSpec:
    try:
        return with_fields(spec, {"runtime.nproc_per_node": nproc}, source)
    except SpecError as e:
        raise fail(f"--nproc {nproc}: " + "; ".join(e.problems), EXIT_INVALID) from None


def _check_eval_labels(spec: PretrainSpec | EvalRunSpec, source: str) -> None:
    """A pretrain spec's eval of unlabelled pretraining data without eval.data: refused (exit 2) before anything runs.
    Data that cannot be read is left to the run, which names it."""
    if not isinstance(spec, PretrainSpec) or spec.eval.data is not None or spec.data.labels == "folders":
        return
    from barlow.data import summarize

    try:
        summary = summarize(spec.data, "train")
    except Exception:  # noqa: BLE001 - the run reports unreadable data with its own error line
        return
    if summary.classes == 0:
        raise invalid([UNLABELLED_EVAL.format(what=f"{spec.data.train}: {summary.text}")], f"{source}: ")
