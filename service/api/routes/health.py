"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import time
from typing import Any, Iterable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from db import repo

from ..deps import SF, SettingsDep

router = APIRouter(tags=["health"])


class _JobsCollector:
    """`bitsearch_jobs{status, kind}`, read from the jobs table at scrape time."""

    def __init__(self, sf):
        self.sf = sf

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        g = GaugeMetricFamily("bitsearch_jobs", "Jobs by status and kind.", labels=["status", "kind"])
        try:
            for (status, kind), n in sorted(repo.count_jobs_by_status(self.sf).items()):
                g.add_metric([status, kind], n)
        except Exception:  # the database is down: readyz says so; metrics still answer
            pass
        yield g


class Metrics:
    """One registry per app (tests create many apps)."""

    def __init__(self, sf):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bitsearch_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bitsearch_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.registry.register(_JobsCollector(sf))


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request under its route template (/searches/{search_id})."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, label, str(status[0])).inc()
            self.metrics.latency.labels(method, label).observe(time.perf_counter() - start)


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
def readyz(sf: SF, settings: SettingsDep) -> JSONResponse:
    """The database answers (and the broker, when one is configured; and, under `serve`, at least one of its
    local workers can run jobs)."""
    checks: dict[str, str] = {}
    ok = True
    try:
        repo.ping(sf)
        checks["database"] = "ok"
    except Exception as exc:
        ok = False
        checks["database"] = f"unreachable ({type(exc).__name__})"
    if settings.serve_local_workers and not settings.broker_url:  # `serve`'s own workers: can one run jobs?
        from service.jobs.supervise import workers_able_to_run

        able, seen = workers_able_to_run(settings.data_dir.expanduser() / "workers", 10.0)
        checks["workers"] = f"{able} of {settings.serve_local_workers} can run jobs" + (
            f" ({seen - able} waiting for the database)" if seen > able else "")
        ok = ok and able > 0
    if settings.broker_url:
        try:
            from kombu import Connection

            with Connection(settings.broker_url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:
            ok = False
            checks["broker"] = f"unreachable ({type(exc).__name__})"
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
