"""Trial fan-out through real Celery workers on Redis: trials per minute of one study with 1, 2 and 4 Celery
worker processes, what they use of the CPU, and a worker SIGKILLed mid-trial.

    .venv/bin/python bench/trials_celery.py                       # 1, 2, 4 workers + the kill check
    .venv/bin/python bench/trials_celery.py --workers 1,2 --trials 16 --broker redis://127.0.0.1:6379/13

Each run is the service's own path: a job database (SQLite), `bitsearch worker` processes (Celery, the app's own
configuration in `service.jobs.celery_app`: solo pool, late ack, the watchdog that re-sends lost jobs) on a queue
of the run's own, and one "study-trials" job per worker submitted by `service.jobs.dispatch.submit_job` (the row,
then the Celery message). The study is the one `bench/bompnas.py --parts throughput` measures with local
processes (BOMP-NAS over the digits-cnn family, 60 float + 60 QAFT steps per trial, no budget, so every trial
trains), in an SQLite file. Run it with BITSEARCH_WORKER_NICE=0 to compare with the local-pool figure (whose
processes are not niced; a `bitsearch worker` lowers its priority by 10 by default, which on a shared machine
gives it a much smaller share of the CPU). The workers are started and ready before the clock starts (unlike the local pool
figure, whose wall time includes spawning the processes); each job still loads data and pretrained weights.

CPU: the CPU seconds of the worker processes during the run (psutil, user + system, children included) against
wall × cores, and the machine's busy share from /proc/stat over the same interval (other people's jobs too).

Kill check: two workers, one SIGKILLed (process group) while its job runs a trial; the surviving worker's
watchdog re-sends the lost job once its heartbeat is stale, the study fails the lost trial once (its heartbeat
stopped) and re-runs it with the same parameters. Counted: complete trials (must equal the total), trial rows,
re-runs, job attempts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import ROOT, machine, write_result  # noqa: E402

BIN = Path(sys.executable).parent / "bitsearch"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def busy_cpu() -> tuple[float, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, sum(t)


def tree_cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            for q in [p, *p.children(recursive=True)]:
                c = q.cpu_times()
                total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


class Stack:
    """A job database, a study file and N Celery worker processes on a queue of their own."""

    def __init__(self, tmp: Path, broker: str, workers: int, stale_after: float):
        self.tmp = tmp
        self.queue = f"trials-{uuid.uuid4().hex[:8]}"
        self.db = f"sqlite:///{tmp / 'jobs.db'}"
        self.env = {**os.environ, "BITSEARCH_DATABASE_URL": self.db, "BITSEARCH_BROKER_URL": broker,
                    "BITSEARCH_DATA_DIR": str(tmp / "data"), "BITSEARCH_HEARTBEAT_INTERVAL": "1",
                    "BITSEARCH_STALE_AFTER": str(stale_after), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}
        os.environ.update({k: self.env[k] for k in ("BITSEARCH_DATABASE_URL", "BITSEARCH_BROKER_URL",
                                                      "BITSEARCH_DATA_DIR", "BITSEARCH_STALE_AFTER")})
        from service.settings import get_settings

        get_settings.cache_clear()
        self.logs = [tmp / f"worker{i}.log" for i in range(workers)]
        self.procs = []
        for path in self.logs:
            fh = open(path, "w")
            self.procs.append(subprocess.Popen([str(BIN), "worker", "--queues", self.queue], env=self.env,
                                               stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                               cwd=ROOT))
        deadline = time.monotonic() + 180
        while not all("ready" in p.read_text() for p in self.logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit("the Celery workers did not start: " + self.logs[0].read_text()[-2000:])
            time.sleep(0.5)
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def make_study(url: str, name: str, trials: int) -> None:
    from search.solvers.bompnas import BompNasConfig, create

    create(url, name, BompNasConfig(train_steps=60, qaft_steps=60, batch_size=64), total_trials=trials,
           heartbeat_interval=5)


def study_rows(url: str, name: str) -> list:
    from search.trials import load_fanout_study

    study, _ = load_fanout_study(url, name)
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def submit_trial_jobs(stack: Stack, url: str, name: str, n: int) -> list[str]:
    from db.session import session_factory
    from service.jobs.dispatch import submit_job

    sf = session_factory(stack.db)
    return [submit_job(sf, "study-trials", {"storage": url, "study": name}, queue=stack.queue).id
            for _ in range(n)]


def wait_jobs(stack: Stack, ids: list[str], timeout: float, on_poll=None) -> list:
    from db import jobs as repo
    from db.session import session_factory

    sf = session_factory(stack.db)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [repo.get(sf, i) for i in ids]
        if all(j.status.finished for j in jobs):
            return jobs
        if on_poll is not None:
            on_poll(jobs)
        time.sleep(0.5)
    raise SystemExit(f"jobs not finished after {timeout} s")


def throughput(workers: int, trials: int, broker: str, tmp: Path) -> dict:
    run_dir = tmp / f"w{workers}"
    run_dir.mkdir()
    url, name = f"sqlite:///{run_dir / 'study.db'}", f"celery-{workers}"
    make_study(url, name, trials)
    stack = Stack(run_dir, broker, workers, stale_after=60)
    try:
        cpu0, (busy0, all0) = tree_cpu(stack.ps), busy_cpu()
        t = time.perf_counter()
        ids = submit_trial_jobs(stack, url, name, workers)
        jobs = wait_jobs(stack, ids, 3600)
        sec = time.perf_counter() - t
        cpu1, (busy1, all1) = tree_cpu(stack.ps), busy_cpu()
    finally:
        stack.stop()
    rows = study_rows(url, name)
    done = [r for r in rows if r.state.name == "COMPLETE"]
    span = (max(r.datetime_complete for r in done) - min(r.datetime_start for r in done)).total_seconds()
    cores = os.cpu_count() or 1
    out = {
        "workers": workers, "trials": len(rows), "complete": len(done),
        "per_job": [j.result.get("ran") if j.result else None for j in jobs],
        "job_status": [j.status.value for j in jobs], "seconds": sec,
        "trials_per_min": 60 * len(done) / sec, "first_start_to_last_end_s": span,
        "trials_per_min_after_startup": 60 * len(done) / span,
        "mean_trial_s": float(np.mean([r.user_attrs["seconds"] for r in done])),
        "worker_cpu_s": cpu1 - cpu0, "worker_cpu_share": (cpu1 - cpu0) / (sec * cores),
        "machine_busy_share": (busy1 - busy0) / max(1e-9, all1 - all0), "loadavg_end": os.getloadavg()[0],
    }
    log(f"{workers} Celery worker(s): {out['trials_per_min']:.1f} trials/min ({sec:.1f} s), per job "
        f"{out['per_job']}, worker CPU {out['worker_cpu_share']:.0%} of the machine, machine busy "
        f"{out['machine_busy_share']:.0%}")
    return out


def kill_check(trials: int, broker: str, tmp: Path) -> dict:
    from db import jobs as repo
    from db.session import session_factory

    run_dir = tmp / "kill"
    run_dir.mkdir()
    url, name = f"sqlite:///{run_dir / 'study.db'}", "celery-kill"
    make_study(url, name, trials)
    stack = Stack(run_dir, broker, 2, stale_after=10)
    killed: dict = {}
    try:
        ids = submit_trial_jobs(stack, url, name, 2)
        sf = session_factory(stack.db)

        def maybe_kill(jobs) -> None:
            if killed:
                return
            rows = study_rows(url, name)
            if sum(r.state.name == "COMPLETE" for r in rows) < 2:
                return
            running = [r for r in rows if r.state.name == "RUNNING"]
            for r in running:  # a trial mid-way: kill the worker whose job runs it
                job_id = str(r.user_attrs.get("worker", "")).split("-")[1] if r.user_attrs.get("worker") else None
                job = repo.get(sf, job_id) if job_id else None
                if job is None or not job.worker_id:
                    continue
                pid = int(job.worker_id.split(":")[2])
                proc = next((p for p in stack.procs if p.pid == pid), None)
                if proc is None:
                    continue
                os.killpg(proc.pid, signal.SIGKILL)
                killed.update(trial=r.number, job=job.id, pid=pid, at=time.perf_counter())
                log(f"SIGKILLed worker {pid} running trial {r.number} (job {job.id})")
                return

        t = time.perf_counter()
        jobs = wait_jobs(stack, ids, 3600, maybe_kill)
        sec = time.perf_counter() - t
    finally:
        stack.stop()
    rows = study_rows(url, name)
    states = [r.state.name for r in rows]
    retries = [r for r in rows if r.system_attrs.get("failed_trial") is not None]
    lost = next((r for r in rows if r.number == killed.get("trial")), None)
    out = {
        "total_trials": trials, "complete": states.count("COMPLETE"), "rows": len(rows), "failed": states.count("FAIL"),
        "retries": [{"of": r.system_attrs["failed_trial"], "number": r.number, "state": r.state.name,
                     "same_params": lost is not None and r.params == lost.params, "worker": r.user_attrs.get("worker")}
                    for r in retries],
        "killed": killed, "lost_trial_state": lost.state.name if lost is not None else None,
        "jobs": [{"id": j.id, "status": j.status.value, "attempts": j.attempts} for j in jobs], "seconds": sec,
    }
    ok = (out["complete"] == trials and killed and out["lost_trial_state"] == "FAIL" and len(retries) == 1
          and retries[0].state.name == "COMPLETE" and out["retries"][0]["same_params"])
    out["ok"] = bool(ok)
    log(f"kill check: {'OK' if ok else 'FAILED'}: {json.dumps(out)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--kill-trials", type=int, default=8, help="trials of the kill check (0: skip it)")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/13",
                    help="a Redis database of the bench's own (its queues are per run, too)")
    ap.add_argument("--out", default="trials-celery")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "BITSEARCH_WORKER_NICE") if k in os.environ)
    results: dict = {"machine": machine(),
                     "command": (env + " " if env else "") + "python bench/trials_celery.py " + " ".join(sys.argv[1:]),
                     "loadavg_start": os.getloadavg()[0], "throughput": [], "kill": None}
    with tempfile.TemporaryDirectory(prefix="bitsearch-trials-celery-") as d:
        tmp = Path(d)
        for w in counts:
            results["throughput"].append(throughput(w, args.trials, args.broker, tmp))
        if args.kill_trials:
            results["kill"] = kill_check(args.kill_trials, args.broker, tmp)
    results["loadavg_end"] = os.getloadavg()[0]
    write_result(f"{args.out}.json", json.dumps(results, indent=1, default=str))
    write_result(f"{args.out}.md", report(results, args))
    log("done")


def report(r: dict, args) -> str:
    base = next((x for x in r["throughput"] if x["workers"] == 1), None)
    rows = []
    for x in r["throughput"]:
        speed = f"{x['trials_per_min'] / base['trials_per_min']:.2f}×" if base else "—"
        rows.append(f"| {x['workers']} | {x['complete']}/{x['trials']} | {x['per_job']} | {x['seconds']:.1f} | "
                    f"{x['mean_trial_s']:.2f} | **{x['trials_per_min']:.1f}** | {x['trials_per_min_after_startup']:.1f} | "
                    f"{speed} | {x['worker_cpu_s']:.0f} ({x['worker_cpu_share']:.0%}) | {x['machine_busy_share']:.0%} | "
                    f"{x['loadavg_end']:.1f} |")
    k = r["kill"]
    lines = [
        "# Trial fan-out through Celery workers on Redis",
        "",
        f"Machine: {r['machine']}; load average {r['loadavg_start']:.1f} at the start, {r['loadavg_end']:.1f} at the "
        "end (other people's jobs share the cores: wall-clock figures are loaded).",
        f"Command: `{r['command']}`",
        "",
        "## Trials per minute, one study, Celery workers",
        "",
        f"BOMP-NAS digits-cnn family, 60 float + 60 QAFT steps per trial, {args.trials} trials, SQLite study and job "
        "database, one `study-trials` job per worker (`bitsearch worker`, Celery solo pool, Redis broker). Wall "
        "time from submitting the jobs to the last job finished; the workers were started and ready before.",
        "",
        "| workers | complete/rows | trials per job | wall s | mean trial s (in worker) | trials/min | "
        "trials/min, first trial start to last end | vs 1 worker | worker CPU s (share of all cores) | "
        "machine busy | load avg at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if k:
        lines += [
            "## A Celery worker SIGKILLed mid-trial",
            "",
            f"2 workers, {k['total_trials']} trials, job stale after 10 s, trial heartbeat 5 s (grace 10 s). Killed: "
            f"worker pid {k['killed'].get('pid')} while it ran trial {k['killed'].get('trial')}.",
            "",
            f"- complete trials: **{k['complete']} of {k['total_trials']}** ({k['rows']} trial rows, {k['failed']} "
            f"failed); the lost trial ended {k['lost_trial_state']}",
            f"- re-runs: {k['retries']}",
            f"- jobs: {k['jobs']}",
            f"- result: **{'no trial lost or counted twice' if k['ok'] else 'CHECK FAILED'}** ({k['seconds']:.0f} s)",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
