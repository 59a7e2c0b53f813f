"""Dependencies of the routes: settings, the session factory, the caller's tenant, paging, and resolving
the model and data references of a request to what a job can load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.tables import StoredDataset, StoredModel
from quant.errors import BitsearchError
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


def abs_path(settings: Settings, rel: str) -> Path:
    return (settings.data_dir.expanduser() / rel).resolve()


def resolve_model(sf: sessionmaker[Session], settings: Settings, tenant_id: str, ref: str) -> dict[str, Any]:
    """`{"model", "weights"}` for a job, from 'zoo:NAME' or the id of one of the tenant's uploaded models."""
    if ref.startswith("zoo:"):
        from zoo.models import get_model_spec

        get_model_spec(ref)  # BitsearchError (422) when unknown
        return {"model": ref, "weights": None}
    row = repo.get_upload(sf, StoredModel, tenant_id, ref)
    if row is None:
        raise BitsearchError(f"unknown model {ref!r}: give zoo:NAME or the id of one of your uploaded models")
    path = str(abs_path(settings, row.path))
    if row.format == "pt2":
        return {"model": path, "weights": None}
    return {"model": row.architecture, "weights": path}


def resolve_data(
    sf: sessionmaker[Session], settings: Settings, tenant_id: str, ref: str | None
) -> dict[str, Any]:
    """`{"data"}` for a job: 'zoo:NAME', the path of one of the tenant's uploaded datasets, or None."""
    if ref is None or ref == "none":  # the model's own zoo data set / data-free
        return {"data": ref}
    if ref.startswith("zoo:"):
        from zoo.data import DATASETS

        if ref[4:] not in DATASETS:
            raise BitsearchError(
                f"unknown zoo data set {ref!r}; known: {sorted('zoo:' + k for k in DATASETS)}"
            )
        return {"data": ref}
    row = repo.get_upload(sf, StoredDataset, tenant_id, ref)
    if row is None:
        raise BitsearchError(
            f"unknown data set {ref!r}: give zoo:NAME, the id of one of your uploaded data "
            "sets, 'none' (data-free) or null (the model's own zoo data set)"
        )
    return {"data": str(abs_path(settings, row.path))}
