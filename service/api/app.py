"""`create_app(settings)`: the FastAPI application of the bitsearch service.

The app itself holds no workers: `bitsearch serve` starts it together with a local worker pool and the
in-process scheduler when no broker is configured, or next to Celery workers and beat when one is.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import anyio.to_thread

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from quant.errors import BitsearchError
from service.settings import Settings, get_settings

from . import auth, search_job  # noqa: F401  (search_job registers the "search" job kind)
from .routes import health, jobs, schedules, searches, uploads, zoo
from .routes.health import Metrics, MetricsMiddleware

log = logging.getLogger("bitsearch.api")

MAX_JSON_BYTES = 8 * 1024**2
# Uploads stream to disk under their own size limits (BITSEARCH_MAX_*_BYTES), the dashboard's as the API's.
UPLOAD_PATHS = frozenset({"/models", "/datasets", "/ui/api/models", "/ui/api/datasets"})

DESCRIPTION = """
Find per-layer bit-widths for a neural network under hardware budgets.

1. `POST /search` with a model (`zoo:NAME` or an uploaded model id), data (`zoo:NAME`, an uploaded dataset
   id, or null for data-free) and budgets: answers 202 with the search's URL.
2. Poll `GET /searches/{id}` until `status` is `succeeded`.
3. Read `GET /searches/{id}/pareto` (front, uniform baselines, recommendations) and download allocations from
   `GET /searches/{id}/allocations/{point}`; fine-tune chosen points with `POST /searches/{id}/finetune`.

Every call but `/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer <key>`
(`bitsearch keys create --tenant NAME`). Errors are JSON `{"detail": ...}` with a reason.
"""


class BodyLimitMiddleware:
    """Refuse JSON bodies above MAX_JSON_BYTES by their Content-Length (uploads have their own limits)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            path = scope.get("path", "")
            if path not in UPLOAD_PATHS:
                for name, value in scope.get("headers") or []:
                    if name == b"content-length":
                        try:
                            too_big = int(value) > MAX_JSON_BYTES
                        except ValueError:
                            too_big = False
                        if too_big:
                            resp = JSONResponse(
                                {"detail": f"request body larger than {MAX_JSON_BYTES} bytes"}, 413
                            )
                            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, sf: sessionmaker[Session] | None = None) -> FastAPI:
    """The application for `settings` (default: from the environment). `sf` overrides the database (tests)."""
    settings = settings or get_settings()
    if sf is None:
        from db.session import session_factory

        sf = session_factory(settings.db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Sync routes run in AnyIO's thread pool (40 threads by default). Their work is short and mostly holds
        # the GIL, so under load many threads only take turns at it; a few threads serve the same requests
        # with less switching.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        if getattr(app.state, "freeze_gc", False):  # a server process: its start-up is over now
            freeze_startup_objects()
        yield

    app = FastAPI(title="bitsearch", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.sf = sf
    app.state.metrics = Metrics(sf)
    app.state.key_cache = auth.KeyCache(settings.api_key_cache_seconds)
    for r in (searches.router, uploads.router, schedules.router, jobs.router, zoo.router, health.router):
        app.include_router(r)
    from .routes.export import router as export_router  # ONNX export of points, stored latency tables

    app.include_router(export_router)
    from service.dashboard import router as dashboard_router  # pages under /ui/ (imports these routes)

    app.include_router(dashboard_router)

    @app.exception_handler(BitsearchError)
    async def _user_error(request: Request, exc: BitsearchError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    @app.exception_handler(sa_exc.TimeoutError)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return JSONResponse(
            {"detail": "the database is unavailable; try again shortly"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(sa_exc.DataError)
    @app.exception_handler(sa_exc.StatementError)
    async def _bad_value(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, sa_exc.IntegrityError):
            return JSONResponse({"detail": "the request conflicts with the stored state; try again"}, 409)
        log.info("refused a value the database cannot store: %s", exc)
        return JSONResponse({"detail": "the request holds a value that cannot be stored or looked up"}, 422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        from fastapi.encoders import jsonable_encoder

        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def freeze_startup_objects() -> None:
    """Exempt what start-up built (torch, SQLAlchemy's mappers, the routes: all kept for the process's life)
    from garbage collection. Otherwise every full collection walks them all and stalls every request in
    flight for ~0.2 s, the whole tail of the API's latency under load. For server processes, not tests."""
    gc.collect()
    gc.freeze()


def served_app() -> FastAPI:
    """The app of one `bitsearch serve` process: it freezes its start-up objects once serving starts."""
    app = create_app()
    app.state.freeze_gc = True
    return app
