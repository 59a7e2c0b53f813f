"""Model and dataset uploads: streamed to disk by `storage.receive_file`, then checked (never unpickled),
stored, listed and deleted by the service layer (`service.uploads`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from service import uploads as service

from .. import storage, views
from ..deps import SF, Limit, Offset, SettingsDep, TenantId
from ..schemas import DatasetOut, ModelOut, Page

router = APIRouter(tags=["uploads"])
UploadId = Annotated[str, Path(max_length=64)]


def _multipart(fields: dict[str, dict]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                }
            },
        }
    }


@router.post(
    "/models",
    status_code=201,
    response_model=ModelOut,
    openapi_extra=_multipart(
        {
            "name": {"type": "string", "maxLength": 200},
            "architecture": {
                "type": "string",
                "maxLength": 100,
                "description": "For safetensors weights: the zoo architecture, e.g. zoo:digits-cnn",
            },
        }
    ),
    responses={
        413: {"description": "Too large"},
        415: {"description": "Not a .pt2 or safetensors file (pickles are refused)"},
    },
)
async def upload_model(request: Request, tenant: TenantId, sf: SF, settings: SettingsDep) -> ModelOut:
    """Upload a `torch.export` archive (`.pt2`, any architecture) or safetensors weights for a zoo
    architecture (form field `architecture`). Pickles (`.pt`, `.pth`, `.pkl`) are refused unread."""
    stored = await run_in_threadpool(service.stored_bytes_before_upload, sf, settings, tenant)
    received = await storage.receive_file(request, settings.uploads_dir / tenant / ".incoming",
                                          settings.max_model_bytes)
    with views.http_errors():
        row = await run_in_threadpool(service.store_model, sf, settings, tenant, received, stored)
    return views.model_out(row)


@router.get("/models", response_model=Page[ModelOut])
def list_models(tenant: TenantId, sf: SF, limit: Limit = 50, offset: Offset = 0) -> Page[ModelOut]:
    rows, total = service.list_models(sf, tenant, limit, offset)
    return Page(items=[views.model_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/models/{model_id}", response_model=ModelOut)
def get_model(model_id: UploadId, tenant: TenantId, sf: SF) -> ModelOut:
    with views.http_errors():
        return views.model_out(service.get_model(sf, tenant, model_id))


@router.delete("/models/{model_id}", status_code=204)
def delete_model(model_id: UploadId, tenant: TenantId, sf: SF, settings: SettingsDep) -> Response:
    with views.http_errors():
        service.delete_model(sf, settings, tenant, model_id)
    return Response(status_code=204)


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=_multipart({"name": {"type": "string", "maxLength": 200}}),
    responses={
        413: {"description": "Too large"},
        415: {"description": "Not an .npz file (pickles are refused)"},
    },
)
async def upload_dataset(request: Request, tenant: TenantId, sf: SF, settings: SettingsDep) -> DatasetOut:
    """Upload an `.npz` with `x` (uint8 images N×H×W[×C], or float N×C×H×W / N×F) and optional integer
    labels `y`; read with `allow_pickle=False`."""
    stored = await run_in_threadpool(service.stored_bytes_before_upload, sf, settings, tenant)
    received = await storage.receive_file(request, settings.uploads_dir / tenant / ".incoming",
                                          settings.max_dataset_bytes)
    with views.http_errors():
        row = await run_in_threadpool(service.store_dataset, sf, settings, tenant, received, stored)
    return views.dataset_out(row)


@router.get("/datasets", response_model=Page[DatasetOut])
def list_datasets(tenant: TenantId, sf: SF, limit: Limit = 50, offset: Offset = 0) -> Page[DatasetOut]:
    rows, total = service.list_datasets(sf, tenant, limit, offset)
    return Page(items=[views.dataset_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: UploadId, tenant: TenantId, sf: SF) -> DatasetOut:
    with views.http_errors():
        return views.dataset_out(service.get_dataset(sf, tenant, dataset_id))


@router.delete("/datasets/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: UploadId, tenant: TenantId, sf: SF, settings: SettingsDep) -> Response:
    with views.http_errors():
        service.delete_dataset(sf, settings, tenant, dataset_id)
    return Response(status_code=204)
