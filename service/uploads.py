"""The service's operations on uploaded models and data sets, called by the REST routes and the dashboard alike.

No FastAPI here (like `service.searches`): an operation takes the session factory, the settings and the
caller's tenant, and raises `BitsearchError` (422) or an error that carries its HTTP status. Receiving the
multipart body is the route's job (`service.api.storage`); from the received temporary file on, everything
is here: the format check that never unpickles, the quota, the move into place and the row, which succeed or
fail together (the file goes again when the row cannot be written), and a refusal that names the file as the
user sent it, never its temporary path on the server.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from db import repo
from db.models import new_id
from db.tables import StoredDataset, StoredModel
from quant.errors import BitsearchError
from service.jobs import quotas
from service.searches import NotFound, abs_path
from service.settings import Settings
from zoo import uploads as up
from zoo.hf_upload import inspect_hf_zip_upload

if TYPE_CHECKING:  # the route's received file: a plain dataclass
    from service.api.storage import Received

log = logging.getLogger("bitsearch.api")
ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME = 200

DATASET_PICKLE_REFUSED = (
    "pickled data are refused (unpickling can run arbitrary code); save the arrays with "
    "numpy.savez(path, x=..., y=...)"
)
UNKNOWN_MODEL_FILE = (
    "unrecognised model file: upload a torch.export archive (.pt2, from torch.export.save) or safetensors "
    "weights with architecture=zoo:NAME"
)


class UnsupportedUpload(BitsearchError):
    """A file of a kind the service does not read (a pickle, an unknown format)."""

    status = 415


# --- what a tenant may upload ---------------------------------------------------------------------------------


def stored_bytes_before_upload(sf, settings: Settings, tenant_id: str) -> int:
    """The bytes `tenant_id` stores; refuses at once when its quota is already full (before a body is read)."""
    stored = quotas.tenant_upload_bytes(sf, tenant_id)
    quotas.check_upload_quota(stored, 1, settings)
    return stored


def store_model(sf, settings: Settings, tenant_id: str, received: "Received", stored_bytes: int) -> StoredModel:
    """Check an uploaded model file and store it: a `torch.export` archive (`.pt2`), safetensors weights for
    a zoo architecture (form field `architecture`) or a zipped Hugging Face directory. Pickles are refused
    unread. The temporary file is gone afterwards, stored or not."""
    try:
        quotas.check_upload_quota(stored_bytes, received.size, settings)
        fmt = up.sniff_model_format(received.path)
        arch = (received.fields.get("architecture") or "").strip() or None
        if fmt == "pickle":
            raise UnsupportedUpload(up.PICKLE_REFUSED)
        with named_as_sent(received):
            if fmt == "pt2":
                if arch:
                    raise BitsearchError("a .pt2 archive carries its architecture; leave 'architecture' out")
                info = up.inspect_exported_upload(received.path)
            elif fmt == "safetensors":
                if not arch:
                    raise BitsearchError(
                        "safetensors weights need the zoo architecture they belong to: add the form field "
                        "architecture=zoo:NAME (see GET /zoo/models)"
                    )
                info = up.inspect_safetensors_upload(received.path, arch)
                arch = info["architecture"]
            elif fmt == "hf-zip":  # a zipped Hugging Face model directory (config.json + *.safetensors)
                info = inspect_hf_zip_upload(received.path)
                arch = info["architecture"]
            else:
                raise UnsupportedUpload(UNKNOWN_MODEL_FILE)
        ext = {"pt2": "pt2", "hf-zip": "zip"}.get(fmt, "safetensors")
        return _store(sf, settings, received, StoredModel, tenant_id, "models", ext,
                      format=fmt, architecture=arch, info=info)
    finally:
        received.discard()


def store_dataset(sf, settings: Settings, tenant_id: str, received: "Received", stored_bytes: int) -> StoredDataset:
    """Check an uploaded `.npz` (read with `allow_pickle=False`, sizes checked before any array is read)
    and store it. The temporary file is gone afterwards, stored or not."""
    try:
        quotas.check_upload_quota(stored_bytes, received.size, settings)
        if up.sniff_model_format(received.path) == "pickle":
            raise UnsupportedUpload(DATASET_PICKLE_REFUSED)
        with named_as_sent(received):
            info = up.inspect_dataset_upload(received.path, None, settings.npz_limits())
        return _store(sf, settings, received, StoredDataset, tenant_id, "datasets", "npz", info=info)
    finally:
        received.discard()


# --- reading and deleting ------------------------------------------------------------------------------------


def list_models(sf, tenant_id: str, limit: int, offset: int) -> tuple[list[StoredModel], int]:
    return repo.list_uploads(sf, StoredModel, tenant_id, limit, offset)


def list_datasets(sf, tenant_id: str, limit: int, offset: int) -> tuple[list[StoredDataset], int]:
    return repo.list_uploads(sf, StoredDataset, tenant_id, limit, offset)


def get_model(sf, tenant_id: str, model_id: str) -> StoredModel:
    return _get(sf, StoredModel, tenant_id, model_id, "model")


def get_dataset(sf, tenant_id: str, dataset_id: str) -> StoredDataset:
    return _get(sf, StoredDataset, tenant_id, dataset_id, "dataset")


def delete_model(sf, settings: Settings, tenant_id: str, model_id: str) -> None:
    _delete(sf, settings, StoredModel, tenant_id, model_id, "model")


def delete_dataset(sf, settings: Settings, tenant_id: str, dataset_id: str) -> None:
    _delete(sf, settings, StoredDataset, tenant_id, dataset_id, "dataset")


# --- helpers ---------------------------------------------------------------------------------------------------


@contextmanager
def named_as_sent(received: "Received") -> Iterator[None]:
    """A refusal names the file as the user sent it, never its temporary path on the server."""
    try:
        yield
    except BitsearchError as exc:
        message = str(exc)
        for form in {str(received.path), str(received.path.resolve())}:
            message = message.replace(form, repr(received.filename))
        if message == str(exc):
            raise
        raise type(exc)(message) from None  # the same kind of error (its status), the path taken out


def upload_name(received: "Received") -> str:
    """The name a user gave (form field `name`), else the file's name; text a database can store."""
    from bitsearch.spec import check_text

    name = (received.fields.get("name") or received.filename).strip()[:MAX_NAME] or received.filename
    try:
        check_text(name)
    except ValueError as exc:
        raise BitsearchError(f"name: {exc}") from None
    return name


def _store(sf, settings: Settings, received: "Received", table, tenant_id: str, folder: str, ext: str, **fields):
    """Move a received upload to its final place and record it; the file goes again if the row fails."""
    name = upload_name(received)
    upload_id = new_id()
    rel = f"uploads/{tenant_id}/{folder}/{upload_id}.{ext}"
    final = abs_path(settings, rel)
    place(received, final)
    try:
        return repo.add_upload(
            sf, table, id=upload_id, tenant_id=tenant_id, name=name, filename=received.filename,
            path=rel, size_bytes=received.size, sha256=received.sha256, **fields,
        )
    except BaseException:
        remove_file(final)
        raise


def place(received: "Received", final: Path) -> None:
    """Move a received file to its final place (same file system: an atomic rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(received.path, final)


def remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.warning("could not remove %s", path, exc_info=True)


def _check_id(value: str, what: str) -> None:
    """Ids are 32 hex digits; anything else cannot exist (404, like another tenant's id)."""
    if not ID_RE.match(value):
        raise NotFound(f"no {what} {value[:64]!r}")


def _get(sf, table, tenant_id: str, upload_id: str, what: str):
    _check_id(upload_id, what)
    row = repo.get_upload(sf, table, tenant_id, upload_id)
    if row is None:
        raise NotFound(f"no {what} {upload_id!r}")
    return row


def _delete(sf, settings: Settings, table, tenant_id: str, upload_id: str, what: str) -> None:
    _check_id(upload_id, what)
    row = repo.delete_upload(sf, table, tenant_id, upload_id)
    if row is None:
        raise NotFound(f"no {what} {upload_id!r}")
    remove_file(abs_path(settings, row.path))
