"""The QAT stage as a job and as a command: spec -> model + data -> `quant.qat.finetune` -> result row.

The job keeps its checkpoint in its work folder; a job that lost its worker is claimed again and resumes
from that checkpoint, so a crash costs at most `checkpoint_every` steps.
"""

from __future__ import annotations

from typing import Any, Callable

from db.jobs import ResultRow
from quant import Allocation
from quant.errors import BitsearchError
from quant.qat import QATRecipe, finetune
from zoo import DataSplits, load_data

from .jobs.kinds import JobCancelled, JobContext, JobInterrupted, JobOutput

SPEC_FIELDS = {"model", "weights", "data", "calib_data", "allocation", "recipe", "eval_limit", "seed", "search_id",
               "point"}


def load_training_data(spec: dict[str, Any]):
    """(loaded model, train, calibration, evaluation) for a QAT spec."""
    from service.pipeline import resolve_inputs

    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise BitsearchError(f"unknown fine-tuning field(s) {sorted(unknown)}; known: {sorted(SPEC_FIELDS)}")
    if "model" not in spec or "allocation" not in spec:
        raise BitsearchError("a fine-tuning job needs a model and an allocation")
    inputs = resolve_inputs(spec["model"], spec.get("weights"), spec.get("data"), spec.get("calib_data"),
                            eval_limit=spec.get("eval_limit"), seed=spec.get("seed", 0))
    data_ref = spec.get("data") or inputs.loaded.spec.dataset
    train = None
    if data_ref is not None:
        d = load_data(data_ref, inputs.loaded.normalisation, seed=spec.get("seed", 0))
        train = d.train if isinstance(d, DataSplits) else None
    if train is None:
        # An .npz file gives one array set with no train/test roles; fine-tuning needs both.
        raise BitsearchError("fine-tuning needs a data set with a train split (e.g. zoo:digits); "
                             "training from an .npz file is not supported yet")
    return inputs, train


def run_finetune(spec: dict[str, Any], ctx: JobContext | None = None,
                 progress: Callable[[float, str], None] | None = None) -> JobOutput:
    inputs, train = load_training_data(spec)
    allocation = Allocation.from_dict(spec["allocation"])
    recipe = QATRecipe.from_dict(spec.get("recipe") or {})
    from .jobs.quotas import check_qat_total

    check_qat_total(recipe.total_steps(len(train)))
    workdir = ctx.workdir if ctx is not None else None
    checkpoint = workdir / "qat-checkpoint.pt" if workdir is not None else None
    resume = checkpoint if checkpoint is not None and checkpoint.exists() else None
    if workdir is not None and not recipe.checkpoint_every:
        recipe.checkpoint_every = 50  # a job must survive its worker: keep the loss of a crash small

    interrupted: list[bool] = []

    def on_step(state) -> None:
        msg = f"step {state.step}/{state.total_steps}, loss {state.loss:.4f}"
        if ctx is not None:
            try:
                ctx.progress(state.progress, msg)
            except JobInterrupted:  # the worker is stopping: stop here, write the checkpoint, then release
                state.request_stop()
                interrupted.append(True)
            except JobCancelled:
                state.request_stop()
                raise
        if progress is not None:
            progress(state.progress, msg)

    result = finetune(inputs.loaded.model, allocation, train, recipe, callbacks=on_step,
                      calibration=inputs.calibration, eval_data=inputs.evaluation, checkpoint_dir=workdir,
                      resume_from=resume)
    if interrupted:
        raise JobInterrupted(ctx.job_id if ctx is not None else "")
    out = result.to_dict()
    out["resumed"] = resume is not None
    from quant.cost import CostModel

    cost = CostModel(inputs.layers).cost(result.allocation).to_dict()
    return JobOutput(out, ResultRow("qat", result.metrics, result.allocation.to_dict(), result.recipe.to_dict(),
                                    cost, str(result.checkpoint) if result.checkpoint else None))
