"""What an uploaded file is, judged by its bytes (never by its name), and the refusal of pickles."""

from __future__ import annotations

import hashlib
import re
import struct
import zipfile
from pathlib import Path

from quant.errors import BitsearchError


class UnsafeUploadError(BitsearchError):
    """The upload would need code execution (pickle, exec, native code) to read; it is refused."""


# --------------------------------------------------------------------------------------------------------------
# Sniffing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sniff_model_format(path: str | Path) -> str:
    """``pt2``, ``safetensors``, ``hf-zip``, ``pickle`` (a torch.save file or a raw pickle) or ``unknown``, by content."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    # pickle: protocol 2+ starts with PROTO (0x80); protocol 0/1 usually with MARK, GLOBAL, EMPTY_DICT/LIST
    if head[:1] == b"\x80" or re.match(rb"\(|c[\w.]+\n|\}|\]", head):
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "unknown"
        if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith(".pkl") for n in names):
            return "pickle"  # torch.save's zip format: data.pkl inside
        from zoo.hf_upload import is_hf_zip

        if is_hf_zip(names):
            return "hf-zip"  # a zipped Hugging Face model directory (zoo.hf_upload checks its entries)
        return "unknown"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= p.stat().st_size - 8:
            return "safetensors"
    return "unknown"


PICKLE_REFUSED = (
    "pickle files (torch.save checkpoints, .pt/.pth, .pkl) are refused: unpickling can run arbitrary code. "
    "Upload a torch.export archive (torch.export.save(torch.export.export(model, (x,)), 'model.pt2')) or "
    "the weights as safetensors (safetensors.torch.save_file(model.state_dict(), 'w.safetensors')) with the "
    "zoo architecture they belong to."
)
