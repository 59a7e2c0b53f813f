"""The web dashboard in a real browser: headless Chromium (Debian's `/usr/bin/chromium`) driven by Playwright
against the app served by uvicorn on 127.0.0.1, with an in-process worker that runs the real search and
fine-tuning jobs. Screenshots of every page go to test-artifacts/.

One server, one browser and one real search (zoo:digits-mlp, small settings) are shared by the module.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from bench.dashboard import (
    CHROMIUM,
    LiveServer,
    add_synthetic_trials,
    log_in,
    measure_page_load,
    seed_running_search,
    seed_search,
    study_storage_of,
    synthetic_bits_history,
    synthetic_outcome,
)
from db import jobs as job_repo
from quant.allocation import Allocation
from service.api.app import create_app
from service.api.auth import create_key
from service.settings import Settings, get_settings
from tests.helpers import make_sf

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
VIEWPORT = {"width": 1366, "height": 768}  # a laptop screen
SEARCH_WAIT_MS = 240_000  # the real search, on a busy two-core machine


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def upload(name: str, content: bytes) -> dict:
    return {"name": name, "mimeType": "application/octet-stream", "buffer": content}


def same_text(a: str, b: str) -> bool:
    part = re.compile(r"[0-9a-f]{32}\.part")
    return part.sub("<upload>", a) == part.sub("<upload>", b)


def csrf_of(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


def _worker(stop: threading.Event, gate: threading.Event, db_url: str) -> None:
    """A local worker on the test database (the claim/execute steps of `work_loop`): stoppable, and it takes
    no job while `gate` is clear, so a test can watch a search stay queued and then finish."""
    from db.session import session_factory
    from service.api import search_job  # noqa: F401  (the "search" kind)
    from service.jobs.runner import execute, worker_name

    sf = session_factory(db_url)
    me = worker_name("dashboard-test")
    while not stop.is_set():
        job = job_repo.claim(sf, me, ["cpu"]) if gate.is_set() else None
        if job is None:
            stop.wait(0.1)
            continue
        execute(sf, job, me)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    sf = make_sf("sqlite", tmp)
    db_url = sf.kw["bind"].url.render_as_string(hide_password=False)
    key_a, tenant_a = create_key(sf, "alice")
    key_b, _ = create_key(sf, "bob")
    stop, gate = threading.Event(), threading.Event()
    gate.set()
    with pytest.MonkeyPatch.context() as mp:
        # the job kinds build their own settings from the environment: the same database, quick heartbeats
        mp.setenv("BITSEARCH_DATABASE_URL", db_url)
        mp.setenv("BITSEARCH_HEARTBEAT_INTERVAL", "0.2")
        get_settings.cache_clear()
        server = LiveServer(create_app(Settings(data_dir=tmp / "data", heartbeat_interval=0.2), sf)).start()
        worker = threading.Thread(target=_worker, args=(stop, gate, db_url), name="worker", daemon=True)
        worker.start()
        try:
            yield SimpleNamespace(
                url=server.url, sf=sf, key_a=key_a, key_b=key_b, tenant_a=tenant_a, gate=gate
            )
        finally:
            stop.set()
            server.stop()
            worker.join(60)
            get_settings.cache_clear()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def script_errors():
    """Uncaught errors and Content-Security-Policy violations in the pages of tenant A's browser."""
    return []


@pytest.fixture(scope="module")
def alice(live, browser, script_errors):
    """A logged-in page of tenant A (one context for the module, as one person's browser)."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: script_errors.append(msg.text)
        if msg.type == "error" and "Content Security Policy" in msg.text
        else None,
    )
    log_in(page, live.url, live.key_a)
    yield page
    context.close()


@pytest.fixture(scope="module")
def digits_search(live, alice):
    """A search started from the dashboard's form, watched on the searches list and on its own page (neither
    reloaded by the test) until the page shows its results."""
    page = alice
    live.gate.clear()  # the search stays queued until both pages have shown it so
    page.goto(f"{live.url}/ui/")
    form = page.locator("#search-form")
    form.locator("select[name=model]").select_option("zoo:digits-mlp")
    form.locator("select[name=data]").select_option("zoo:digits")
    form.locator("input[name=budget_value]").fill("4")
    form.locator("input[name=pareto_points]").fill("3")
    form.locator("input[name=weight_bits]").fill("2,4,8")
    form.locator("input[name=calib_size]").fill("64")
    form.locator("input[name=eval_limit]").fill("200")
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/ui/searches/[0-9a-f]{32}$"))
    search_id = page.url.rsplit("/", 1)[1]
    try:
        assert page.get_attribute("#search-summary", "data-status") == "queued"
        shot(page, "search-queued")
        listing = page.context.new_page()
        listing.goto(f"{live.url}/ui/")
        row = listing.locator(f"tr[data-search='{search_id}']")
        assert row.get_attribute("data-status") == "queued"
    finally:
        live.gate.set()
    # The list polls while a search is active: its row turns succeeded without a reload.
    finished = listing.locator(f"tr[data-search='{search_id}'][data-status='succeeded']")
    finished.wait_for(timeout=SEARCH_WAIT_MS)
    listing.close()
    # So does the search's page, which redraws itself with the results when the search has ended.
    page.wait_for_selector("#front-chart.js-plotly-plot", timeout=SEARCH_WAIT_MS)
    page.wait_for_selector("body[data-rendered='1']")
    return SimpleNamespace(page=page, id=search_id)


# --- login, cookie, CSRF, tenants -------------------------------------------------------------------------


def test_login_refuses_a_wrong_key_and_sets_a_strict_http_only_cookie(live, browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{live.url}/ui/models")
    assert "/ui/login" in page.url  # no session: the login page, which returns here afterwards
    wrong = live.key_a[:-4] + ("AAAA" if not live.key_a.endswith("AAAA") else "BBBB")
    page.fill("#api-key", wrong)
    page.click("#login-form button[type=submit]")
    assert page.locator(".field-error").inner_text() == "invalid or revoked API key"
    assert not context.cookies()
    shot(page, "login-refused")
    page.fill("#api-key", live.key_a)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{live.url}/ui/models")
    (cookie,) = context.cookies()
    assert cookie["name"] == "bitsearch_key" and cookie["value"] == live.key_a
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert page.evaluate("document.cookie") == ""  # out of the page scripts' reach
    page.click(".logout button")
    page.wait_for_url(f"{live.url}/ui/login")
    assert not context.cookies()
    context.close()


def test_state_changes_need_the_same_origin_and_the_csrf_token(live):
    cookies = {"bitsearch_key": live.key_a}
    with httpx.Client(base_url=live.url, cookies=cookies) as http:
        token = csrf_of(http.get("/ui/").text)
        body = {"model": "zoo:digits-mlp", "pareto_points": 0}  # invalid: a request that passes is a 422
        same = {"Origin": live.url, "X-CSRF-Token": token}
        assert http.post("/ui/api/search", json=body, headers=same).status_code == 422
        refused = [
            {"Origin": "http://127.0.0.1:1", "X-CSRF-Token": token},  # another port of the same site
            {"Origin": "https://evil.example", "X-CSRF-Token": token},
            {"X-CSRF-Token": token},  # neither Origin nor Referer
            {"Origin": live.url},  # no token
            {"Origin": live.url, "X-CSRF-Token": token[:-1] + ("1" if token.endswith("0") else "0")},
        ]
        for headers in refused:
            r = http.post("/ui/api/search", json=body, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.json()["detail"], headers
        referred = {"Referer": f"{live.url}/ui/", "X-CSRF-Token": token}  # a browser that sends no Origin
        assert http.post("/ui/api/search", json=body, headers=referred).status_code == 422
        r = http.post("/ui/logout", data={"csrf_token": "wrong"}, headers={"Origin": live.url})
        assert r.status_code == 403
        r = http.post("/ui/login", data={"api_key": live.key_a}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        # the cookie never authenticates the Bearer API
        assert http.get("/searches").status_code == 401
    with httpx.Client(base_url=live.url) as anonymous:
        assert anonymous.get("/ui/api/searches/" + "0" * 32 + "/front").status_code == 401
        r = anonymous.get("/ui/schedules")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")


def test_another_tenants_search_is_not_found(live, browser, digits_search):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log_in(page, live.url, live.key_b)
    response = page.goto(f"{live.url}/ui/searches/{digits_search.id}")
    assert response.status == 404 and page.locator("h1").inner_text() == "Not found"
    shot(page, "not-found")
    context.close()
    with httpx.Client(base_url=live.url, cookies={"bitsearch_key": live.key_b}) as http:
        token = csrf_of(http.get("/ui/").text)
        headers = {"Origin": live.url, "X-CSRF-Token": token}
        for path in ("front", "allocations/0", "allocations/0/layers"):
            assert http.get(f"/ui/api/searches/{digits_search.id}/{path}").status_code == 404, path
        assert http.get(f"/ui/searches/{digits_search.id}/status").status_code == 404
        r = http.post(f"/ui/api/searches/{digits_search.id}/finetune", json={"points": [0]}, headers=headers)
        assert r.status_code == 404
        assert digits_search.id not in http.get("/ui/searches/rows").text


# --- a search, its front, an allocation, fine-tuning -------------------------------------------------------


def test_start_a_search_with_validation_messages_next_to_the_fields(live, alice, digits_search):
    page = alice
    page.goto(f"{live.url}/ui/")
    row = page.locator(f"tr[data-search='{digits_search.id}']")
    assert row.get_attribute("data-status") == "succeeded"
    assert "top-1" in row.locator("td").nth(5).inner_text()  # the best recommendation, measured
    form = page.locator("#search-form")
    form.locator("input[name=budget_value]").fill("12 parsecs")
    form.locator("input[name=pareto_points]").fill("0")
    form.locator("button[type=submit]").click()
    value_error = form.locator("[data-loc='budgets.0.value'] .field-error")
    value_error.wait_for()
    assert "unknown unit 'parsecs'" in value_error.inner_text()
    points_error = form.locator("[data-loc='pareto_points'] .field-error")
    assert "greater than or equal to 1" in points_error.inner_text()
    shot(page, "searches")
    assert "/ui/searches/" not in page.url  # nothing was started


def test_the_front_shows_the_search_and_a_clicked_point_its_allocation(live, digits_search, tmp_path):
    page = digits_search.page
    page.goto(f"{live.url}/ui/searches/{digits_search.id}")
    page.wait_for_selector("body[data-rendered='1']")
    traces = page.evaluate(
        "document.getElementById('front-chart').data"
        ".map(t => ({meta: t.meta, y: t.yaxis, n: t.x.length, idx: t.customdata}))"
    )
    mixed = next(t for t in traces if t["meta"] == "mixed" and t["y"] == "y")
    uniform = next(t for t in traces if t["meta"] == "uniform" and t["y"] == "y")
    assert mixed["n"] >= 2 and uniform["n"] == 3  # W2, W4, W8
    assert {t["meta"] for t in traces if t["y"] == "y2"} >= {"mixed", "uniform"}  # predicted loss below
    heatmap = page.evaluate("document.getElementById('heatmap').data[0]")
    assert heatmap["y"] == ["fc1", "fc2", "fc3"] and heatmap["x"] == ["W2Afp", "W4Afp", "W8Afp"]
    assert page.locator("#heatmap .hm").count() == 1  # drawn
    before = int(page.get_attribute("#alloc-chart", "data-point"))  # the recommended point, shown at first

    # hover shows the point's figures, a click opens its allocation: the mixed point farthest from the
    # recommended one (a mixed point may lie on a uniform one: the hover names the point a click opens)
    pos = max(range(mixed["n"]), key=lambda i: abs(mixed["idx"][i] - before))
    first_trace = page.locator("#front-chart .subplot.xy .scatterlayer .trace").first
    box = first_trace.locator("path.point").nth(pos).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    hover = page.locator("#front-chart .hoverlayer .hovertext").first
    hover.wait_for()
    text = hover.text_content()
    for figure in ("avg weight bits", "weight memory", "predicted loss increase", "measured top1"):
        assert figure in text
    target = int(re.search(r"point (\d+)", text).group(1))
    assert target != before
    page.mouse.click(x, y)
    page.wait_for_selector(f"#alloc-chart[data-point='{target}']")
    ticks = page.locator("#alloc-chart .xaxislayer-above .xtick text").all_text_contents()
    assert ticks == ["fc1", "fc2", "fc3"]
    bars = page.evaluate("document.getElementById('alloc-chart').data.map(t => [t.name, t.y])")
    assert [name for name, _ in bars][:2] == ["weight bits", "activation bits"]
    shares = bars[2][1]
    assert bars[2][0].startswith("share of") and sum(shares) == pytest.approx(100.0)
    shot(page, "search")

    with page.expect_download() as download:
        page.click("#alloc-download")
    saved = tmp_path / "allocation.json"
    download.value.save_as(saved)
    alloc = json.loads(saved.read_text())
    assert set(Allocation.from_dict(alloc).layers) == {"fc1", "fc2", "fc3"}
    assert [alloc["layers"][n]["weight_bits"] for n in ("fc1", "fc2", "fc3")] == bars[0][1]
    api = httpx.get(f"{live.url}/searches/{digits_search.id}/allocations/{target}",
                    headers={"Authorization": f"Bearer {live.key_a}"})
    assert api.json() == alloc  # the very allocation the REST API serves


def test_fine_tune_from_the_dashboard_joins_the_front(live, digits_search):
    page = digits_search.page
    page.goto(f"{live.url}/ui/searches/{digits_search.id}")
    page.wait_for_selector("body[data-rendered='1']")
    point = page.get_attribute("#alloc-chart", "data-point")  # the recommended point, shown at first
    assert point is not None
    form = page.locator("#finetune-form")
    form.locator("input[name=steps]").fill("0")
    form.locator("button[type=submit]").click()
    steps_error = form.locator("[data-loc='recipe.steps'] .field-error")
    steps_error.wait_for()
    assert "steps must be an integer" in steps_error.inner_text()
    form.locator("input[name=steps]").fill("20")
    form.locator("button[type=submit]").click()
    form.locator(".form-ok").wait_for()
    page.wait_for_selector("#front-chart[data-qat-points='1']", timeout=SEARCH_WAIT_MS)
    row = page.locator("#search-jobs tr[data-kind='fine-tune']")
    assert row.get_attribute("data-status") == "succeeded"
    assert row.locator("td").nth(2).inner_text() == point
    qat = page.evaluate("document.getElementById('front-chart').data.find(t => t.meta === 'qat')")
    assert qat["customdata"] == [int(point)] and 0 < qat["y"][0] <= 100
    shot(page, "search-finetuned")


def test_a_failed_search_shows_its_error(live, alice):
    from db import repo
    from db.models import JobStatus, new_id

    search, _ = repo.create_search(
        live.sf, search_id=new_id(), tenant_id=live.tenant_a, model_ref="zoo:digits-cnn",
        data_ref="zoo:digits", request={"model": "zoo:digits-cnn"}, spec={},
    )
    job = job_repo.submit(live.sf, "search", {}, "held", 1)  # a queue no worker takes
    repo.link_job(live.sf, search.id, job.id, live.tenant_a, "search")
    job_repo.claim(live.sf, "test", job_id=job.id)
    reason = "budget infeasible: avg_weight_bits must be at least 2"
    job_repo.finish(live.sf, job.id, "test", JobStatus.failed, error=reason, message="failed")
    page = alice
    page.goto(f"{live.url}/ui/searches/{search.id}")
    assert page.locator("#search-error").inner_text() == reason
    assert page.locator("#search-jobs .job-error").inner_text() == reason
    assert page.locator("#front-empty").is_visible()
    shot(page, "search-failed")


# --- uploads and schedules ---------------------------------------------------------------------------------


def test_bad_uploads_show_the_apis_reason_next_to_the_file_field(live, alice):
    page = alice
    bearer = {"Authorization": f"Bearer {live.key_a}"}
    refusals = {
        "datasets": ("notes.npz", b"these are not arrays"),
        "models": ("model.pt", pickle.dumps({"weights": [1.0, 2.0]})),
    }
    for kind, (name, content) in refusals.items():
        api = httpx.post(f"{live.url}/{kind}", files={"file": (name, content)}, headers=bearer)
        assert api.status_code in (415, 422)
        page.goto(f"{live.url}/ui/{kind}")
        page.set_input_files("#upload-form input[name=file]", upload(name, content))
        page.click("#upload-form button[type=submit]")
        error = page.locator("#upload-form [data-loc='file'] .field-error")
        error.wait_for()
        # the same text as the API's (which may name the upload's temporary file, different per upload)
        assert same_text(error.inner_text(), api.json()["detail"])
        shot(page, kind)
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    page.goto(f"{live.url}/ui/datasets")
    page.set_input_files("#upload-form input[name=file]", upload("tiny.npz", buf.getvalue()))
    page.fill("#upload-form input[name=name]", "tiny digits")
    page.click("#upload-form button[type=submit]")
    page.locator("#datasets-table td", has_text="tiny digits").wait_for()


def test_schedules_are_listed_and_created_with_the_apis_messages(live, alice):
    page = alice
    page.goto(f"{live.url}/ui/schedules")
    form = page.locator("#schedule-form")
    form.locator("input[name=name]").fill("nightly digits")
    form.locator("input[name=cron]").fill("61 * * * *")
    form.locator("button[type=submit]").click()
    cron_error = form.locator("[data-loc='cron'] .field-error")
    cron_error.wait_for()
    assert "invalid cron expression" in cron_error.inner_text()
    form.locator("textarea[name=spec]").fill('{"model": "zoo:digits-mlp", "pareto_points": 99}')
    form.locator("input[name=cron]").fill("0 3 * * *")
    form.locator("button[type=submit]").click()
    spec_error = form.locator("[data-loc='spec'] .field-error")
    spec_error.wait_for()
    assert "less than or equal to 64" in spec_error.inner_text()
    form.locator("textarea[name=spec]").fill('{"model": "zoo:digits-mlp", "data": "zoo:digits"}')
    form.locator("button[type=submit]").click()
    page.locator("#schedules-table td", has_text="nightly digits").wait_for()
    shot(page, "schedules")


def test_no_script_errors_in_the_pages(alice, script_errors):
    assert script_errors == []


# --- page load of a big search -----------------------------------------------------------------------------


def test_page_load_of_a_search_with_200_points_and_100_layers(live, browser):
    search_id = seed_search(live.sf, live.tenant_a, synthetic_outcome(points=200, layers=100))
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log_in(page, live.url, live.key_a)
    ms = measure_page_load(page, f"{live.url}/ui/searches/{search_id}")
    print(f"\npage load of a search with 200 Pareto points and 100 layers (cold cache): {ms:.0f} ms")
    counts = page.evaluate(
        """() => ({
          mixed: document.getElementById('front-chart').data.find(t => t.meta === 'mixed').x.length,
          rows: document.getElementById('heatmap').data[0].y.length,
          bars: document.getElementById('alloc-chart').data[0].x.length,
        })"""
    )
    assert counts == {"mixed": 200, "rows": 100, "bars": 100}
    shot(page, "search-200-points-100-layers")
    context.close()


# --- confidence intervals, evidence and the latency axis -----------------------------------------------------


def test_error_bars_evidence_and_the_predicted_latency_axis(live, browser):
    """A finished search with a latency table in its spec, selection intervals on every point, the
    recommendation's paired evidence, and a measured end-to-end latency on the uniform points only."""
    from quant.cost import CostModel

    outcome = synthetic_outcome(points=6, layers=4, seed=1)
    names = [layer.name for layer in outcome.table.layers]
    table = {n: {"2/8": 1e-4 * (i + 1), "3/8": 1.2e-4 * (i + 1), "4/8": 1.5e-4 * (i + 1), "8/8": 3e-4 * (i + 1)}
             for i, n in enumerate(names)}
    cost = CostModel(outcome.table.layers, latency_table=table)
    for p in outcome.front.points + outcome.front.uniform:
        p.metrics = {k: v for k, v in cost.cost(p.allocation).metrics().items() if v is not None}
        top1 = p.measured["top1"]
        p.intervals = {"selection": {"top1": [top1 - 1.5, top1 + 1.0]}}
    for p in outcome.front.uniform:
        p.measured["latency_s"] = 1.1 * p.metrics["latency"]  # as timed end to end by `bitsearch profile`
    rec = outcome.recommendations[0]
    rec.evidence = {
        "recommended": "mixed", "reason": "significant paired gain over W4A8", "ranking": "top1",
        "baseline": "W4A8", "contender": {"label": rec.point.label},
        "selection": {"metric": "top1", "n": 500, "delta": 1.25, "ci": [0.5, 2.0], "significant": True,
                      "confidence": 0.95},
        "report": {"metric": "top1", "n": 1500, "delta": -0.4, "ci": [-1.1, 0.3], "significant": False,
                   "confidence": 0.95},
    }
    search_id = seed_search(live.sf, live.tenant_a, outcome, latency_table=table)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log_in(page, live.url, live.key_a)
    page.goto(f"{live.url}/ui/searches/{search_id}")
    page.wait_for_selector("body[data-rendered='1']")

    # error bars: the selection interval around each measured accuracy, below 1.5 and above 1.0
    bars = page.evaluate(
        "document.getElementById('front-chart').data.filter(t => t.yaxis === 'y' && t.meta !== 'selected')"
        ".map(t => ({meta: t.meta, n: t.y.length, e: t.error_y || null}))"
    )
    for trace in (b for b in bars if b["meta"] in ("mixed", "uniform")):
        assert trace["e"]["symmetric"] is False and trace["e"]["visible"] is True
        assert trace["e"]["array"] == pytest.approx([1.0] * trace["n"])
        assert trace["e"]["arrayminus"] == pytest.approx([1.5] * trace["n"])
    assert page.locator("#front-chart .errorbar").count() >= 6 + 4  # drawn, one per point

    # the recommended point is shown first, with its evidence on selection and report data
    evidence = page.locator("#alloc-evidence")
    assert evidence.is_visible()
    assert evidence.get_attribute("data-point") == str(rec.index)
    text = evidence.inner_text()
    assert "W4A8" in text and "significant paired gain over W4A8" in text
    assert page.locator("#alloc-evidence .evidence-selection").inner_text() == (
        "selection: Δ +1.25 points [0.50, 2.00] (95 %), n = 500, significant")
    assert page.locator("#alloc-evidence .evidence-report").inner_text() == (
        "report: Δ -0.40 points [-1.10, 0.30] (95 %), n = 1500, not significant")

    # the cost switch offers the table's latency (labelled as a prediction) and the measured one
    options = page.locator("#x-metric option").all_text_contents()
    assert "predicted latency (sum of per-layer table) (ms)" in options
    assert "measured end-to-end latency (ms)" in options
    page.select_option("#x-metric", "latency")
    page.locator("#front-chart .g-xtitle", has_text="predicted latency (sum of per-layer table)").wait_for()
    xs = page.evaluate("document.getElementById('front-chart').data.find(t => t.meta === 'uniform').x")
    expected = sorted(1e3 * p.metrics["latency"] for p in outcome.front.uniform)
    assert xs == pytest.approx(expected)
    shares = page.evaluate("document.getElementById('alloc-chart').data[2]")
    assert shares["name"] == "share of latency" and sum(shares["y"]) == pytest.approx(100.0)
    shot(page, "search-latency-predicted")
    page.select_option("#x-metric", "latency_measured")
    page.locator("#front-chart .g-xtitle", has_text="measured end-to-end latency").wait_for()
    uniform = page.evaluate("document.getElementById('front-chart').data.find(t => t.meta === 'uniform').x")
    assert uniform == pytest.approx([1.1 * x for x in expected])
    context.close()


# --- trials of a measured search, QBitOpt's bits over training ------------------------------------------------


def test_trial_scatter_marks_the_pareto_trials_and_grows_as_trials_finish(live, browser):
    """A running bomp-nas search whose study holds 12 measured trials, a failed one and two over budget; eight
    more finish while the page is open."""
    request = {"model": "zoo:digits-mlp", "data": "zoo:digits", "budgets": [{"metric": "weight_memory", "value": "6KB"}],
               "solver": {"name": "bomp-nas", "settings": {"total_trials": 40}}}
    search = SimpleNamespace(id=seed_running_search(live.sf, live.tenant_a, request))
    storage = study_storage_of(live.sf)
    add_synthetic_trials(storage, search.id, n=12, seed=5, failed=1, over_budget=2, total=40)
    api = httpx.get(f"{live.url}/searches/{search.id}/trials", headers={"Authorization": f"Bearer {live.key_a}"})
    pareto = sorted(t["number"] for t in api.json()["trials"] if t["pareto"])

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log_in(page, live.url, live.key_a)
    page.goto(f"{live.url}/ui/searches/{search.id}")
    page.wait_for_selector("body[data-rendered='1']")
    traces = page.evaluate(
        "document.getElementById('trials-chart').data.map(t => ({meta: t.meta, n: t.x.length, idx: t.customdata}))"
    )
    by_meta = {t["meta"]: t for t in traces}
    assert by_meta["trials"]["n"] + by_meta["pareto"]["n"] == 12
    assert sorted(by_meta["pareto"]["idx"]) == pareto  # the REST API's Pareto-optimal trials, highlighted
    assert page.locator("#trials-progress").inner_text() == "· 15 / 40 trials finished"
    counts = page.locator("#trials-counts").inner_text()
    assert "12 measured" in counts and "1 failed" in counts and "2 over budget" in counts
    assert page.locator("#trials-x-metric").input_value() == "weight_memory"  # the study's own cost

    # hover on a Pareto-optimal trial: its number, score, architecture and bits
    box = page.locator("#trials-chart .scatterlayer .trace").nth(1).locator("path.point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    hover = page.locator("#trials-chart .hoverlayer .hovertext").first
    hover.wait_for()
    text = hover.text_content()
    assert re.search(r"trial \d+ \(Pareto-optimal\)", text)
    for figure in ("selection top-1", "weight memory", "architecture: width", "bits: fc1 W"):
        assert figure in text, figure
    shot(page, "search-trials")

    # eight more trials finish: the page, polling, shows them without a reload
    add_synthetic_trials(storage, search.id, n=8, seed=6)
    page.wait_for_selector("#trials-chart[data-done='23']", timeout=30_000)
    page.wait_for_selector("#trials-chart[data-points='20']")
    assert page.locator("#trials-progress").inner_text() == "· 23 / 40 trials finished"
    page.select_option("#trials-x-metric", "avg_weight_bits")
    page.locator("#trials-chart .g-xtitle", has_text="average weight bits").wait_for()
    xs = page.evaluate("document.getElementById('trials-chart').data.flatMap(t => t.x)")
    assert len(xs) == 20 and all(2 <= x <= 8 for x in xs)
    context.close()


def test_qbitopt_bits_over_training_heatmap(live, browser):
    outcome = synthetic_outcome(points=2, layers=8, seed=2)
    names = [layer.name for layer in outcome.table.layers]
    history = synthetic_bits_history(names, steps=6, every_k=20, seed=1)
    for p in outcome.front.points:
        p.allocation.metadata["qbitopt"] = {"history": history}
    search_id = seed_search(live.sf, live.tenant_a, outcome, model="zoo:digits-cnn", solver={"name": "qbitopt"})
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log_in(page, live.url, live.key_a)
    page.goto(f"{live.url}/ui/searches/{search_id}")
    page.wait_for_selector("body[data-rendered='1']")
    heat = page.evaluate("(({x, y, z}) => ({x, y, z}))(document.getElementById('bits-chart').data[0])")
    assert heat["y"] == names and heat["x"] == [20, 40, 60, 80, 100, 120]
    expected = [[int(rec["allocation"][n][1:].split("A")[0]) for rec in history] for n in names]
    assert heat["z"] == expected
    assert page.locator("#bits-chart .hm").count() == 1  # drawn
    assert page.locator("#trials-card").count() == 0  # qbitopt runs no trials
    shot(page, "search-qbitopt-bits")
    context.close()
