"""Dashboard sessions: the API key in a cookie, and the checks every state-changing request passes.

The cookie holds the key itself (HttpOnly, Secure, SameSite=Strict, Path=/), so nothing is stored server-side
and revoking the key ends every session within the key cache's TTL. Only the dashboard's own routes read the
cookie; the REST API keeps taking `Authorization: Bearer` only, so a browser's ambient cookie never
authenticates a call there.

CSRF: SameSite=Strict keeps the cookie off cross-site requests, but other ports of the same host are the same
*site*, so every state-changing dashboard request must also come from this origin (its `Origin`, or
`Referer` when a browser sends no `Origin`) and, when authenticated, carry the session's CSRF token (an
`X-CSRF-Token` header, or a `csrf_token` form field): a keyed hash of the key that only pages of this origin
can read.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request, Response

from service.api import auth

COOKIE = "bitsearch_key"
COOKIE_MAX_AGE = 12 * 3600  # a working day; the key itself does not expire
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class Viewer:
    """The logged-in tenant of a dashboard request."""

    tenant_id: str
    csrf_token: str


def csrf_token_for(key: str) -> str:
    # One-way: the token reveals nothing about the key, and is only worth anything together with the cookie.
    return hmac.new(b"bitsearch-dashboard-csrf", key.strip().encode(), hashlib.sha256).hexdigest()


def set_session_cookie(response: Response, key: str) -> None:
    response.set_cookie(
        COOKIE, key.strip(), max_age=COOKIE_MAX_AGE, path="/", secure=True, httponly=True, samesite="strict"
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")


def viewer_of(request: Request) -> Viewer | None:
    key = request.cookies.get(COOKIE)
    tenant = auth.authenticate(request.app.state.sf, key, request.app.state.key_cache)
    if tenant is None or key is None:
        return None
    return Viewer(tenant, csrf_token_for(key))


def login_url(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/ui/login?next=" + quote(target, safe="")


def page_viewer(request: Request) -> Viewer:
    """Pages: the viewer, or a redirect to the login page (back here afterwards)."""
    viewer = viewer_of(request)
    if viewer is None:
        raise HTTPException(303, "log in first", headers={"Location": login_url(request)})
    return viewer


def api_viewer(request: Request) -> Viewer:
    """The dashboard's JSON endpoints: the viewer, or 401."""
    viewer = viewer_of(request)
    if viewer is None:
        raise HTTPException(401, "not logged in (or the API key was revoked): log in again at /ui/login")
    return viewer


def same_origin(request: Request) -> bool:
    """Whether the request says it comes from a page of this host (Origin, else Referer). The scheme is not
    compared: behind a TLS-terminating proxy the app sees http while the browser says https."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        origin = request.headers.get("referer")
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def require_same_origin(request: Request) -> None:
    if not same_origin(request):
        raise HTTPException(403, "cross-origin request refused (CSRF protection)")


def csrf_viewer(request: Request, viewer: Annotated[Viewer, Depends(api_viewer)]) -> Viewer:
    """State-changing JSON endpoints: logged in, same origin, and the session's CSRF token in the header."""
    require_same_origin(request)
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), viewer.csrf_token.encode()):
        raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header (CSRF protection); reload the page")
    return viewer


PageViewer = Annotated[Viewer, Depends(page_viewer)]
ApiViewer = Annotated[Viewer, Depends(api_viewer)]
CsrfViewer = Annotated[Viewer, Depends(csrf_viewer)]
