"""The `bitsearch` command line.

Every command prints a readable table and, with `--json PATH`, writes its result as JSON. User errors go to
stderr with exit code 2 and no traceback unless `--debug`.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from quant.errors import BitsearchError

app = typer.Typer(
    name="bitsearch",
    help="Find the best per-layer bit-widths for a neural network under a hardware budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Rich falls back to 80 columns when output is piped; tables of figures read better wider.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

_state: dict[str, Any] = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


@contextmanager
def status(message: str) -> Iterator[Any]:
    """A spinner for work that may take more than a second (hidden when output is not a terminal)."""
    with console.status(message) as s:
        yield s


def write_json(path: Optional[Path], payload: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        raise BitsearchError(f"cannot write {path}: {exc.strerror or exc}") from None
    console.print(f"wrote {path}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_num(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


@app.command()
def ptq(
    model: str = typer.Option(..., "--model", help="zoo:NAME (see `bitsearch models`)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint or safetensors file."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation data: zoo:NAME or an .npz file."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration data (zoo:NAME or .npz)."),
    calib_size: int = typer.Option(256, "--calib-size", min=1, help="Calibration samples."),
    bits: list[str] = typer.Option(["8/8", "4/8", "4"], "--bits", help="W/A bits, e.g. 4/8; W alone = weights only. Repeatable."),
    clip: str = typer.Option("auto", "--clip", help="Weight clipping: minmax, percentile, mse, aciq, output_mse, auto."),
    act_clip: str = typer.Option("minmax", "--act-clip", help="Activation clipping: minmax, percentile, mse, aciq."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="One weight scale per layer instead of per channel."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Correct the expected output shift."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate on at most this many items."),
    seed: int = typer.Option(0, "--seed"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Post-training quantization at uniform bit-widths: accuracy, size and BOPs against FP32."""
    from quant import QuantConfig
    from service.pipeline import resolve_inputs, run_ptq, seed_everything, uniform_allocations

    seed_everything(seed)
    config = QuantConfig(
        weight_clip=clip,
        activation_clip=act_clip,
        weight_granularity="per_tensor" if per_tensor else "per_channel",
        bias_correction=bias_correction,
        calibration_samples=calib_size,
    )
    with status("loading model and data") as s:
        inputs = resolve_inputs(model, str(weights) if weights else None, data, calib_data, calib_size, limit, seed)
        if inputs.evaluation is None:
            raise BitsearchError(f"{model} has no built-in data set: give --data (an .npz file)")
        allocations = uniform_allocations(inputs, bits)
        reference, results = run_ptq(inputs, allocations, config, progress=lambda m: s.update(m))
    for note in inputs.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    fp_top1 = reference.metrics.get("top1")
    fp_bytes = reference.cost["weight_memory_bits"] / 8
    table = Table(title=f"PTQ of {inputs.loaded.spec.ref} ({len(inputs.layers)} layers)")
    for col in ("bits", "top-1 %", "Δ top-1", "agree %", "KL", "weights", "×smaller", "avg w bits", "GBOPs"):
        table.add_column(col, justify="right" if col != "bits" else "left")
    for r in [reference, *results]:
        top1 = r.metrics.get("top1")
        delta = None if top1 is None or fp_top1 is None else top1 - fp_top1
        wbytes = r.cost["weight_memory_bits"] / 8
        table.add_row(
            r.label,
            fmt_num(top1),
            "" if r is reference else fmt_num(delta, "+.2f"),
            "" if r is reference else fmt_num(r.metrics.get("agreement")),
            "" if r is reference else fmt_num(r.metrics.get("kl"), ".4f"),
            fmt_bytes(wbytes),
            f"{fp_bytes / wbytes:.1f}",
            f"{r.cost['avg_weight_bits']:.2f}",
            f"{r.cost['bops'] / 1e9:.3f}",
        )
    console.print(table)
    n_eval = len(inputs.evaluation) if inputs.evaluation is not None else 0
    console.print(
        f"evaluated on {n_eval} items, calibrated on "
        f"{len(inputs.calibration) if inputs.calibration is not None else 0}; weight clipping {clip}"
    )
    write_json(
        json_path,
        {
            "command": "ptq",
            "model": inputs.loaded.spec.ref,
            "weights": inputs.loaded.source,
            "config": config.to_dict(),
            "evaluated_items": n_eval,
            "notes": inputs.notes,
            "reference": reference.to_dict(),
            "results": [r.to_dict() for r in results],
        },
    )


@app.command()
def models(json_path: Optional[Path] = typer.Option(None, "--json", help="Write the list as JSON.")) -> None:
    """List the built-in models."""
    from zoo import list_models

    table = Table(title="built-in models")
    for col in ("model", "input", "classes", "data", "description"):
        table.add_column(col)
    rows = []
    for s in list_models():
        table.add_row(s.ref, "×".join(map(str, s.input_shape)), str(s.num_classes), s.dataset or "—", s.description)
        rows.append({"model": s.ref, "input_shape": list(s.input_shape), "classes": s.num_classes,
                     "dataset": s.dataset, "description": s.description})
    console.print(table)
    write_json(json_path, {"command": "models", "models": rows})


def _sf():
    from db.session import session_factory
    from service.settings import get_settings

    return session_factory(get_settings().db_url)


@app.command()
def worker(
    queues: str = typer.Option("cpu,gpu", "--queues", help="Comma-separated queues to take jobs from."),
    gpu: Optional[int] = typer.Option(None, "--gpu", help="Bind this worker to one GPU (CUDA_VISIBLE_DEVICES)."),
    max_jobs: Optional[int] = typer.Option(None, "--max-jobs", min=1, help="Exit after this many jobs."),
    idle_exit: Optional[float] = typer.Option(None, "--idle-exit", help="Exit after this many idle seconds."),
) -> None:
    """Run jobs: a Celery worker when BITSEARCH_BROKER_URL is set, else a local worker on the SQL table."""
    import logging
    import os

    from service.settings import get_settings

    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    qs = [q.strip() for q in queues.split(",") if q.strip()]
    if not qs:
        raise BitsearchError("--queues needs at least one queue name")
    settings = get_settings()
    if settings.broker_url:
        from service.jobs.celery_app import run_worker

        run_worker(qs)
        return
    from service.jobs.local import work_loop

    _sf()  # migrate before the first claim
    n = work_loop(qs, max_jobs=max_jobs, idle_exit=idle_exit)
    console.print(f"worker stopped after {n} job(s)")


@app.command()
def jobs(
    job_id: Optional[str] = typer.Argument(None, help="Show one job in full."),
    status_filter: Optional[str] = typer.Option(None, "--status", help="queued, running, succeeded, failed, cancelled."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel the given job."),
    limit: int = typer.Option(20, "--limit", min=1, max=1000),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the listing as JSON."),
) -> None:
    """List jobs, or show (and optionally cancel) one."""
    from db import jobs as repo
    from db.models import JobStatus

    sf = _sf()
    if status_filter and status_filter not in {s.value for s in JobStatus}:
        raise BitsearchError(f"--status must be one of {[s.value for s in JobStatus]}")
    if job_id:
        job = repo.cancel(sf, job_id) if cancel else repo.get(sf, job_id)
        if job is None:
            raise BitsearchError(f"no job {job_id!r}")
        payload = _job_dict(job)
        payload["results"] = [
            {"id": r.id, "metrics": r.metrics, "checkpoint_path": r.checkpoint_path} for r in repo.results_for(sf, job.id)
        ]
        console.print_json(data=payload)
        write_json(json_path, payload)
        return
    if cancel:
        raise BitsearchError("--cancel needs a job id")
    rows = repo.list_jobs(sf, status_filter, limit=limit)
    table = Table(title=f"jobs ({len(rows)})")
    for col in ("id", "kind", "queue", "status", "progress", "attempts", "message", "created"):
        table.add_column(col)
    for j in rows:
        table.add_row(j.id, j.kind, j.queue, j.status.value, f"{j.progress * 100:.0f} %", str(j.attempts),
                      (j.error or j.message or "")[:60], j.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)
    write_json(json_path, {"command": "jobs", "jobs": [_job_dict(j) for j in rows]})


def _job_dict(j: Any) -> dict[str, Any]:
    def ts(v):
        return v.isoformat() if v else None

    return {
        "id": j.id, "kind": j.kind, "queue": j.queue, "status": j.status.value, "progress": j.progress,
        "message": j.message, "attempts": j.attempts, "max_attempts": j.max_attempts, "worker_id": j.worker_id,
        "created_at": ts(j.created_at), "started_at": ts(j.started_at), "finished_at": ts(j.finished_at),
        "heartbeat_at": ts(j.heartbeat_at), "error": j.error, "spec": j.spec, "result": j.result,
    }


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become a message on stderr and a non-zero exit."""
    warnings.simplefilter("ignore", UserWarning)  # zoo notes are printed as notes, not warnings
    try:
        app(args=argv, standalone_mode=False)
    except BitsearchError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as exc:  # click usage errors and anything unexpected
        # Usage errors (missing or malformed options): click's exception type, vendored by typer.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show(file=sys.stderr)
            return exc.exit_code
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]unexpected error:[/] {type(exc).__name__}: {exc} (run with --debug for a traceback)")
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
