"""Dashboard routes: pages under `/ui/`, the HTML fragments they poll, static files (Plotly.js from the
installed `plotly` package, no CDN), and JSON endpoints under `/ui/api/` for the pages' scripts.

The JSON endpoints call the REST routes' own functions with the tenant of the session cookie, so validation,
error messages and results are the API's; they differ only in how the caller is authenticated (cookie plus
CSRF checks instead of a Bearer key). None of this appears in the OpenAPI schema.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from db import repo
from service.api import auth, views
from service.api.deps import SF, SettingsDep
from service.api.routes import jobs as job_routes
from service.api.routes import schedules as schedule_routes
from service.api.routes import searches as search_routes
from service.api.routes import uploads as upload_routes
from service.api.routes import zoo as zoo_routes
from service import searches as search_service
from service import trial_views
from service.api.schemas import METRICS, FinetuneRequest, JobOut, ScheduleIn, SearchRequest

from . import data
from .session import (
    ApiViewer,
    CsrfViewer,
    PageViewer,
    Viewer,
    clear_session_cookie,
    require_same_origin,
    set_session_cookie,
    viewer_of,
)

router = APIRouter(include_in_schema=False)
HERE = FilePath(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
PAGE_SIZE = 50
SearchId = Annotated[str, Path(max_length=64)]
UploadId = Annotated[str, Path(max_length=64)]
PointIndex = Annotated[int, Path(ge=0, le=100_000)]

# Pages hold a tenant's data: never cached, never framed; scripts only from this origin (Plotly sets inline
# styles, hence 'unsafe-inline' for styles alone).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
API_HEADERS = {"Cache-Control": "no-store"}


# --- static files ---------------------------------------------------------------------------------------


STATIC_NAME = re.compile(r"^[a-z0-9_\-]+(\.min)?\.(js|css)$")
MEDIA_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


def _plotly_js() -> FilePath:
    return FilePath(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


@lru_cache(maxsize=None)
def _static(name: str) -> tuple[bytes, bytes, str] | None:
    """(content, gzipped content, version) of a static file, read once; None when there is none."""
    if not STATIC_NAME.match(name):
        return None
    path = _plotly_js() if name == "plotly.min.js" else HERE / "static" / name
    if not path.is_file():
        return None
    raw = path.read_bytes()
    return raw, gzip.compress(raw, 6), hashlib.sha256(raw).hexdigest()[:12]


def static_url(name: str) -> str:
    """The URL of a static file, versioned by its content so it can be cached for good."""
    found = _static(name)
    return f"/ui/static/{name}" + (f"?v={found[2]}" if found else "")


TEMPLATES.env.globals["static_url"] = static_url


@router.get("/ui/static/{name}")
def static_file(name: str, request: Request) -> Response:
    found = _static(name)
    if found is None:
        raise HTTPException(404, f"no static file {name[:64]!r}")
    raw, gz, version = found
    headers = {
        "Cache-Control": "public, max-age=31536000, immutable",
        "ETag": f'"{version}"',
        "Vary": "Accept-Encoding",
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("if-none-match") == f'"{version}"':
        return Response(status_code=304, headers=headers)
    media = MEDIA_TYPES[name.rsplit(".", 1)[1]]
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(gz, media_type=media, headers={**headers, "Content-Encoding": "gzip"})
    return Response(raw, media_type=media, headers=headers)


# --- rendering helpers ----------------------------------------------------------------------------------


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    resp = TEMPLATES.TemplateResponse(request, template, context, status_code=status_code)
    resp.headers.update(PAGE_HEADERS)
    return resp


def page_context(sf, viewer: Viewer, nav: str, **extra: Any) -> dict[str, Any]:
    tenant = repo.get_tenant(sf, viewer.tenant_id)
    return {"viewer": viewer, "tenant_name": tenant.name if tenant else "", "nav": nav, **extra}


def error_page(request: Request, sf, viewer: Viewer, exc: HTTPException) -> HTMLResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "the request was refused"
    ctx = page_context(sf, viewer, "", status_code=exc.status_code, detail=detail)
    return render(request, "error.html", ctx, status_code=exc.status_code)


def api_json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(jsonable_encoder(content), status_code, {**API_HEADERS, **(headers or {})})


def safe_next(target: str | None) -> str:
    """Only dashboard paths of this site after login: no open redirect."""
    if not target or not (target == "/ui" or target.startswith("/ui/")) or "//" in target or "\\" in target:
        return "/ui/"
    return target


# --- root, login, logout --------------------------------------------------------------------------------


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", 307)


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", 307)


def cookie_refused(request: Request) -> bool:
    """Whether the browser will drop the Secure session cookie: plain http to a host that is not loopback
    (browsers treat only localhost as a secure context without TLS)."""
    if request.headers.get("x-forwarded-proto", request.url.scheme) == "https":
        return False
    host = (request.url.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _login_page(
    request: Request, next: str | None, error: str | None, status_code: int = 200
) -> HTMLResponse:
    ctx = {"next": safe_next(next), "error": error, "insecure": cookie_refused(request)}
    return render(request, "login.html", ctx, status_code=status_code)


@router.get("/ui/login")
def login_page(request: Request, next: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    if viewer_of(request) is not None:
        return RedirectResponse(safe_next(next), 303)
    return _login_page(request, next, None)


@router.post("/ui/login")
def login(
    request: Request,
    api_key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=500)] = "/ui/",
) -> Response:
    require_same_origin(request)  # a login from another site could plant its own session (login CSRF)
    tenant = auth.authenticate(request.app.state.sf, api_key, request.app.state.key_cache)
    if tenant is None:
        return _login_page(request, next, "invalid or revoked API key", 401)
    resp = RedirectResponse(safe_next(next), 303)
    set_session_cookie(resp, api_key)
    return resp


@router.post("/ui/logout")
def logout(request: Request, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    require_same_origin(request)
    viewer = viewer_of(request)
    if viewer is not None and csrf_token != viewer.csrf_token:
        raise HTTPException(403, "missing or wrong CSRF token; reload the page")
    resp = RedirectResponse("/ui/login", 303)
    clear_session_cookie(resp)
    return resp


# --- searches -------------------------------------------------------------------------------------------


def _upload_names(sf, tenant: str) -> tuple[list[Any], list[Any]]:
    models = upload_routes.list_models(tenant, sf, limit=500, offset=0).items
    datasets = upload_routes.list_datasets(tenant, sf, limit=500, offset=0).items
    return models, datasets


def _search_rows(request: Request, sf, viewer: Viewer, offset: int, uploads=None) -> dict[str, Any]:
    """The searches table; uploaded models and data sets show by name (`uploads`: the tenant's lists when
    the caller has them; read only when a row refers to an upload, not on every poll)."""
    page = search_routes.list_searches(request, viewer.tenant_id, sf, limit=PAGE_SIZE, offset=offset)
    names: dict[str, str] = {}
    refs = {r for s in page.items for r in (s.model, s.data) if r is not None and not r.startswith("zoo:")}
    if refs:
        models, datasets = uploads or _upload_names(sf, viewer.tenant_id)
        names = {m.id: m.name for m in models} | {d.id: d.name for d in datasets}
    rows = [
        {
            "id": s.id,
            "status": s.status,
            "progress": round(100 * s.progress),
            "message": s.message,
            "error": s.error,
            "model": names.get(s.model, s.model),
            "data": "data-free" if s.data is None else names.get(s.data, s.data),
            "budgets": data.budgets_text(s.request),
            "created": s.timings.created_at,
            "best": data.best_recommendation(s),
        }
        for s in page.items
    ]
    return {
        "rows": rows,
        "active": any(r["status"] in data.ACTIVE for r in rows),
        "total": page.total,
        "offset": offset,
        "page_size": PAGE_SIZE,
    }


@router.get("/ui/")
def searches_page(
    request: Request, viewer: PageViewer, sf: SF, offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0
) -> HTMLResponse:
    models, datasets = _upload_names(sf, viewer.tenant_id)
    from search.solvers import SOLVERS
    from sensitivity import METHODS

    form = {
        "zoo_models": zoo_routes.zoo_models(viewer.tenant_id),
        "zoo_datasets": zoo_routes.zoo_datasets(viewer.tenant_id),
        "models": models,
        "datasets": datasets,
        "metrics": METRICS,
        "methods": sorted(METHODS),
        # solvers a search spec can run (bayes and qbitopt need a scorer or a trainer from Python)
        "solvers": sorted(n for n in SOLVERS if not SOLVERS.capabilities(n).needs_scorer),
        "defaults": SearchRequest(model="zoo:digits-cnn"),
    }
    rows = _search_rows(request, sf, viewer, offset, (models, datasets))
    ctx = page_context(sf, viewer, "searches", form=form, **rows)
    return render(request, "searches.html", ctx)


@router.get("/ui/searches/rows")
def search_rows(
    request: Request, viewer: PageViewer, sf: SF, offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0
) -> HTMLResponse:
    """The searches table's body alone, for the page's live updates."""
    return render(request, "_search_rows.html", _search_rows(request, sf, viewer, offset))


def _stored_spec(stored: dict[str, Any] | None) -> SearchRequest | None:
    """The typed request a search was stored with (None for a row the current schema no longer reads)."""
    try:
        return SearchRequest.model_validate(stored or {})
    except ValueError:
        return None


def _search_state(request: Request, sf, viewer: Viewer, search_id: str) -> dict[str, Any]:
    """The search (as `GET /searches/{id}` shows it) and all its jobs, with their results."""
    views.check_id(search_id, "search")
    view = repo.get_search(sf, viewer.tenant_id, search_id, finetunes=True)
    if view is None:
        raise views.not_found("search", search_id)
    search = views.search_out(request, view)
    jobs: list[tuple[str, int | None, JobOut]] = []
    if view.job is not None:
        jobs.append(("search", None, views.job_out(view.job)))
    jobs += [("fine-tune", link.point_index, views.job_out(j)) for link, j in view.finetunes or []]
    return {
        "search": search,
        "spec_request": view.search.request or {},
        "spec": _stored_spec(view.search.request),
        "jobs": jobs,
        "active": any(j.status in data.ACTIVE for _, _, j in jobs) or view.job is None,
        # the page redraws its charts when this changes (the search or a fine-tuning finished)
        "signature": ",".join(f"{j.id[:8]}:{j.status}" for _, _, j in jobs if j.status == "succeeded"),
        "budgets": data.budgets_text(search.request),
    }


def _front(request: Request, sf, viewer: Viewer, search_id: str, jobs) -> dict[str, Any]:
    try:
        pareto = search_routes.get_pareto(search_id, request, viewer.tenant_id, sf)
    except HTTPException as exc:
        if exc.status_code != 404:
            raise
        pareto = None  # no results yet
    return data.front_data(pareto, [(point, job) for kind, point, job in jobs if kind == "fine-tune"])


def _trials(sf, settings, viewer: Viewer, search_id: str) -> dict[str, Any] | None:
    return data.trials_data(search_routes.get_trials(search_id, viewer.tenant_id, sf, settings))


def _bits_history(sf, settings, viewer: Viewer, search_id: str) -> dict[str, Any] | None:
    try:
        history = search_routes.get_bits_history(search_id, viewer.tenant_id, sf, settings)
    except HTTPException as exc:
        if exc.status_code != 404:
            raise
        return None  # no re-allocation recorded yet
    return data.bits_history_data(history)


@router.get("/ui/searches/{search_id}")
def search_page(
    search_id: SearchId, request: Request, viewer: PageViewer, sf: SF, settings: SettingsDep
) -> HTMLResponse:
    try:
        state = _search_state(request, sf, viewer, search_id)
    except HTTPException as exc:
        return error_page(request, sf, viewer, exc)
    try:
        table = search_routes.get_sensitivity(search_id, viewer.tenant_id, sf).table
    except HTTPException:
        table = None
    front = _front(request, sf, viewer, search_id, state["jobs"])
    # The recommended point's allocation comes with the page, so the first view needs no second request.
    # A uniform point is recommended when no mixed one beats it significantly (search.selection).
    recommended = next((p["index"] for p in front["series"]["mixed"] + front["series"]["uniform"]
                        if p["recommended"]), None)
    allocation = None
    if recommended is not None:
        found = repo.get_point_allocation(sf, viewer.tenant_id, search_id, recommended)
        if found is not None and found[1] is not None:
            allocation = {
                "point": recommended,
                **data.layer_costs(found[1].allocation, table, state["spec_request"]),
            }
    solver = state["spec"].solver.name if state["spec"] is not None else None
    payload = {
        "search_id": search_id,
        "solver": solver,
        "trials": _trials(sf, settings, viewer, search_id) if solver in trial_views.TRIAL_SOLVERS else None,
        "bits_history": _bits_history(sf, settings, viewer, search_id) if solver == "qbitopt" else None,
        "front": front,
        "heatmap": data.heatmap_data(table),
        "allocation": allocation,
        "signature": state["signature"],
        "finished": state["search"].status == "succeeded",
    }
    ctx = page_context(sf, viewer, "searches", payload=payload, **state)
    return render(request, "search.html", ctx)


@router.get("/ui/searches/{search_id}/status")
def search_status(search_id: SearchId, request: Request, viewer: PageViewer, sf: SF) -> HTMLResponse:
    """The search's status line and jobs table alone, for the page's live updates."""
    return render(request, "_search_status.html", _search_state(request, sf, viewer, search_id))


@router.get("/ui/api/searches/{search_id}/front")
def search_front(search_id: SearchId, request: Request, viewer: ApiViewer, sf: SF) -> JSONResponse:
    state = _search_state(request, sf, viewer, search_id)
    return api_json(_front(request, sf, viewer, search_id, state["jobs"]))


@router.get("/ui/api/searches/{search_id}/trials")
def search_trials(search_id: SearchId, viewer: ApiViewer, sf: SF, settings: SettingsDep) -> JSONResponse:
    """The trial scatter's data (`GET /searches/{id}/trials`, shaped for the chart)."""
    return api_json(_trials(sf, settings, viewer, search_id))


@router.get("/ui/api/searches/{search_id}/bits-history")
def search_bits_history(search_id: SearchId, viewer: ApiViewer, sf: SF, settings: SettingsDep) -> JSONResponse:
    """QBitOpt's per-layer bits over training (`GET /searches/{id}/bits-history`, shaped for the chart)."""
    history = search_routes.get_bits_history(search_id, viewer.tenant_id, sf, settings)
    return api_json(data.bits_history_data(history))


@router.get("/ui/api/searches/{search_id}/allocations/{point}")
def download_allocation(search_id: SearchId, point: PointIndex, viewer: ApiViewer, sf: SF) -> JSONResponse:
    alloc = search_routes.get_allocation(search_id, point, viewer.tenant_id, sf)
    filename = f"allocation-{search_id[:8]}-{point}.json"
    return api_json(alloc, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/ui/api/searches/{search_id}/allocations/{point}/layers")
def allocation_layers(search_id: SearchId, point: PointIndex, viewer: ApiViewer, sf: SF) -> JSONResponse:
    """Per-layer bits of a point's allocation and each layer's share of the costs."""
    alloc = search_routes.get_allocation(search_id, point, viewer.tenant_id, sf)
    view = repo.get_search(sf, viewer.tenant_id, search_id)
    table = repo.get_sensitivity(sf, viewer.tenant_id, search_id)
    out = data.layer_costs(alloc, table.table if table else None, view.search.request if view else {})
    return api_json({"point": point, **out})


@router.post("/ui/api/search", status_code=202)
def start_search(
    body: SearchRequest,
    request: Request,
    response: Response,
    viewer: CsrfViewer,
    sf: SF,
    settings: SettingsDep,
) -> JSONResponse:
    with views.http_errors():
        done = search_service.submit_search(sf, settings, viewer.tenant_id, body)
    return api_json({"id": done.search_id, "status": done.status, "job_id": done.job_id,
                     "url": views.url_for(request, "get_search", search_id=done.search_id),
                     "page": f"/ui/searches/{done.search_id}"}, 202)


@router.post("/ui/api/searches/{search_id}/finetune", status_code=202)
def start_finetune(
    search_id: SearchId,
    body: FinetuneRequest,
    request: Request,
    viewer: CsrfViewer,
    sf: SF,
    settings: SettingsDep,
) -> JSONResponse:
    views.check_id(search_id, "search")
    with views.http_errors():
        jobs = search_service.finetune(sf, settings, viewer.tenant_id, search_id, body.points,
                                       body.recipe.model_dump(mode="json"))
    for j in jobs:
        j["url"] = views.url_for(request, "get_job", job_id=j["job_id"])
    return api_json({"search_id": search_id, "jobs": jobs}, 202)


@router.post("/ui/api/jobs/{job_id}/cancel")
def cancel_job(job_id: Annotated[str, Path(max_length=64)], viewer: CsrfViewer, sf: SF) -> JSONResponse:
    return api_json(job_routes.cancel_job(job_id, viewer.tenant_id, sf))


# --- uploads and schedules ------------------------------------------------------------------------------


@router.get("/ui/models")
def models_page(request: Request, viewer: PageViewer, sf: SF) -> HTMLResponse:
    models, _ = _upload_names(sf, viewer.tenant_id)
    ctx = page_context(sf, viewer, "models", items=models, zoo_models=zoo_routes.zoo_models(viewer.tenant_id))
    return render(request, "models.html", ctx)


@router.get("/ui/datasets")
def datasets_page(request: Request, viewer: PageViewer, sf: SF) -> HTMLResponse:
    _, datasets = _upload_names(sf, viewer.tenant_id)
    return render(request, "datasets.html", page_context(sf, viewer, "datasets", items=datasets))


@router.get("/ui/schedules")
def schedules_page(request: Request, viewer: PageViewer, sf: SF) -> HTMLResponse:
    items = schedule_routes.list_schedules(viewer.tenant_id, sf, limit=500, offset=0).items
    example = {
        "model": "zoo:digits-cnn",
        "data": "zoo:digits",
        "budgets": [{"metric": "avg_weight_bits", "value": 4}],
        "pareto_points": 6,
    }
    ctx = page_context(sf, viewer, "schedules", items=items, example=example)
    return render(request, "schedules.html", ctx)


@router.post("/ui/api/models", status_code=201)
async def upload_model(request: Request, viewer: CsrfViewer, sf: SF, settings: SettingsDep) -> JSONResponse:
    return api_json(await upload_routes.upload_model(request, viewer.tenant_id, sf, settings), 201)


@router.post("/ui/api/datasets", status_code=201)
async def upload_dataset(request: Request, viewer: CsrfViewer, sf: SF, settings: SettingsDep) -> JSONResponse:
    return api_json(await upload_routes.upload_dataset(request, viewer.tenant_id, sf, settings), 201)


@router.delete("/ui/api/models/{model_id}", status_code=204)
def delete_model(model_id: UploadId, viewer: CsrfViewer, sf: SF, settings: SettingsDep) -> Response:
    return upload_routes.delete_model(model_id, viewer.tenant_id, sf, settings)


@router.delete("/ui/api/datasets/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: UploadId, viewer: CsrfViewer, sf: SF, settings: SettingsDep) -> Response:
    return upload_routes.delete_dataset(dataset_id, viewer.tenant_id, sf, settings)


@router.post("/ui/api/schedules", status_code=201)
def add_schedule(body: ScheduleIn, viewer: CsrfViewer, sf: SF, settings: SettingsDep) -> JSONResponse:
    with views.http_errors():
        sched = search_service.add_schedule(sf, settings, viewer.tenant_id, body.name, body.cron, body.kind, body.spec,
                                            body.enabled)
    return api_json(views.schedule_out(repo.get_schedule(sf, viewer.tenant_id, sched.id)), 201)


@router.delete("/ui/api/schedules/{schedule_id}", status_code=204)
def delete_schedule(schedule_id: UploadId, viewer: CsrfViewer, sf: SF) -> Response:
    return schedule_routes.delete_schedule(schedule_id, viewer.tenant_id, sf)

