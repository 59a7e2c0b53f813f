"""``.npz`` uploads checked from their headers, then read in bounded chunks.

An ``.npz`` is a zip of ``.npy`` members, usually deflated: a few hundred kilobytes can claim terabytes once
decompressed. Before any array is read, every member's NPY header (shape, dtype) is read from the member's own
stream with numpy's ``format.read_array_header_*``, and the sizes it claims are checked against `NpzLimits`.
Only then are the arrays read, a chunk of at most ``chunk_bytes`` at a time, to compute what the service stores
(items, item shape, classes) and to check that float inputs are finite, so the memory this takes is bounded by
``chunk_bytes``, never by what the file claims. `zipfile` never returns more bytes than a member's declared
size, so a member cannot decompress past the size its header was checked against.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
from numpy.lib import format as npy_format

from quant.errors import BitsearchError

from ..data import MAX_CLASSES, _not_npz_hint, check_x_layout, check_y_layout

#: Defaults of the limits (the service reads them from BITSEARCH_MAX_DATASET_ELEMENTS / _ARRAY_BYTES).
DEFAULT_MAX_ELEMENTS = 1 << 30  # elements over all arrays of one file
DEFAULT_MAX_ARRAY_BYTES = 4 << 30  # decompressed bytes over all arrays of one file
DEFAULT_CHUNK_BYTES = 8 << 20  # what one read holds in memory
MAX_HEADER_BYTES = 10_000  # numpy's own default bound on an NPY header
MAX_MEMBERS = 16


class NpzTooLarge(BitsearchError):
    """The arrays' headers claim more than the limits allow (answered 413 by the service)."""

    http_status = 413


@dataclass(frozen=True)
class NpzLimits:
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_bytes: int = DEFAULT_MAX_ARRAY_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        for name in ("max_elements", "max_bytes", "chunk_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True)
class NpyHeader:
    name: str  # the array's name (the member without ".npy")
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.elements * self.dtype.itemsize


def _read_header(f: IO[bytes], member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"NPY format version {version} is not supported")
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as exc:
        raise BitsearchError(
            f"member {member!r} is not an NPY array ({exc}); save arrays with numpy.savez(path, x=..., y=...)"
        ) from None
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BitsearchError(f"not an .npz archive: {exc}") from None


def read_npz_headers(path: str | Path, limits: NpzLimits | None = None) -> dict[str, NpyHeader]:
    """Every member's NPY header, checked against `limits`, before any array data is read."""
    limits = limits or NpzLimits()
    headers: dict[str, NpyHeader] = {}
    with _open(Path(path)) as z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise NpzTooLarge(f"the .npz holds {len(infos)} members; at most {MAX_MEMBERS} are read")
        for info in infos:
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise BitsearchError(
                    f"member {info.filename!r} is not an NPY array (numpy.savez writes NAME.npy members)"
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BitsearchError(f"member {info.filename!r} uses an unsupported compression")
            try:
                with z.open(info) as f:
                    shape, fortran, dtype = _read_header(f, info.filename)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
                raise BitsearchError(f"member {info.filename!r} cannot be read: {exc}") from None
            name = info.filename[: -len(".npy")]
            if dtype.hasobject:
                raise BitsearchError(
                    f"array {name!r} is an object array, which only loads through pickle; pickled arrays are "
                    "refused for safety (pickle can run arbitrary code). Save plain numeric arrays."
                )
            if any(d < 0 for d in shape):
                raise BitsearchError(f"array {name!r} has a negative dimension in its shape {shape}")
            h = NpyHeader(name, shape, dtype, fortran)
            headers[name] = h
            _check_totals(headers.values(), limits)
            if info.file_size < h.nbytes:
                raise BitsearchError(f"array {name!r} is truncated: its header claims {h.nbytes} bytes")
    return headers


def _check_totals(headers, limits: NpzLimits) -> None:
    elements = sum(h.elements for h in headers)
    nbytes = sum(h.nbytes for h in headers)
    if elements > limits.max_elements:
        raise NpzTooLarge(f"the arrays hold {elements} elements in all; the limit is {limits.max_elements}")
    if nbytes > limits.max_bytes:
        raise NpzTooLarge(f"the arrays take {nbytes} bytes decompressed; the limit is {limits.max_bytes} bytes")


def iter_chunks(path: str | Path, header: NpyHeader, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The array's elements in storage order, as flat arrays of at most `chunk_bytes` bytes each."""
    itemsize = max(1, header.dtype.itemsize)
    per_chunk = max(1, chunk_bytes // itemsize) * itemsize
    left = header.nbytes
    with _open(Path(path)) as z, z.open(header.name + ".npy") as f:
        _read_header(f, header.name)
        while left > 0:
            want = min(per_chunk, left)
            buf = f.read(want)
            if len(buf) != want:
                raise BitsearchError(f"array {header.name!r} is truncated")
            left -= want
            yield np.frombuffer(buf, dtype=header.dtype)


def describe_npz(path: str | Path, limits: NpzLimits | None = None) -> dict[str, Any]:
    """Items, item shape and classes of an ``.npz`` data set, read in bounded memory (see the module)."""
    limits = limits or NpzLimits()
    p = Path(path)
    if not zipfile.is_zipfile(p):
        raise BitsearchError(f"{p} is not an .npz archive: {_not_npz_hint(p)}")
    headers = read_npz_headers(p, limits)
    if "x" not in headers:
        found = ", ".join(repr(k) for k in headers) or "no arrays"
        raise BitsearchError(f"{p} has no array named 'x' (found {found}); save inputs as x=... and labels as y=...")
    x = headers["x"]
    check_x_layout(x.shape, x.dtype, p)
    if x.dtype.kind == "f":
        bad = 0
        for chunk in iter_chunks(p, x, limits.chunk_bytes):
            bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
        if bad:
            raise BitsearchError(f"x contains {bad} NaN or infinite value(s); clean the data before quantizing")
    else:  # read it all once anyway: a truncated or corrupt member is refused now, not in a job later
        for _ in iter_chunks(p, x, limits.chunk_bytes):
            pass
    if x.dtype == np.uint8:  # images become N×C×H×W tensors when loaded (`zoo.data.load_npz`)
        item_shape = [1, *x.shape[1:]] if len(x.shape) == 3 else [x.shape[3], x.shape[1], x.shape[2]]
    else:
        item_shape = list(x.shape[1:])
    info: dict[str, Any] = {"items": x.shape[0], "item_shape": item_shape, "labels": "y" in headers}
    if x.dtype.kind in "iu" and x.dtype != np.uint8:  # token ids (zoo.tokens): next tokens are the targets
        mask = headers.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(x.shape):
            raise BitsearchError(f"attention_mask in {p} has shape {tuple(mask.shape)}; x has {tuple(x.shape)}")
        info.update(labels=True, tokens=True)
        return info
    y = headers.get("y")
    if y is not None:
        check_y_layout(y.shape, y.dtype, x.shape[0], p)
        lo, hi = None, None
        for chunk in iter_chunks(p, y, limits.chunk_bytes):
            if chunk.size:
                lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
                hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
        if lo is not None and lo < 0:
            raise BitsearchError(f"y in {p} contains negative labels (min {lo}); classes start at 0")
        if hi is not None and hi >= MAX_CLASSES:
            raise BitsearchError(f"y in {p} has a label of {hi}; labels are class indices below {MAX_CLASSES}")
        if hi is not None:
            info["classes"] = hi + 1
    return info
