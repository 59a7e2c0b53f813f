"""The `bitsearch` command line.

Every command prints a readable table and, with `--json PATH`, writes its result as JSON. User errors go to
stderr with exit code 2 and no traceback unless `--debug`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from quant.errors import BitsearchError

from .cli_common import _state, app, console, err_console, fmt_bytes, fmt_num, status, write_json  # noqa: F401

@app.command()
def ptq(
    model: str = typer.Option(..., "--model", help="zoo:NAME (see `bitsearch models`)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint or safetensors file."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation data: zoo:NAME or an .npz file."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration data (zoo:NAME or .npz)."),
    calib_size: int = typer.Option(256, "--calib-size", min=1, help="Calibration samples."),
    bits: list[str] = typer.Option([], "--bits", help="W/A bits, e.g. 4/8; W alone = weights only. Repeatable "
                                   "(default without --allocation: 8/8, 4/8, 4)."),
    allocation: list[Path] = typer.Option([], "--allocation", help="An allocation JSON (e.g. from `bitsearch search "
                                          "--allocation`) to evaluate as well. Repeatable."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Weight clipping: minmax, percentile, mse, aciq, output_mse, auto (default: the search's PTQ recipe)."),
    act_clip: Optional[str] = typer.Option(None, "--act-clip", help="Activation clipping: minmax, percentile, mse, aciq (default: the search's PTQ recipe)."),
    rounding: Optional[str] = typer.Option(None, "--rounding", help="Weight rounding: nearest or gptq (default: the search's PTQ recipe)."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="One weight scale per layer instead of per channel."),
    bias_correction: Optional[bool] = typer.Option(None, "--bias-correction/--no-bias-correction", help="Correct the expected output shift (default: the search's PTQ recipe)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate on at most this many items."),
    seed: int = typer.Option(0, "--seed"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Post-training quantization of uniform bit-widths and of any allocation: accuracy, size and BOPs against
    FP32."""
    from quant import Allocation, QuantConfig
    from quant.apply import search_quant_config
    from service.pipeline import (
        DEFAULT_PTQ_BITS,
        checked_allocation,
        resolve_inputs,
        run_ptq,
        seed_everything,
        uniform_allocations,
    )

    seed_everything(seed)
    # the flags given, over the search's PTQ recipe: an allocation from a search scores here as it did there
    given = {"weight_clip": clip, "activation_clip": act_clip, "weight_rounding": rounding,
             "bias_correction": bias_correction,
             "weight_granularity": "per_tensor" if per_tensor else None}
    quant = {k: v for k, v in given.items() if v is not None} | {"calibration_samples": calib_size}
    QuantConfig.from_dict(quant)  # a bad flag is refused before anything loads
    with status("loading model and data") as s:
        inputs = resolve_inputs(model, str(weights) if weights else None, data, calib_data, calib_size, limit, seed)
        config = search_quant_config(quant, calibration_available=inputs.calibration is not None)
        if inputs.evaluation is None:
            raise BitsearchError(f"{model} has no built-in data set: give --data (an .npz file)")
        allocations = uniform_allocations(inputs, bits or DEFAULT_PTQ_BITS) if bits or not allocation else []
        allocations += [(path.stem, checked_allocation(Allocation.load(path), inputs)) for path in allocation]
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
    from service.jobs.local import lower_priority

    lower_priority(settings.worker_nice)
    if settings.broker_url:
        from service.jobs.celery_app import run_worker

        run_worker(qs)
        return
    from service.jobs.local import work_loop

    from service.jobs.supervise import wait_for_database

    wait_for_database(_sf, settings.db_wait_at_start)  # migrate before the first claim; wait for the database
    n = work_loop(qs, max_jobs=max_jobs, idle_exit=idle_exit)
    console.print(f"worker stopped after {n} job(s)")


@app.command("worker-health")
def worker_health(
    queues: str = typer.Option("cpu,gpu", "--queues", help="The queues the worker on this host serves."),
    within: float = typer.Option(60.0, "--within", min=1.0, help="Seconds a busy worker's heartbeat may be old."),
    ping_timeout: float = typer.Option(5.0, "--ping-timeout", min=0.1, help="Seconds to wait for the ping."),
) -> None:
    """Exit 0 when this host's Celery worker answers a ping or runs a job with a recent heartbeat (container
    health checks); else print why and exit 1."""
    from service.jobs.celery_app import worker_is_healthy
    from service.settings import get_settings

    if not get_settings().broker_url:
        raise BitsearchError("worker-health checks a Celery worker: set BITSEARCH_BROKER_URL")
    ok, why = worker_is_healthy([q.strip() for q in queues.split(",") if q.strip()], within, ping_timeout)
    console.print(why)
    raise typer.Exit(0 if ok else 1)


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


# --------------------------------------------------------------------------------------------------------------
# REST service: API keys and `serve`

keys_app = typer.Typer(help="API keys of the REST service.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _check_tenant_name(tenant: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", tenant or ""):
        raise BitsearchError("--tenant must be 1-100 letters, digits, '_', '.' or '-'")
    return tenant


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant name (created if new)."),
    name: str = typer.Option("", "--name", help="A label for the key."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the key as JSON."),
) -> None:
    """Create an API key for a tenant. The key is shown once; only its hash is stored."""
    from service.api.auth import create_key

    key, tenant_id = create_key(_sf(), _check_tenant_name(tenant), name[:100])
    console.print(f"tenant {tenant} ({tenant_id})")
    console.print("API key (shown once; send it as 'Authorization: Bearer <key>'):")
    print(key)
    write_json(json_path, {"command": "keys create", "tenant": tenant, "tenant_id": tenant_id, "key": key})


def _serve_worker(queues: Optional[list[str]], db_url: Optional[str]) -> None:
    """A local worker process of `serve` (spawned): polls for jobs of every kind (`service.jobs.kinds`), and
    dies with `serve` (see `service.jobs.local.supervised_worker`)."""
    import logging

    from service.jobs.local import lower_priority, supervised_worker
    from service.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lower_priority(get_settings().worker_nice)
    supervised_worker(queues, db_url)


def _demo(sf: Any, host: str, port: int) -> None:
    """Prepare the zoo's digits model and data, make a key, print how to call the service."""
    from service.api.auth import create_key
    from zoo import list_datasets, load_model

    with status("preparing zoo:digits-cnn (trained and cached on first use)"):
        load_model("zoo:digits-cnn")
    key, _ = create_key(sf, "demo", "bitsearch serve --demo")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    body = ('{"model": "zoo:digits-cnn", "data": "zoo:digits", '
            '"budgets": [{"metric": "avg_weight_bits", "value": 4}], "pareto_points": 6}')
    console.print(f"zoo models: {', '.join(s.ref for s in __import__('zoo').list_models())}")
    console.print(f"zoo data: {', '.join('zoo:' + d.name for d in list_datasets())}")
    console.print(f"service: {url}  (API docs: {url}/docs)")
    console.print("demo API key (tenant 'demo'):")
    print(key)
    console.print("start a search:")
    print(f"curl -s -X POST {url}/search -H 'Authorization: Bearer {key}' "
          f"-H 'Content-Type: application/json' -d '{body}'")
    console.print("then poll the 'url' it returns, and read <url>/pareto once its status is 'succeeded'.")
    console.print(f"dashboard: {url}/ (log in with the key above)")
    sys.stdout.flush()


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    workers: int = typer.Option(1, "--workers", min=0, max=64,
                                help="Local job worker processes (without a broker); 0: run none."),
    demo: bool = typer.Option(False, "--demo", help="Prepare the digits demo, create a key, print a curl example."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
    http_workers: int = typer.Option(1, "--http-workers", min=1, max=64,
                                     help="API processes (uvicorn workers) sharing the port."),
) -> None:
    """Run the REST service: uvicorn with the API; without BITSEARCH_BROKER_URL also local job workers and
    the cron scheduler in-process (with a broker, run `bitsearch worker` and celery beat beside it)."""
    import logging
    import os

    import torch
    import uvicorn

    from service.api.app import create_app
    from service.jobs.local import LocalPool
    from service.schedules import InProcessScheduler
    from service.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    from service.jobs.supervise import wait_for_database

    # migrate before anything else touches the database; wait for it (with back-off) if it is not up yet
    sf = wait_for_database(_sf, settings.db_wait_at_start)
    torch.set_num_threads(max(1, settings.api_torch_threads))
    if demo:
        _demo(sf, host, port)

    pool = scheduler = None
    if not settings.broker_url:
        if workers:
            pool = LocalPool(workers, db_url=settings.db_url, target=_serve_worker)
            pool.start()
            settings.serve_local_workers = workers  # /readyz then asks whether one of them can run jobs
            os.environ["BITSEARCH_SERVE_LOCAL_WORKERS"] = str(workers)  # the same for --http-workers N
        scheduler = InProcessScheduler(sf, settings.scheduler_interval)
        scheduler.start()
    import signal

    def _terminated(signum, frame):  # uvicorn re-raises SIGTERM after its graceful shutdown: stop the rest too
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminated)
    try:
        if http_workers == 1:
            api = create_app(settings, sf)
            api.state.freeze_gc = True  # see served_app
            from service.jobs.supervise import run_uvicorn

            config = uvicorn.Config(api, host=host, port=port, access_log=access_log, log_level="info",
                                    timeout_graceful_shutdown=2)
            run_uvicorn(config, pool.begin_stop if pool is not None else None)
        else:  # each process builds its own app from the same BITSEARCH_* environment (migrated above)
            uvicorn.run("service.api.app:served_app", factory=True, workers=http_workers, host=host,
                        port=port, access_log=access_log, log_level="info", timeout_graceful_shutdown=2)
    finally:
        if scheduler is not None:
            scheduler.stop_event.set()
        if pool is not None:
            pool.stop()


# `bitsearch worker` and Celery workers must know the service's "search" job kind too.
# The search, sensitivity and finetune commands live in their own module; importing it registers them.
from service import cli_search as _cli_search  # noqa: E402,F401  (registers sensitivity, search, finetune)
from service import cli_export as _cli_export  # noqa: E402,F401  (registers export, profile)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become a message on stderr and a non-zero exit."""
    warnings.simplefilter("ignore", UserWarning)  # zoo notes are printed as notes, not warnings
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here, not raising it
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
    return code if isinstance(code, int) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    # `python -m service.cli`: run the imported module, whose app has every command registered on it
    from service.cli import run as _run

    _run()
