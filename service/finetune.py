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

from .jobs.kinds import JobCancelled, JobContext, JobInterrupted, JobOutput

SPEC_FIELDS = {"model", "weights", "data", "roles", "calib_data", "allocation", "recipe", "eval_limit", "seed",
               "search_id", "point"}


def load_training_data(spec: dict[str, Any]):
    """(loaded model, resolved data: train, report, calibration) for a QAT spec. `data` is the training data
    (a zoo set, an .npz file); `roles` may name other sources for "train", "calibration" or "report"."""
    from bitsearch.data import resolve_training_data
    from zoo.uploads import load_any_model

    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise BitsearchError(f"unknown fine-tuning field(s) {sorted(unknown)}; known: {sorted(SPEC_FIELDS)}")
    if "model" not in spec or "allocation" not in spec:
        raise BitsearchError("a fine-tuning job needs a model and an allocation")
    loaded = load_any_model(spec["model"], spec.get("weights"))
    roles = dict(spec.get("roles") or {})
    if spec.get("calib_data"):
        roles["calibration"] = spec["calib_data"]
    data = resolve_training_data(spec.get("data"), roles, normalisation=loaded.normalisation,
                                 model_dataset=loaded.spec.dataset, eval_limit=spec.get("eval_limit"),
                                 seed=spec.get("seed", 0), num_classes=loaded.num_classes)
    return loaded, data


def run_finetune(spec: dict[str, Any], ctx: JobContext | None = None,
                 progress: Callable[[float, str], None] | None = None) -> JobOutput:
    loaded, data = load_training_data(spec)
    allocation = Allocation.from_dict(spec["allocation"])
    recipe = QATRecipe.from_dict(spec.get("recipe") or {})
    from .jobs.quotas import check_qat_total

    check_qat_total(recipe.total_steps(len(data.train)))
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

    result = finetune(loaded.model, allocation, data.train, recipe, callbacks=on_step,
                      calibration=data.calibration, eval_data=data.report, checkpoint_dir=workdir,
                      resume_from=resume)
    if interrupted:
        raise JobInterrupted(ctx.job_id if ctx is not None else "")
    out = result.to_dict()
    out["resumed"] = resume is not None
    out["data"] = data.record
    from quant.cost import CostModel
    from quant.layers import discover_layers

    cost = CostModel(discover_layers(loaded.model, loaded.example_input)).cost(result.allocation).to_dict()
    return JobOutput(out, ResultRow("qat", result.metrics, result.allocation.to_dict(), result.recipe.to_dict(),
                                    cost, str(result.checkpoint) if result.checkpoint else None))
