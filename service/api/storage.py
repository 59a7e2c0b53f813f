"""Uploads: a multipart body streamed chunk by chunk into a temporary file under the tenant's upload folder,
with its size limit enforced while it arrives and its sha256 computed on the way; then moved into place.

Files live at `data_dir/uploads/<tenant>/<models|datasets>/<id>.<ext>`; partial files at
`data_dir/uploads/<tenant>/.incoming/` and are removed on any error, so a failed upload never touches what a
user stored before.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("bitsearch.api")

MAX_FIELD_BYTES = 16 * 1024
MAX_FIELDS = 16
MULTIPART_SLACK = 64 * 1024  # headers and boundaries around the file in a multipart body


@dataclass
class Received:
    path: Path  # the temporary file; move it with `place` or delete it with `discard`
    filename: str
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class _Receiver:
    def __init__(self, tmp_dir: Path, max_bytes: int, file_field: str):
        self.tmp_dir, self.max_bytes, self.file_field = tmp_dir, max_bytes, file_field
        self.fields: dict[str, str] = {}
        self.file = None
        self.path: Path | None = None
        self.filename = ""
        self.size = 0
        self.hash = hashlib.sha256()
        self.part_is_file = False
        self.part_name = ""
        self.part_data = bytearray()
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.files_seen = 0
        self.pending: list[bytes] = []

    # python-multipart callbacks (sync: file data is queued and written between chunks)
    def on_part_begin(self) -> None:
        self.part_is_file, self.part_name, self.disposition = False, "", b""
        self.part_data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]
        if len(self.header_name) > 1024:
            raise HTTPException(400, "malformed multipart body: header too long")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        if len(self.header_value) > 4096:
            raise HTTPException(400, "malformed multipart body: header too long")

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self.disposition)
        if b"name" not in opts:
            raise HTTPException(400, "malformed multipart body: a part has no Content-Disposition name")
        self.part_name = opts[b"name"].decode("utf-8", "replace")
        if b"filename" in opts and self.part_name == self.file_field:
            self.files_seen += 1
            if self.files_seen > 1:
                raise HTTPException(422, f"send exactly one file, in the form field {self.file_field!r}")
            self.part_is_file = True
            self.filename = os.path.basename(opts[b"filename"].decode("utf-8", "replace"))[:255] or "upload"
            self.path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
            self.file = open(self.path, "wb")
        elif len(self.fields) >= MAX_FIELDS:
            raise HTTPException(422, f"too many form fields (at most {MAX_FIELDS})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part_is_file:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise HTTPException(413, f"the file is larger than the limit of {self.max_bytes} bytes")
            self.hash.update(chunk)
            self.pending.append(bytes(chunk))
        else:
            self.part_data += chunk
            if len(self.part_data) > MAX_FIELD_BYTES:
                raise HTTPException(422, f"form field {self.part_name!r} is too long")

    def on_part_end(self) -> None:
        if not self.part_is_file:
            self.fields[self.part_name] = self.part_data.decode("utf-8", "replace")

    def flush(self) -> None:
        if self.pending and self.file is not None:
            self.file.write(b"".join(self.pending))
        self.pending.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


async def receive_file(request: Request, tmp_dir: Path, max_bytes: int, file_field: str = "file") -> Received:
    """Stream a multipart/form-data body: one file (in `file_field`) to disk, the other fields in memory."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(
            415,
            "send the upload as multipart/form-data with the file in the field "
            f"{file_field!r} (e.g. curl -F {file_field}=@model.pt2)",
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes + MULTIPART_SLACK:
                raise HTTPException(413, f"the upload is larger than the limit of {max_bytes} bytes")
        except ValueError:
            raise HTTPException(400, "invalid Content-Length") from None
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        codecs.lookup(charset)
    except LookupError:
        raise HTTPException(400, f"unknown charset {charset!r}") from None
    tmp_dir.mkdir(parents=True, exist_ok=True)
    r = _Receiver(tmp_dir, max_bytes, file_field)
    callbacks = {
        "on_part_begin": r.on_part_begin,
        "on_part_data": r.on_part_data,
        "on_part_end": r.on_part_end,
        "on_header_field": r.on_header_field,
        "on_header_value": r.on_header_value,
        "on_header_end": r.on_header_end,
        "on_headers_finished": r.on_headers_finished,
    }
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)
        async for chunk in request.stream():
            parser.write(chunk)
            if r.pending:
                await run_in_threadpool(r.flush)
        parser.finalize()
        r.flush()
        r.close()
    except HTTPException:
        r.close()
        if r.path is not None:
            r.path.unlink(missing_ok=True)
        raise
    except (FormParserError, ValueError) as exc:
        r.close()
        if r.path is not None:
            r.path.unlink(missing_ok=True)
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    except BaseException:  # client went away, cancelled, disk full...
        r.close()
        if r.path is not None:
            r.path.unlink(missing_ok=True)
        raise
    if r.path is None:
        raise HTTPException(422, f"no file in the form field {file_field!r} (send it with a filename)")
    if r.size == 0:
        r.path.unlink(missing_ok=True)
        raise HTTPException(422, "the uploaded file is empty")
    return Received(r.path, r.filename, r.size, r.hash.hexdigest(), r.fields)
