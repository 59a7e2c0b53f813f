"""Dependencies of the routes: settings, the session factory, the caller's tenant, paging, and resolving
the model and data references of a request to what a job can load."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service.searches import abs_path, resolve_data, resolve_model  # noqa: F401  (the routes use them)
from service.settings import Settings

from . import auth

bearer = HTTPBearer(auto_error=False, description="An API key from `bitsearch keys create --tenant NAME`.")


# The dependencies below are `async def` on purpose: FastAPI runs a plain `def` dependency in the thread
# pool, and a thread hop per dependency was most of a small request's CPU time.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_sf(request: Request) -> sessionmaker[Session]:
    return request.app.state.sf


async def current_tenant(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    state = request.app.state
    tenant = auth.cached_tenant(creds.credentials, state.key_cache)  # no I/O: stays on the event loop
    if tenant is None:
        tenant = await run_in_threadpool(auth.authenticate, state.sf, creds.credentials, state.key_cache)
    if tenant is None:
        raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
SF = Annotated[sessionmaker[Session], Depends(get_sf)]
TenantId = Annotated[str, Depends(current_tenant)]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip.")]

