"""Uploads of a Hugging Face model directory as one `.zip` (config.json + *.safetensors, tokenizer files).

The archive is checked entry by entry before anything is written: plain files only (no links), relative
names without `..`, only the file kinds a safetensors model directory holds, a bound on the expanded size
and on the compression ratio (zip bombs), and pickles (`pytorch_model.bin`, `.pt`, `.pkl` ...) or Python
files (custom model code) refused with the reason. It is unpacked into a folder keyed by the archive's
SHA-256 under `data_dir()/hf-uploads/` (atomically, so concurrent jobs share one copy) and loaded with
`zoo.hf.load_hf_model`, which reads it offline and refuses `trust_remote_code`.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from quant.errors import BitsearchError

from .hf import PICKLE_SUFFIXES, load_hf_model
from .models import LoadedModel
from .paths import data_dir

ALLOWED_NAMES = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "README.md", "LICENSE", "LICENSE.txt",
    ".gitattributes",
}
DEFAULT_MAX_EXPANDED = 8 << 30
MAX_RATIO = 200  # uncompressed / compressed per entry; safetensors and JSON stay far below


def _top(names: list[str]) -> str:
    """The single top folder every entry is in ("name/"), or "" when files sit at the root."""
    roots = {n.split("/", 1)[0] for n in names}
    return next(iter(roots)) + "/" if len(roots) == 1 and all("/" in n for n in names) else ""


def is_hf_zip(names: list[str]) -> bool:
    """A zip whose root (or single top folder) holds config.json: a Hugging Face model directory."""
    return bool(names) and f"{_top(names)}config.json" in names


def _members(z: zipfile.ZipFile, max_expanded: int) -> tuple[str, list[zipfile.ZipInfo]]:
    infos = [i for i in z.infolist() if not i.is_dir()]
    names = [i.filename for i in infos]
    if not is_hf_zip(names):
        raise BitsearchError("the zip has no config.json at its root (or in its one top folder)")
    top = _top(names)
    total = 0
    for info in infos:
        name = info.filename
        rel = name[len(top):]
        parts = PurePosixPath(rel).parts
        if name.startswith("/") or "\\" in name or ".." in parts or not rel or len(parts) != 1:
            raise BitsearchError(f"zip entry {name!r}: only files directly in the model folder are accepted")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise BitsearchError(f"zip entry {name!r} is a symbolic link; links are refused")
        low = rel.lower()
        if low.endswith(PICKLE_SUFFIXES):
            raise BitsearchError(
                f"zip entry {rel!r} is a pickle; pickled weights are refused because unpickling can run "
                "arbitrary code. Save the model with save_pretrained(dir, safe_serialization=True)."
            )
        if low.endswith(".py"):
            raise BitsearchError(f"zip entry {rel!r} is Python code; custom model code (trust_remote_code) is refused")
        if not (low.endswith(".safetensors") or rel in ALLOWED_NAMES):
            raise BitsearchError(f"zip entry {rel!r} is not part of a safetensors model directory")
        total += info.file_size
        if total > max_expanded:
            raise BitsearchError(f"the zip expands to more than {max_expanded} bytes")
        if info.file_size > 1 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise BitsearchError(f"zip entry {rel!r} is compressed more than {MAX_RATIO}:1; refused")
    return top, infos


def unpack_hf_zip(path: str | Path, dest: str | Path, max_expanded: int = DEFAULT_MAX_EXPANDED) -> Path:
    """Check and unpack the archive into the new folder `dest` (which must not exist); returns it."""
    p, out = Path(path), Path(dest)
    try:
        with zipfile.ZipFile(p) as z:
            top, infos = _members(z, max_expanded)
            out.mkdir(parents=True)
            for info in infos:
                target = out / info.filename[len(top):]
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                if target.stat().st_size != info.file_size:
                    raise BitsearchError(f"zip entry {info.filename!r} does not match its declared size")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BitsearchError(f"{p.name} is not a readable zip archive: {exc}") from None
    return out


def load_hf_zip(path: str | Path, weights: Any = None) -> LoadedModel:
    """The model in an uploaded zip, unpacked once per archive content into the data directory."""
    if weights is not None:
        raise BitsearchError("a zipped Hugging Face model carries its own weights; do not give weights")
    from .uploads import sha256_file

    p = Path(path)
    folder = data_dir() / "hf-uploads" / sha256_file(p)[:32]
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder.parent))
        try:
            unpack_hf_zip(p, tmp / "model")
            try:
                os.replace(tmp / "model", folder)
            except OSError:
                if not (folder / "config.json").is_file():  # not a concurrent unpack of the same archive
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = load_hf_model(folder)
    loaded.source = f"zipped Hugging Face model {p.name}"
    return loaded


def inspect_hf_zip_upload(path: str | Path) -> dict[str, Any]:
    """Check an uploaded zip end to end (unpack into a temporary folder, load, find the layers)."""
    from quant.layers import discover_layers

    with tempfile.TemporaryDirectory(prefix="bitsearch-hf-") as tmp:
        loaded = load_hf_model(unpack_hf_zip(path, Path(tmp) / "model"))
        layers = discover_layers(loaded.model, loaded.example_input)
        model_type = getattr(loaded.model.config, "model_type", None)
    return {
        "format": "hf-zip",
        "architecture": f"hf:{model_type}" if model_type else "hf",
        "num_classes": loaded.num_classes,
        "input_shape": ["tokens"],
        "layers": [{"name": l.name, "kind": l.kind, "params": l.params, "macs": l.macs} for l in layers],
        "layer_count": len(layers),
        "params": int(sum(l.params for l in layers)),
    }
