"""Job kinds: what a job of each kind does, given its JSON spec. One registry, as for solvers and methods.

A kind is a function `(spec, ctx) -> JobOutput`. It reports progress through `ctx.progress`, which also
raises `JobCancelled` once a cancel was requested, and keeps anything it wants to survive a worker crash
under `ctx.workdir` (the QAT kind keeps its checkpoints there and resumes from the newest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from db.jobs import ResultRow
from quant.errors import BitsearchError


class JobCancelled(Exception):
    """Raised inside a job when its cancellation was requested."""


class JobInterrupted(Exception):
    """Raised inside a job when its worker is stopping: the job is released to the queue (after writing a
    checkpoint where it keeps one), not failed."""


@dataclass
class JobContext:
    job_id: str
    attempt: int
    workdir: Path
    report: Callable[[float, str], bool]  # (fraction, message) -> still wanted?
    # Whether the job is still wanted (False once a cancel was requested), as of the last heartbeat: cheap
    # enough to ask between training steps, and it reports no progress.
    wanted: Callable[[], bool] = lambda: True

    def progress(self, fraction: float, message: str = "") -> None:
        if not self.report(fraction, message):
            raise JobCancelled(self.job_id)


@dataclass
class JobOutput:
    result: dict[str, Any]
    row: ResultRow | None = None  # a measured outcome for the results table
    extra: dict[str, Any] = field(default_factory=dict)


JobFn = Callable[[dict[str, Any], JobContext], JobOutput]
KINDS: dict[str, JobFn] = {}


def register_kind(name: str) -> Callable[[JobFn], JobFn]:
    def deco(fn: JobFn) -> JobFn:
        KINDS[name] = fn
        return fn

    return deco


def get_kind(name: str) -> JobFn:
    if name not in KINDS:
        raise BitsearchError(f"unknown job kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


@register_kind("ptq")
def _ptq(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    from quant.apply import search_quant_config
    from service.pipeline import resolve_inputs, run_ptq, uniform_allocations

    inputs = resolve_inputs(spec["model"], spec.get("weights"), spec.get("data"), spec.get("calib_data"),
                            spec.get("calib_size", 256), spec.get("limit"), spec.get("seed", 0))
    allocs = uniform_allocations(inputs, spec.get("bits", ["8/8"]))
    steps = len(allocs) + 1
    done = [0]

    def progress(msg: str) -> None:
        ctx.progress(done[0] / (2 * steps), msg)
        done[0] += 1

    # the search's PTQ recipe under the request's settings, so a search's allocation scores as it did there
    config = search_quant_config(spec.get("quant"), calibration_available=inputs.calibration is not None)
    ref, results = run_ptq(inputs, allocs, config, progress)
    out = {"reference": ref.to_dict(), "results": [r.to_dict() for r in results]}
    best = results[0]
    return JobOutput(out, ResultRow("ptq", best.metrics, best.allocation.to_dict(), None, best.cost))


@register_kind("qat")
def _qat(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    from service.finetune import run_finetune

    return run_finetune(spec, ctx)


@register_kind("search")
def _search(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    # It persists into the service's tables, so it lives beside the API (imported here, when a job runs:
    # search_job imports this module, never the other way round at import time).
    from service.api.search_job import search_kind

    return search_kind(spec, ctx)


@register_kind("study-trials")
def _study_trials(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    # Trials of a fan-out study (a BOMP-NAS search's), run by whichever worker claims the job.
    from service.measured_search import run_study_trials

    return run_study_trials(spec, ctx)
