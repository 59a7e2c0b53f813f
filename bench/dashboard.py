"""Dashboard page load: a finished search with 200 Pareto points and 100 layers, opened in headless Chromium.

    .venv/bin/python bench/dashboard.py [--runs 9] [--points 200] [--layers 100] [--trials 200] [--chromium PATH]

Serves the app (uvicorn in this process, SQLite in a temporary folder), seeds one finished search straight
into the database (a synthetic sensitivity table, front and allocations, stored by `persist_outcome` as a
real search's are) and logs in. Each of `--runs` runs opens a fresh browser context (an empty cache: the
first load fetches, compiles and runs Plotly.js) and loads the search's page three times in a row (the later
ones from the browser's cache). A load's time runs from the navigation's start to the moment the page's
script has drawn the front, the sensitivity heatmap and the recommended point's allocation chart
(`window.dashboardRenderedAt`, a `performance.now()` reading). Writes the median, maximum and minimum of
each load, the command and the machine to bench/results/dashboard.md.

A second seeded search is a BOMP-NAS one whose study holds `--trials` finished trials (synthetic architectures
and bits, in the service's study storage as the search job writes them): its page adds the trial scatter, and
the time of the `/ui/api/searches/{id}/trials` request the page polls is measured too (the server reading the
study and shaping the chart's data).

The helpers (server, seeding, measurement) are shared with tests/test_dashboard.py.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
LOADS = ("first (cold cache)", "second", "third (warm cache)")  # each run's loads, in one browser context
SEEDED_QUEUE = "seeded"  # jobs of seeded searches: no worker listens here, so none ever runs them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app served by uvicorn on 127.0.0.1 in a background thread (stop() ends it)."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard-server", daemon=True)

    def start(self, timeout: float = 30.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def synthetic_outcome(points: int, layers: int, seed: int = 0):
    """A `SearchResult` as `run_search` returns it: a sensitivity table over `layers` convolutions and four
    bit options, `points` mixed-precision allocations (costed by the real CostModel) and the four uniform
    baselines."""
    from bitsearch import Recommendation, SearchResult, SearchSpec
    from quant.allocation import Allocation, LayerBits
    from search import Budget
    from search.pareto import ParetoFront, ParetoPoint
    from quant.cost import CostModel
    from quant.layers import LayerInfo
    from sensitivity.table import SensitivityTable

    rng = random.Random(seed)
    infos, size, channels = [], 32, 16
    for i in range(layers):
        c_in, c_out = channels, channels * (2 if i and i % (layers // 3 or 1) == 0 else 1)
        if c_out != c_in:
            size = max(4, size // 2)
        params = c_out * c_in * 9
        infos.append(
            LayerInfo(f"stage{i // 10}.conv{i % 10}", "Conv2d", (c_out, c_in, 3, 3), params, False,
                      params * size * size, (c_in, size, size), (c_out, size, size), out_channels=c_out)
        )
        channels = c_out
    options = [LayerBits(w, 8) for w in (2, 3, 4, 8)]
    values = [[rng.lognormvariate(0, 1) * 4.0 ** -(w - 2) for w in (2, 3, 4, 8)] for _ in infos]
    table = SensitivityTable("hessian", infos, options, values)
    cost = CostModel(infos)

    def point(kind: str, choice: list[int], label: str | None) -> ParetoPoint:
        alloc = Allocation({l.name: options[c] for l, c in zip(infos, choice)}, model="synthetic")
        predicted = sum(values[i][c] for i, c in enumerate(choice))
        metrics = cost.cost(alloc).metrics()
        top1 = 92.0 - 6.0 * math.log1p(predicted) + rng.uniform(-0.3, 0.3)
        return ParetoPoint(
            allocation=alloc, predicted=predicted, metrics={k: v for k, v in metrics.items() if v is not None},
            kind=kind, budget=metrics["avg_weight_bits"] if kind == "mixed" else None, optimal=True, label=label,
            measured={"n": 1000, "top1": top1, "agreement": top1 + 1.0, "loss": 0.3 + predicted / 100},
        )

    mixed = []
    for k in range(points):  # from all 2-bit to all 8-bit, one more layer raised at each step
        level = 3 * k / max(1, points - 1)
        choice = [min(3, int(level) + (1 if rng.random() < level % 1 else 0)) for _ in infos]
        mixed.append(point("mixed", choice, None))
    mixed.sort(key=lambda p: p.metrics["avg_weight_bits"])
    uniform = [point("uniform", [c] * len(infos), options[c].label()) for c in range(len(options))]
    best = min((p for p in mixed if p.metrics["avg_weight_bits"] <= 4), key=lambda p: p.predicted,
               default=mixed[0])
    front = ParetoFront("avg_weight_bits", mixed, uniform, "ilp", "hessian")
    budget = Budget("avg_weight_bits", 4.0)
    return SearchResult(SearchSpec(model="zoo:cifar-resnet20", budgets=[{"metric": "avg_weight_bits", "value": 4}]),
                        "zoo:cifar-resnet20", table, front, [Recommendation(mixed.index(best), [budget], True, best)])


def seed_search(sf, tenant_id: str, outcome, model: str = "zoo:cifar-resnet20", **request_extra) -> str:
    """A finished search of `tenant_id` holding `outcome`, stored as the service stores a real one
    (`request_extra`: more fields of its stored request, e.g. the `latency_table` it was given)."""
    from db import jobs as job_repo
    from db import repo
    from db.models import new_id
    from service.api.search_job import persist_outcome

    request = {"model": model, "data": None, "budgets": [{"metric": "avg_weight_bits", "value": 4}], **request_extra}
    search, _ = repo.create_search(
        sf, search_id=new_id(), tenant_id=tenant_id, model_ref=model, data_ref=None, request=request, spec={}
    )
    job = job_repo.submit(sf, "search", {}, SEEDED_QUEUE, 1)
    repo.link_job(sf, search.id, job.id, tenant_id, "search")
    counts = persist_outcome(sf, search.id, outcome)
    assert job_repo.claim(sf, "seed", job_id=job.id) is not None
    assert job_repo.complete(sf, job.id, "seed", {"search_id": search.id, **(counts or {})})
    return search.id


def seed_running_search(sf, tenant_id: str, request: dict) -> str:
    """A search of `tenant_id` whose job a worker has claimed and runs (on a queue no worker takes, so it
    stays running): what its page shows before any result."""
    from db import jobs as job_repo
    from db import repo
    from db.models import new_id

    model = request["model"]
    search, _ = repo.create_search(sf, search_id=new_id(), tenant_id=tenant_id, model_ref=model,
                                   data_ref=request.get("data"), request=request, spec={})
    job = job_repo.submit(sf, "search", {}, SEEDED_QUEUE, 1)
    repo.link_job(sf, search.id, job.id, tenant_id, "search")
    assert job_repo.claim(sf, "seed", job_id=job.id) is not None
    return search.id


def study_storage_of(sf):
    """The Optuna storage in which the service keeps the studies of searches stored through `sf`."""
    from search.study_storage import make_storage
    from service.measured_search import study_url

    return make_storage(study_url(sf.kw["bind"].url.render_as_string(hide_password=False)))


def add_synthetic_trials(storage, search_id: str, n: int, seed: int = 0, failed: int = 0,
                         over_budget: int = 0, total: int | None = None) -> None:
    """Add `n` finished trials to the BOMP-NAS study of `search_id` (created, as the search job creates it, on
    the first call): measured trials of digits-MLP-like architectures (width, depth) with per-layer bits, whose
    top-1 grows with the weight memory plus noise, then `failed` failed trials and `over_budget` trials that
    were costed but not measured. `total`: the study's `total_trials` (default: the trials added)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from quant.allocation import Allocation, LayerBits

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=f"search-{search_id}",
                                directions=["maximize", "minimize"], load_if_exists=True)
    if "bitsearch.fanout" not in study.user_attrs:
        study.set_user_attr("bitsearch.objective", {"kind": "bomp-nas", "config": {"cost_metric": "weight_memory"}})
        study.set_user_attr("bitsearch.fanout", {"total_trials": total or n + failed + over_budget})
    rng = random.Random(seed * 7919 + len(study.trials))
    widths, depths, bit_options = (0.125, 0.25, 0.5, 1.0), (1, 2, 3), (2, 3, 4, 8)
    for k in range(n + failed + over_budget):
        width, depth = rng.choice(widths), rng.choice(depths)
        names = [f"fc{i + 1}" for i in range(depth + 1)]
        bits = {name: rng.choice(bit_options) for name in names}
        dists = {"width": CategoricalDistribution(widths), "depth": CategoricalDistribution(depths),
                 **{f"bits.{i}": CategoricalDistribution(bit_options) for i in range(4)}}
        params = {"width": width, "depth": depth,
                  **{f"bits.{i}": bits.get(f"fc{i + 1}", 8) for i in range(4)}}
        sizes = [64 * int(128 * width)] + [int(128 * width) ** 2] * (depth - 1) + [int(128 * width) * 10]
        memory = float(sum(p * bits[name] for p, name in zip(sizes, names)))
        metrics = {"weight_memory": memory, "avg_weight_bits": memory / sum(sizes), "bops": memory * 64.0}
        attrs = {"arch": {"width": width, "depth": depth},
                 "allocation": Allocation({nm: LayerBits(b, 8) for nm, b in bits.items()}, model="synthetic").to_dict(),
                 "metrics": metrics, "measured": True, "worker": f"job-{k % 3}", "seconds": rng.uniform(5, 30)}
        if k < n:
            top1 = min(99.0, 70.0 + 4.0 * math.log2(memory / 4096.0) + rng.gauss(0, 2.0))
            trial = create_trial(state=TrialState.COMPLETE, values=[top1, memory], params=params,
                                 distributions=dists, user_attrs=attrs)
        elif k < n + failed:
            trial = create_trial(state=TrialState.FAIL, params=params, distributions=dists,
                                 user_attrs={**attrs, "measured": False, "error": "trial ran past its timeout"})
        else:
            trial = create_trial(state=TrialState.COMPLETE, values=[0.0, memory], params=params,
                                 distributions=dists, user_attrs={**attrs, "measured": False})
        study.add_trial(trial)


def synthetic_bits_history(layers: list[str], steps: int, every_k: int = 25, seed: int = 0) -> list[dict]:
    """A QBitOpt history as `search.solvers.qbitopt.QBitOptCallback` records it: every `every_k` steps the
    allocation, the layers that changed and the predicted objective."""
    rng = random.Random(seed)
    current = {n: 4 for n in layers}
    out = []
    for i in range(1, steps + 1):
        changed = []
        if i > 1:
            for n in rng.sample(layers, k=min(len(layers), 2)):
                new = rng.choice((2, 3, 4, 8))
                if new != current[n]:
                    current[n] = new
                    changed.append(n)
        out.append({"step": i * every_k, "objective_before": 1.0 / i, "objective_after": 0.9 / i,
                    "changed": changed, "allocation": {n: f"W{b}A8" for n, b in current.items()}, "seconds": 0.01})
    return out


def log_in(page, base_url: str, key: str) -> None:
    page.goto(f"{base_url}/ui/login")
    page.fill("#api-key", key)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{base_url}/ui/")


def measure_page_load(page, url: str, timeout_ms: float = 60_000) -> float:
    """Milliseconds from the navigation's start until the search page's charts are drawn."""
    page.goto(url)
    # a selector, not wait_for_function: the page's Content-Security-Policy forbids the eval that needs
    page.wait_for_selector("body[data-rendered='1']", timeout=timeout_ms)
    return float(page.evaluate("window.dashboardRenderedAt"))


def measure_plotly_alone(page, base_url: str) -> float:
    """Milliseconds until a blank page of the server's origin has fetched and run the served Plotly.js."""
    from service.dashboard.routes import static_url

    blank = f"{base_url}/bench-blank"  # answered by the browser itself, so the script's URL is same-origin
    html = (
        f'<script src="{static_url("plotly.min.js")}"></script>'
        "<script>window.done = performance.now()</script>"
    )
    page.route(blank, lambda route: route.fulfill(body=html, content_type="text/html"))
    page.goto(blank)
    page.wait_for_load_state("load")
    return float(page.evaluate("window.done"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--chromium", default=CHROMIUM)
    args = ap.parse_args()

    import httpx
    from playwright.sync_api import sync_playwright

    from bench._common import machine, write_result
    from service.api.app import create_app
    from service.api.auth import create_key
    from service.settings import Settings
    from db.session import make_engine, migrate
    from sqlalchemy.orm import sessionmaker

    with tempfile.TemporaryDirectory(prefix="bitsearch-bench-dashboard-") as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        migrate(engine)
        sf = sessionmaker(engine, expire_on_commit=False)
        key, tenant = create_key(sf, "bench")
        t0 = time.perf_counter()
        search_id = seed_search(sf, tenant, synthetic_outcome(args.points, args.layers))
        seed_s = time.perf_counter() - t0
        solver = {"name": "bomp-nas", "settings": {"total_trials": args.trials}}
        trials_id = seed_search(sf, tenant, synthetic_outcome(20, 4), model="zoo:digits-mlp", solver=solver)
        running_id = seed_running_search(sf, tenant, {"model": "zoo:digits-mlp", "data": "zoo:digits",
                                                      "solver": solver})
        storage = study_storage_of(sf)
        for sid in (trials_id, running_id):  # the same trials in both studies
            add_synthetic_trials(storage, sid, n=args.trials - args.trials // 20, failed=args.trials // 40,
                                 over_budget=args.trials // 20 - args.trials // 40)
        # CPU time of the service reading the study (fairer than wall time on a shared machine)
        from service import trial_views

        settings = Settings(data_dir=Path(tmp) / "data")
        reader_cpu: dict[str, list[float]] = {"finished": [], "running": []}
        for kind, sid in (("finished", trials_id), ("running", running_id)):
            trial_views.search_trials(sf, settings, tenant, sid)  # opens the storage (and fills the cache)
            for _ in range(args.runs):
                c0 = time.process_time()
                trial_views.search_trials(sf, settings, tenant, sid)
                reader_cpu[kind].append(1e3 * (time.process_time() - c0))
        trial_loads: list[list[float]] = [[], []]
        trials_api: dict[str, list[float]] = {"finished": [], "running": []}
        server = LiveServer(create_app(Settings(data_dir=Path(tmp) / "data"), sf)).start()
        times: list[list[float]] = [[] for _ in LOADS]
        plotly_alone: list[float] = []
        via_list: list[float] = []
        load_before = os.getloadavg()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
                search_url = f"{server.url}/ui/searches/{search_id}"
                for _ in range(args.runs):
                    # straight to the search page, the session cookie set by hand: nothing cached at all
                    context = browser.new_context(viewport={"width": 1366, "height": 768})
                    context.add_cookies([{"name": "bitsearch_key", "value": key, "url": server.url,
                                          "httpOnly": True, "secure": True, "sameSite": "Strict"}])
                    page = context.new_page()
                    for series in times:
                        series.append(measure_page_load(page, search_url))
                    context.close()
                    # as a user arrives: log in, the searches list (which prefetches Plotly.js), then the search
                    context = browser.new_context(viewport={"width": 1366, "height": 768})
                    page = context.new_page()
                    log_in(page, server.url, key)
                    page.wait_for_load_state("networkidle")
                    via_list.append(measure_page_load(page, search_url))
                    context.close()
                    context = browser.new_context()
                    plotly_alone.append(measure_plotly_alone(context.new_page(), server.url))
                    context.close()
                    # the BOMP-NAS search with its trial scatter: cold, then from the cache
                    context = browser.new_context(viewport={"width": 1366, "height": 768})
                    context.add_cookies([{"name": "bitsearch_key", "value": key, "url": server.url,
                                          "httpOnly": True, "secure": True, "sameSite": "Strict"}])
                    page = context.new_page()
                    for series in trial_loads:
                        series.append(measure_page_load(page, f"{server.url}/ui/searches/{trials_id}"))
                    shown = page.evaluate("document.getElementById('trials-chart').data"
                                          ".reduce((n, t) => n + t.x.length, 0)")
                    assert shown == args.trials - args.trials // 20, shown
                    context.close()
                    with httpx.Client(base_url=server.url, cookies={"bitsearch_key": key}) as http:
                        for kind, sid in (("finished", trials_id), ("running", running_id)):
                            t0 = time.perf_counter()
                            assert http.get(f"/ui/api/searches/{sid}/trials").status_code == 200
                            trials_api[kind].append(1e3 * (time.perf_counter() - t0))
                version = browser.version
                browser.close()
        finally:
            server.stop()
        load_after = os.getloadavg()

    cmd = "python bench/dashboard.py " + " ".join(sys.argv[1:])
    lines = [
        "# Dashboard page load",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}; headless Chromium {version}, 1366×768 viewport, server (uvicorn) and browser "
        f"on the same machine; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the "
        "run (the machine may be shared).  ",
        f"Page: a finished search with {args.points} Pareto points (plus 4 uniform baselines) and "
        f"{args.layers} layers × 4 bit options (seeded in {seed_s:.1f} s). Time from the navigation's start "
        "until the front, the sensitivity heatmap and the recommended point's allocation chart are drawn. "
        f"Each of the {args.runs} runs opens a fresh browser context (an empty cache) and loads the page "
        "three times in a row, straight away; then another fresh context logs in, waits on the searches "
        "list (every page but a search's prefetches Plotly.js) and opens the search.",
        "",
        "| load | median ms | max ms | min ms | each, ms |",
        "|---|---:|---:|---:|---|",
    ]
    for label, series in [*zip(LOADS, times),
                          ("first, opened from the searches list after logging in (new browser context)", via_list),
                          (f"BOMP-NAS search with {args.trials} trials (scatter) and a 20-point front, first "
                           "(cold cache)", trial_loads[0]),
                          ("the same, second", trial_loads[1]),
                          (f"`GET /ui/api/searches/{{id}}/trials` of that search ({args.trials} trials), as seen "
                           "by the client", trials_api["finished"]),
                          ("the same request for a running search with the same trials (what the page polls "
                           "every 2 s; finished trials cached)", trials_api["running"]),
                          (f"CPU time of reading a finished search's {args.trials} trials "
                           "(`service.trial_views.search_trials`, every trial read afresh)", reader_cpu["finished"]),
                          ("CPU time of the same for a running search (finished trials cached)", reader_cpu["running"]),
                          ("for comparison: a blank page with `plotly.min.js` alone, cold cache", plotly_alone)]:
        each = ", ".join(f"{t:.0f}" for t in series)
        lines.append(
            f"| {label} | {statistics.median(series):.0f} | {max(series):.0f} | {min(series):.0f} | {each} |"
        )
    lines += [
        "",
        "Most of a first load is Chromium compiling and running the 4.8 MB `plotly.min.js` of the installed "
        "`plotly` package; it is served with `Cache-Control: immutable` under a content-versioned URL, so "
        "later loads take it from the browser's cache (and, from the third, its compiled code too), and every "
        "other page prefetches it, so a user who comes from the login or the searches list finds it cached.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print("wrote", write_result("dashboard.md", text))


if __name__ == "__main__":
    main()
