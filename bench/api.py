"""REST service throughput and latency under 50 concurrent clients while a fine-tuning job runs.

    .venv/bin/python bench/api.py [--clients 50] [--get-requests 3000] [--post-requests 1000] [--seconds 60]
                                  [--database-url postgresql://...]

Starts `bitsearch serve --workers 0` (uvicorn; SQLite under a temporary data dir unless --database-url) as a
subprocess on 127.0.0.1 and one local worker process beside it (`work_loop`, which also knows a "bench-cpu"
job kind), makes an API key, runs one small search to have something to fine-tune, then queues a QAT
fine-tuning job of its recommended point as the background load; if the "qat" kind cannot run here, a
"bench-cpu" job instead (torch matrix products on every core, as training would). While it runs, and once
before with the worker paused (idle), measures:

* `GET /searches/{id}`: requests per second and p50/p99 latency, `--clients` concurrent httpx clients;
* `POST /search` acceptance (validation, the search row, the queued job, 202): the same; the accepted
  searches are cancelled afterwards, not run.

Each phase stops at its request count or after `--seconds`, whichever comes first. Writes the table, the
command, the machine and its load average (it may be shared) to bench/results/api.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import machine, write_result  # noqa: E402

CPU_KIND = "bench-cpu"


def _register_cpu_kind() -> None:
    from service.jobs.kinds import KINDS, JobOutput, register_kind

    if CPU_KIND in KINDS:
        return

    @register_kind(CPU_KIND)
    def burn(spec, ctx):  # a stand-in for training: dense float work on every core until done or cancelled
        import torch

        a = torch.randn(512, 512)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < spec.get("seconds", 600):
            for _ in range(20):
                a = torch.tanh(a @ a.T / 512)
            n += 20
            ctx.progress((time.monotonic() - t0) / spec.get("seconds", 600), f"{n} matmuls")
        return JobOutput({"matmuls": n})


def worker_main(db_url: str) -> None:
    """The bench's worker process: the service's kinds plus "bench-cpu"."""
    from service.api import search_job  # noqa: F401
    from service.jobs.local import lower_priority, work_loop
    from service.settings import get_settings

    _register_cpu_kind()
    lower_priority(get_settings().worker_nice)  # as `bitsearch serve` and `bitsearch worker` do
    work_loop(db_url=db_url)


SMALL_SEARCH = {
    "model": "zoo:digits-mlp",
    "data": "zoo:digits",
    "options": {"weight_bits": [2, 4, 8]},
    "sensitivity": {"method": "fisher"},  # the workload the recorded figures ran (the API's default was fisher)
    "budgets": [{"metric": "avg_weight_bits", "value": 4}],
    "pareto_points": 3,
    "eval_limit": 200,
    "calib_size": 64,
}
POSTED = {
    "model": "zoo:digits-cnn",
    "data": "zoo:digits",
    "budgets": [{"metric": "avg_weight_bits", "value": "4bits"}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


async def load(
    url: str,
    method: str,
    headers: dict,
    body: dict | None,
    clients: int,
    total: int,
    seconds: float,
    rate: float | None = None,
) -> dict:
    """`clients` concurrent clients (one aiohttp session and keep-alive connection each) share `total`
    requests.

    rate None: closed loop, each client sends its next request as soon as the last one answered (the
    service's saturation throughput; by Little's law its mean latency is then clients / throughput).
    rate R: the clients together send R requests/s on a fixed schedule (each client every clients/R s), and a
    request's latency counts from its scheduled time, so a slow answer also charges the requests it
    delayed (no coordinated omission)."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[int, int] = {}
    remaining = [total]
    start = time.perf_counter()
    deadline = start + seconds
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {**headers, **({"Content-Type": "application/json"} if data is not None else {})}

    async def client(i: int) -> None:
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, headers=hdrs) as c:
            n = 0
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                if rate:
                    due = start + (i + n * clients) / rate  # client i's n-th slot, clients spread evenly
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    due = time.perf_counter()
                n += 1
                async with c.request(method, url, data=data) as r:
                    await r.read()
                    status = r.status
                latencies.append(time.perf_counter() - due)
                if status >= 300:
                    errors[status] = errors.get(status, 0) + 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    return {
        "n": len(latencies),
        "wall": wall,
        "rps": len(latencies) / wall,
        "p50": percentile(latencies, 50) * 1e3,
        "p99": percentile(latencies, 99) * 1e3,
        "max": max(latencies) * 1e3 if latencies else float("nan"),
        "errors": errors,
    }


def wait_for(pred, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--get-requests", type=int, default=3000)
    ap.add_argument("--post-requests", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0, help="Upper bound on each measured phase.")
    ap.add_argument(
        "--rates",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[100.0, 200.0, 400.0],
        help="Offered loads (requests/s, all clients together) of the paced phases; '' for none.",
    )
    ap.add_argument("--paced-seconds", type=float, default=10.0, help="Length of each paced phase.")
    ap.add_argument("--http-workers", type=int, default=1, help="`bitsearch serve --http-workers`.")
    ap.add_argument("--out", default="api.md", help="file name under bench/results/")
    ap.add_argument("--database-url", default=None, help="PostgreSQL URL (default: SQLite in a temp dir).")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary data dir.")
    args = ap.parse_args()

    from db import jobs as job_repo
    from db.session import session_factory
    from service.jobs.dispatch import submit_job
    from service.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="bitsearch-bench-api-"))
    worker_nice = Settings(data_dir=data_dir).worker_nice
    env = {**os.environ, "BITSEARCH_DATA_DIR": str(data_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("BITSEARCH_BROKER_URL", None)
    if args.database_url:
        env["BITSEARCH_DATABASE_URL"] = args.database_url
    else:
        env.pop("BITSEARCH_DATABASE_URL", None)
    db_url = args.database_url or f"sqlite:///{data_dir / 'bitsearch.db'}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "0",
            "--http-workers",
            str(args.http_workers),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "server.log", "w"),
    )
    worker = None
    results: list[tuple[str, str, dict]] = []
    try:
        http = httpx.Client(base_url=base, timeout=60.0)

        def ready():
            try:
                return http.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 180, "the server to start")
        sf = session_factory(db_url)
        worker = subprocess.Popen(
            [sys.executable, "-c", f"import bench.api as b; b.worker_main({db_url!r})"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(data_dir / "worker.log", "w"),
        )
        keys = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", "bench"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = [l for l in keys.stdout.splitlines() if l.startswith("bsk_")][0]
        h = {"Authorization": f"Bearer {key}"}

        def status(url):
            return http.get(url, headers=h).json()["status"]

        def drop_queued_searches():
            for j in job_repo.list_jobs(sf, status="queued", kind="search", limit=100_000):
                job_repo.cancel(sf, j.id)

        first = http.post("/search", json=SMALL_SEARCH, headers=h).json()
        state = wait_for(
            lambda: status(first["url"]) in ("succeeded", "failed") and status(first["url"]),
            600,
            "the first search",
        )

        def phases(label: str) -> None:
            for name, url, method, body, total in (
                ("`GET /searches/{id}`", first["url"], "GET", None, args.get_requests),
                ("`POST /search` (202)", f"{base}/search", "POST", POSTED, args.post_requests),
            ):
                for rate in [None, *args.rates]:
                    n = total if rate is None else int(rate * args.paced_seconds)
                    r = asyncio.run(load(url, method, h, body, args.clients, n, args.seconds, rate))
                    results.append((label, name, "saturation" if rate is None else f"{rate:g}/s", r))
                    drop_queued_searches()  # the accepted searches are not run: they would load the worker

        # 1. idle: the worker is paused, so nothing but the API runs
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            phases("idle")
        finally:
            os.kill(worker.pid, signal.SIGCONT)

        # 2. while a fine-tuning job (or a CPU-bound stand-in) runs in the worker
        background = None
        if state == "succeeded":
            # far more steps than the measurements last: the job runs throughout, then it is cancelled
            recipe = {"steps": 1_000_000, "lr": 1e-4, "eval_every": 0}
            r = http.post(f"/searches/{first['id']}/finetune", json={"recipe": recipe}, headers=h)
            if r.status_code == 202:
                job_id = r.json()["jobs"][0]["job_id"]
                time.sleep(5)
                if job_repo.get(sf, job_id).status.value in ("queued", "running"):
                    background = (
                        "QAT fine-tuning of the recommended zoo:digits-mlp point (job kind qat)",
                        job_id,
                    )
        if background is None:
            _register_cpu_kind()
            job = submit_job(
                sf,
                CPU_KIND,
                {"seconds": 3 * args.seconds + 120},
                settings=Settings(data_dir=data_dir, database_url=db_url),
            )
            background = (
                "a CPU-bound stand-in for training, torch matrix products on every core (the qat kind "
                "could not run here)",
                job.id,
            )
        what, job_id = background
        wait_for(lambda: job_repo.get(sf, job_id).status.value == "running", 300, "the background job")
        phases("during the job")
        job_after = job_repo.get(sf, job_id)
        job_repo.cancel(sf, job_id)
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
        for proc in (worker, server):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    load_after = os.getloadavg()

    db = "PostgreSQL" if args.database_url else "SQLite (WAL)"
    cmd = "python bench/api.py " + " ".join(sys.argv[1:])
    procs = "one process" if args.http_workers == 1 else f"{args.http_workers} processes"
    lines = [
        "# REST API under load",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the "
        "run (the machine may be shared).  ",
        f"Server: `bitsearch serve --workers 0 --http-workers {args.http_workers}` (uvicorn, {procs}) and one "
        f"local worker process (niceness {worker_nice}), {db}, 127.0.0.1; {args.clients} concurrent clients "
        "(aiohttp, one keep-alive connection each) in one process on the same machine.  ",
        f"Background job: {what}; it was {job_after.status.value} at the end of the measurements "
        f"({job_after.progress * 100:.1f} % done; cancelled then). Idle: the worker process paused.  ",
        "Load: *saturation* = closed loop, each client sends its next request when the last one answered "
        "(mean latency = clients / throughput); *N/s* = the clients together offer N requests/s on a fixed "
        "schedule, latency counted from each request's scheduled time.",
        "",
        "| endpoint | worker | load | requests | seconds | requests/s | p50 ms | p99 ms | max ms | non-2xx |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, name, mode, r in results:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(
            f"| {name} | {label} | {mode} | {r['n']} | {r['wall']:.1f} | {r['rps']:.0f} | {r['p50']:.1f} | "
            f"{r['p99']:.1f} | {r['max']:.1f} | {errs} |"
        )
    lines += [
        "",
        "Each accepted `POST /search` is one write transaction (the search row, its queued job and their "
        "link); the accepted searches were cancelled, not run.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"wrote {write_result(args.out, text)}")


if __name__ == "__main__":
    main()
