"""What every `bitsearch` command module shares: the one typer app, consoles and output helpers.

`service.cli` and `service.cli_search` both import this module (and not each other's), so the command
modules have no import cycle.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console

from quant.errors import BitsearchError

app = typer.Typer(
    name="bitsearch",
    help="Find the best per-layer bit-widths for a neural network under a hardware budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Rich falls back to 80 columns when output is piped; tables of figures read better wider.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

_state: dict[str, Any] = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


@contextmanager
def status(message: str) -> Iterator[Any]:
    """A spinner for work that may take more than a second (hidden when output is not a terminal)."""
    with console.status(message) as s:
        yield s


def write_json(path: Optional[Path], payload: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        raise BitsearchError(f"cannot write {path}: {exc.strerror or exc}") from None
    console.print(f"wrote {path}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_num(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)
