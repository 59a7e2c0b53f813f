"""The `bitsearch` command line.

Every command prints a readable table and, with `--json PATH`, writes its result as JSON. User errors go to
stderr with exit code 2 and no traceback unless `--debug`.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

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


@app.command()
def ptq(
    model: str = typer.Option(..., "--model", help="zoo:NAME (see `bitsearch models`)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint or safetensors file."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation data: zoo:NAME or an .npz file."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration data (zoo:NAME or .npz)."),
    calib_size: int = typer.Option(256, "--calib-size", min=1, help="Calibration samples."),
    bits: list[str] = typer.Option(["8/8", "4/8", "4"], "--bits", help="W/A bits, e.g. 4/8; W alone = weights only. Repeatable."),
    clip: str = typer.Option("auto", "--clip", help="Weight clipping: minmax, percentile, mse, aciq, output_mse, auto."),
    act_clip: str = typer.Option("minmax", "--act-clip", help="Activation clipping: minmax, percentile, mse, aciq."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="One weight scale per layer instead of per channel."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Correct the expected output shift."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate on at most this many items."),
    seed: int = typer.Option(0, "--seed"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Post-training quantization at uniform bit-widths: accuracy, size and BOPs against FP32."""
    from quant import QuantConfig
    from service.pipeline import resolve_inputs, run_ptq, seed_everything, uniform_allocations

    seed_everything(seed)
    config = QuantConfig(
        weight_clip=clip,
        activation_clip=act_clip,
        weight_granularity="per_tensor" if per_tensor else "per_channel",
        bias_correction=bias_correction,
        calibration_samples=calib_size,
    )
    with status("loading model and data") as s:
        inputs = resolve_inputs(model, str(weights) if weights else None, data, calib_data, calib_size, limit, seed)
        if inputs.evaluation is None:
            raise BitsearchError(f"{model} has no built-in data set: give --data (an .npz file)")
        allocations = uniform_allocations(inputs, bits)
        reference, results = run_ptq(inputs, allocations, config, progress=lambda m: s.update(m))
    for note in inputs.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    fp_top1 = reference.metrics.get("top1")
    fp_bytes = reference.cost["weight_memory_bits"] / 8
    table = Table(title=f"PTQ of {inputs.loaded.spec.ref} ({len(inputs.layers)} layers)")
    for col in ("bits", "top-1 %", "Δ top-1", "agree %", "KL", "weights", "×smaller", "avg w bits", "GBOPs"):
        table.add_column(col, justify="right" if col != "bits" else "left")
    for r in [reference, *results]:
        top1 = r.metrics.get("top1")
        delta = None if top1 is None or fp_top1 is None else top1 - fp_top1
        wbytes = r.cost["weight_memory_bits"] / 8
        table.add_row(
            r.label,
            fmt_num(top1),
            "" if r is reference else fmt_num(delta, "+.2f"),
            "" if r is reference else fmt_num(r.metrics.get("agreement")),
            "" if r is reference else fmt_num(r.metrics.get("kl"), ".4f"),
            fmt_bytes(wbytes),
            f"{fp_bytes / wbytes:.1f}",
            f"{r.cost['avg_weight_bits']:.2f}",
            f"{r.cost['bops'] / 1e9:.3f}",
        )
    console.print(table)
    n_eval = len(inputs.evaluation) if inputs.evaluation is not None else 0
    console.print(
        f"evaluated on {n_eval} items, calibrated on "
        f"{len(inputs.calibration) if inputs.calibration is not None else 0}; weight clipping {clip}"
    )
    write_json(
        json_path,
        {
            "command": "ptq",
            "model": inputs.loaded.spec.ref,
            "weights": inputs.loaded.source,
            "config": config.to_dict(),
            "evaluated_items": n_eval,
            "notes": inputs.notes,
            "reference": reference.to_dict(),
            "results": [r.to_dict() for r in results],
        },
    )


@app.command()
def models(json_path: Optional[Path] = typer.Option(None, "--json", help="Write the list as JSON.")) -> None:
    """List the built-in models."""
    from zoo import list_models

    table = Table(title="built-in models")
    for col in ("model", "input", "classes", "data", "description"):
        table.add_column(col)
    rows = []
    for s in list_models():
        table.add_row(s.ref, "×".join(map(str, s.input_shape)), str(s.num_classes), s.dataset or "—", s.description)
        rows.append({"model": s.ref, "input_shape": list(s.input_shape), "classes": s.num_classes,
                     "dataset": s.dataset, "description": s.description})
    console.print(table)
    write_json(json_path, {"command": "models", "models": rows})


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become a message on stderr and a non-zero exit."""
    warnings.simplefilter("ignore", UserWarning)  # zoo notes are printed as notes, not warnings
    try:
        app(args=argv, standalone_mode=False)
    except BitsearchError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as exc:  # click usage errors and anything unexpected
        # Usage errors (missing or malformed options): click's exception type, vendored by typer.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show(file=sys.stderr)
            return exc.exit_code
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]unexpected error:[/] {type(exc).__name__}: {exc} (run with --debug for a traceback)")
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
