"""Model and dataset uploads: streamed to disk, checked without ever unpickling, listed and deleted."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator

from fastapi import APIRouter, HTTPException, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from db import repo
from db.models import new_id
from db.tables import StoredDataset, StoredModel
from quant.errors import BitsearchError
from service.jobs import quotas
from zoo import uploads as up
from zoo.hf_upload import inspect_hf_zip_upload

from .. import storage, views
from ..deps import SF, Limit, Offset, SettingsDep, TenantId, abs_path
from ..schemas import DatasetOut, ModelOut, Page, check_text

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


def _name(received: storage.Received) -> str:
    name = (received.fields.get("name") or received.filename).strip()[:200] or received.filename
    try:
        check_text(name)
    except ValueError as exc:
        raise HTTPException(422, f"name: {exc}") from None
    return name


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
    tenant_dir = settings.uploads_dir / tenant
    stored = await run_in_threadpool(quotas.tenant_upload_bytes, sf, tenant)
    quotas.check_upload_quota(stored, 1, settings)  # full already: refused before the body is read
    received = await storage.receive_file(request, tenant_dir / ".incoming", settings.max_model_bytes)
    try:
        quotas.check_upload_quota(stored, received.size, settings)
        fmt = up.sniff_model_format(received.path)
        arch = (received.fields.get("architecture") or "").strip() or None
        if fmt == "pickle":
            raise HTTPException(415, up.PICKLE_REFUSED)
        if fmt == "pt2":
            if arch:
                raise HTTPException(422, "a .pt2 archive carries its architecture; leave 'architecture' out")
            with _named_as_sent(received):
                info = await run_in_threadpool(up.inspect_exported_upload, received.path)
        elif fmt == "safetensors":
            if not arch:
                raise HTTPException(
                    422,
                    "safetensors weights need the zoo architecture they belong to: add the "
                    "form field architecture=zoo:NAME (see GET /zoo/models)",
                )
            with _named_as_sent(received):
                info = await run_in_threadpool(up.inspect_safetensors_upload, received.path, arch)
            arch = info["architecture"]
        elif fmt == "hf-zip":  # a zipped Hugging Face model directory (config.json + *.safetensors)
            with _named_as_sent(received):
                info = await run_in_threadpool(inspect_hf_zip_upload, received.path)
            arch = info["architecture"]
        else:
            raise HTTPException(
                415,
                "unrecognised model file: upload a torch.export archive (.pt2, from "
                "torch.export.save) or safetensors weights with architecture=zoo:NAME",
            )
        ext = {"pt2": "pt2", "hf-zip": "zip"}.get(fmt, "safetensors")
        row = _store(sf, settings, received, StoredModel, tenant, "models", ext,
                     format=fmt, architecture=arch, info=info)
    finally:
        received.discard()
    return views.model_out(row)


@router.get("/models", response_model=Page[ModelOut])
def list_models(tenant: TenantId, sf: SF, limit: Limit = 50, offset: Offset = 0) -> Page[ModelOut]:
    rows, total = repo.list_uploads(sf, StoredModel, tenant, limit, offset)
    return Page(items=[views.model_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/models/{model_id}", response_model=ModelOut)
def get_model(model_id: UploadId, tenant: TenantId, sf: SF) -> ModelOut:
    return views.model_out(_get_or_404(sf, StoredModel, tenant, model_id, "model"))


@router.delete("/models/{model_id}", status_code=204)
def delete_model(model_id: UploadId, tenant: TenantId, sf: SF, settings: SettingsDep) -> Response:
    _delete_or_404(sf, settings, StoredModel, tenant, model_id, "model")
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
    tenant_dir = settings.uploads_dir / tenant
    stored = await run_in_threadpool(quotas.tenant_upload_bytes, sf, tenant)
    quotas.check_upload_quota(stored, 1, settings)  # full already: refused before the body is read
    received = await storage.receive_file(request, tenant_dir / ".incoming", settings.max_dataset_bytes)
    try:
        quotas.check_upload_quota(stored, received.size, settings)
        if up.sniff_model_format(received.path) == "pickle":
            raise HTTPException(
                415,
                "pickled data are refused (unpickling can run arbitrary code); save the "
                "arrays with numpy.savez(path, x=..., y=...)",
            )
        with _named_as_sent(received):
            info = await run_in_threadpool(up.inspect_dataset_upload, received.path, None, settings.npz_limits())
        row = _store(sf, settings, received, StoredDataset, tenant, "datasets", "npz", info=info)
    finally:
        received.discard()
    return views.dataset_out(row)


@router.get("/datasets", response_model=Page[DatasetOut])
def list_datasets(tenant: TenantId, sf: SF, limit: Limit = 50, offset: Offset = 0) -> Page[DatasetOut]:
    rows, total = repo.list_uploads(sf, StoredDataset, tenant, limit, offset)
    return Page(items=[views.dataset_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: UploadId, tenant: TenantId, sf: SF) -> DatasetOut:
    return views.dataset_out(_get_or_404(sf, StoredDataset, tenant, dataset_id, "dataset"))


@router.delete("/datasets/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: UploadId, tenant: TenantId, sf: SF, settings: SettingsDep) -> Response:
    _delete_or_404(sf, settings, StoredDataset, tenant, dataset_id, "dataset")
    return Response(status_code=204)


@contextmanager
def _named_as_sent(received: storage.Received) -> Iterator[None]:
    """A refusal names the file as the user sent it, never its temporary path on the server."""
    try:
        yield
    except BitsearchError as exc:
        message = str(exc)
        for form in {str(received.path), str(received.path.resolve())}:
            message = message.replace(form, repr(received.filename))
        raise type(exc)(message) from None  # the same kind of error (its status), the path taken out


def _store(sf, settings, received, table, tenant: str, folder: str, ext: str, **fields):
    """Move a received upload to its final place and record it; the file goes again if the row fails."""
    upload_id = new_id()
    rel = f"uploads/{tenant}/{folder}/{upload_id}.{ext}"
    final = abs_path(settings, rel)
    storage.place(received, final)
    try:
        return repo.add_upload(
            sf, table, id=upload_id, tenant_id=tenant, name=_name(received), filename=received.filename,
            path=rel, size_bytes=received.size, sha256=received.sha256, **fields,
        )
    except BaseException:
        storage.remove_file(final)
        raise


def _get_or_404(sf, table, tenant: str, upload_id: str, what: str):
    views.check_id(upload_id, what)
    row = repo.get_upload(sf, table, tenant, upload_id)
    if row is None:
        raise views.not_found(what, upload_id)
    return row


def _delete_or_404(sf, settings, table, tenant: str, upload_id: str, what: str) -> None:
    views.check_id(upload_id, what)
    row = repo.delete_upload(sf, table, tenant, upload_id)
    if row is None:
        raise views.not_found(what, upload_id)
    storage.remove_file(abs_path(settings, row.path))
