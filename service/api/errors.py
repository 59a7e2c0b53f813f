"""The API's error bodies, their OpenAPI documentation, and the limit on JSON bodies.

Every error answer is `{"detail": ..., "code": ...}` (`ErrorBody`): `detail` says why (a list of
`{loc, msg, type}` for a request that fails validation), `code` is a stable name of the kind of error a
client can branch on. A 500 also carries `error_id`: the traceback goes to the server's log under that id,
never into the answer.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel

log = logging.getLogger("bitsearch.api")

#: The stable `code` of each error status.
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "quota_exceeded",
    500: "internal",
    503: "unavailable",
}

# Uploads stream to disk under their own size limits (BITSEARCH_MAX_*_BYTES), the dashboard's as the API's.
UPLOAD_PATHS = frozenset({"/models", "/datasets", "/ui/api/models", "/ui/api/datasets"})


class ValidationItem(BaseModel):
    loc: list[Union[str, int]]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: Union[str, list[ValidationItem]]
    code: str
    error_id: Union[str, None] = None


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


#: What every authenticated operation may answer besides its success (added on router include).
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _doc("Bad request (e.g. a malformed body or form)"),
    401: _doc("No, an invalid or a revoked API key"),
    403: _doc("Not allowed (e.g. a failed CSRF check on the dashboard)"),
    404: _doc("No such resource for this tenant"),
    409: _doc("Conflicts with the stored state"),
    413: _doc("The body, or a quota on stored bytes, is too large"),
    415: _doc("Unsupported media type (e.g. a pickle upload)"),
    422: _doc("Invalid request: `detail` is a reason, or a list of `{loc, msg, type}`"),
    429: _doc("A per-tenant quota is used up"),
    500: _doc("Internal error; `error_id` names it in the server's log"),
    503: _doc("The database (or broker) is unavailable; retry after `Retry-After` seconds"),
}
#: The same for the unauthenticated health endpoints (`/readyz` documents its own 503 body).
PUBLIC_RESPONSES = {k: COMMON_RESPONSES[k] for k in (413, 500)}


def error_response(status: int, detail: Any, code: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"detail": detail, "code": code or CODES.get(status, "error"), **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error(where: str, exc: BaseException) -> JSONResponse:
    """A 500 that names an id; the traceback goes to the log under that id, not to the client."""
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error %s on %s", error_id, where, exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); reference {error_id}", error_id=error_id)


class BodyLimitMiddleware:
    """Refuse request bodies above `max_bytes` with 413, counting the bytes as they arrive.

    Content-Length is checked first; a body without one (chunked) is read up to `max_bytes` + 1 bytes before
    the app sees any of it, then handed on. So no JSON route (the API's, `/ui/api/*`, `/schedules`) ever
    holds more than `max_bytes` of a body, whatever the client claims. Upload routes stream to disk under
    their own limits and are left alone."""

    def __init__(self, app, max_bytes: int = 8 * 1024**2):
        self.app, self.max_bytes = app, int(max_bytes)

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body larger than {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in UPLOAD_PATHS:
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        return await self._too_large()(scope, receive, send)
                except ValueError:
                    pass
        if scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                replay = [message]
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replayed_receive():
            if replay:
                return replay.pop(0)
            return await receive()

        return await self.app(scope, replayed_receive, send)


def install_error_docs(app) -> None:
    """Make every documented error status (>= 400) of every operation carry `ErrorBody`, also where a route
    documents one by description only, so the schema says what the handlers really send."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        ref = {"$ref": "#/components/schemas/ErrorBody"}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                if "health" in (op.get("tags") or []):  # readiness answers its own body, not ErrorBody
                    continue
                for status, resp in (op.get("responses") or {}).items():
                    if status.isdigit() and int(status) >= 400 and "content" not in resp:
                        resp["content"] = {"application/json": {"schema": dict(ref)}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
