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
from starlette.exceptions import HTTPException as StarletteHTTPException
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from quant.errors import BitsearchError
from service.settings import Settings, get_settings

from . import auth, search_job  # noqa: F401  (search_job registers the "search" job kind)
from .routes import health, jobs, schedules, searches, uploads, zoo
from .errors import (
    COMMON_RESPONSES,
    PUBLIC_RESPONSES,
    BodyLimitMiddleware,
    error_response,
    install_error_docs,
    internal_error,
)
from .routes.health import Metrics, MetricsMiddleware

log = logging.getLogger("bitsearch.api")

DESCRIPTION = """
Find per-layer bit-widths for a neural network under hardware budgets.

1. `POST /search` with a model (`zoo:NAME` or an uploaded model id), data (`zoo:NAME`, an uploaded dataset
   id, or null for data-free) and budgets: answers 202 with the search's URL.
2. Poll `GET /searches/{id}` until `status` is `succeeded`.
3. Read `GET /searches/{id}/pareto` (front, uniform baselines, recommendations) and download allocations from
   `GET /searches/{id}/allocations/{point}`; fine-tune chosen points with `POST /searches/{id}/finetune`.

Every call but `/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer <key>`
(`bitsearch keys create --tenant NAME`). Errors are JSON `{"detail": ..., "code": ...}`: `detail` a reason
(or, for a request that fails validation, a list of `{loc, msg, type}`), `code` a stable name for the kind of
error (`not_found`, `invalid`, `too_large`, `quota_exceeded`, ...). A 500 carries `error_id`, the id under
which the server logged what went wrong.
"""


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
    # Every operation documents the error statuses the handlers below really answer, with their body.
    from .routes.export import router as export_router  # ONNX export of points, stored latency tables

    for r in (searches.router, uploads.router, schedules.router, jobs.router, zoo.router, export_router):
        app.include_router(r, responses=COMMON_RESPONSES)
    app.include_router(health.router, responses=PUBLIC_RESPONSES)
    from service.dashboard import router as dashboard_router  # pages under /ui/ (imports these routes)

    app.include_router(dashboard_router, responses=COMMON_RESPONSES)
    install_error_docs(app)

    @app.exception_handler(BitsearchError)
    async def _user_error(request: Request, exc: BitsearchError) -> JSONResponse:
        status = getattr(exc, "http_status", None) or getattr(exc, "status", None) or 422
        return error_response(status, getattr(exc, "detail", None) or str(exc), getattr(exc, "code", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code < 400:  # redirects (the dashboard's login) keep their headers and no body
            from starlette.responses import Response

            return Response(status_code=exc.status_code, headers=exc.headers)
        return error_response(exc.status_code, exc.detail, headers=exc.headers)

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    @app.exception_handler(sa_exc.TimeoutError)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(503, "the database is unavailable; try again shortly", headers={"Retry-After": "5"})

    @app.exception_handler(sa_exc.DataError)
    @app.exception_handler(sa_exc.StatementError)
    async def _bad_value(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, sa_exc.IntegrityError):
            return error_response(409, "the request conflicts with the stored state; try again")
        log.info("refused a value the database cannot store: %s", exc)
        return error_response(422, "the request holds a value that cannot be stored or looked up")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        from fastapi.encoders import jsonable_encoder

        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return error_response(422, jsonable_encoder(errors))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(f"{request.method} {request.url.path}", exc)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_bytes)
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
