"""Where bitsearch keeps what it builds for itself (trained zoo models, caches).

One directory, overridable with `BITSEARCH_DATA_DIR`, so tests and CI can point it at a temporary folder and
never touch the user's home.
"""

from __future__ import annotations

import os
from pathlib import Path

from quant.errors import BitsearchError

ENV_VAR = "BITSEARCH_DATA_DIR"


def data_dir() -> Path:
    """`$BITSEARCH_DATA_DIR`, else `~/.bitsearch`; created on first use."""
    raw = os.environ.get(ENV_VAR, "").strip()
    path = Path(raw).expanduser() if raw else Path.home() / ".bitsearch"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BitsearchError(
            f"cannot create the bitsearch data directory {path} ({exc.strerror or exc}); "
            f"set {ENV_VAR} to a writable folder"
        ) from exc
    return path
