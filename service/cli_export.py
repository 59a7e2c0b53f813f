"""`bitsearch export` (a QDQ ONNX model checked in ONNX Runtime) and `bitsearch profile` (a measured latency table).

They register on the one `bitsearch` app when `service.cli` imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from quant.errors import BitsearchError

from .cli import app, console, err_console, fmt_num, status, write_json


def _quant_dict(clip: str | None, act_clip: str | None, rounding: str | None, per_tensor: bool,
                calib_size: int) -> dict:
    """The flags the user gave, over the search's PTQ recipe (`quant.apply.search_quant_config`): an export
    without flags realises the allocation exactly as a default search measured it."""
    from quant.apply import QuantConfig

    given = {"weight_clip": clip, "activation_clip": act_clip, "weight_rounding": rounding}
    out = {k: v for k, v in given.items() if v is not None}
    out["calibration_samples"] = calib_size
    if per_tensor:
        out["weight_granularity"] = "per_tensor"
    QuantConfig.from_dict(out)  # a bad flag is refused before anything loads
    return out


@app.command("export")
def export_cmd(
    model: str = typer.Option(..., "--model", help="zoo:NAME or an exported .pt2 file."),
    out: Path = typer.Option(..., "--out", help="Where to write the .onnx model."),
    allocation: Optional[Path] = typer.Option(None, "--allocation", help="Allocation JSON (from a search)."),
    bits: Optional[str] = typer.Option(None, "--bits", help="Uniform W/A bits instead of an allocation, e.g. 8/8."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint or safetensors file."),
    data: Optional[str] = typer.Option(None, "--data", help="Data: zoo:NAME or an .npz file (default: the model's)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration data (zoo:NAME or .npz)."),
    calib_size: int = typer.Option(256, "--calib-size", min=1, help="Calibration samples (as the search used)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Weight clipping (default: the search's PTQ recipe)."),
    act_clip: Optional[str] = typer.Option(None, "--act-clip", help="Activation clipping (default: the search's PTQ recipe)."),
    rounding: Optional[str] = typer.Option(None, "--rounding", help="Weight rounding: nearest or gptq (default: the search's PTQ recipe)."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="One weight scale per layer."),
    int4: str = typer.Option("auto", "--int4", help="int4 weight containers: auto (where ONNX Runtime runs them), always, never."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 17, or 21 with int4)."),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into quantized convolutions (integer QLinearConv in ONNX Runtime; weights then equal up to float rounding)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the export in ONNX Runtime against the fake-quant model."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Check on at most this many items."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split (as the search used)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the export report as JSON."),
) -> None:
    """Export the model with an allocation applied as ONNX QuantizeLinear/DequantizeLinear, checked in ONNX Runtime."""
    from quant import Allocation
    from quant.export.onnx_qdq import check_fidelity
    from service.export import export_allocation

    if (allocation is None) == (bits is None):
        raise BitsearchError("give either --allocation FILE or --bits W/A (uniform)")
    spec = {
        "model": model, "weights": str(weights) if weights else None, "data": data, "calib_data": calib_data,
        "calib_size": calib_size, "seed": seed, "quant": _quant_dict(clip, act_clip, rounding, per_tensor, calib_size),
    }
    with status("exporting") as s:
        alloc = Allocation.load(allocation) if allocation is not None else str(bits)
        exported = export_allocation(spec, alloc, int4=int4, opset=opset, fold_batchnorm=fold_bn)
        out.parent.mkdir(parents=True, exist_ok=True)
        exported.result.save(out)
        fidelity = None
        evaluation = exported.inputs.evaluation
        if check and evaluation is not None:
            s.update("checking in ONNX Runtime")
            ev = evaluation.take(limit, seed=seed) if limit else evaluation
            fidelity = check_fidelity(exported.qmodel, exported.result.model, ev.x, ev.y)
    table = Table(title=f"{out} (opset {exported.result.opset})")
    for col in ("layer", "bits", "weight", "activation"):
        table.add_column(col)
    for layer in exported.result.layers:
        act = layer.activation + (" + Clip to the grid" if layer.activation_clipped else "")
        table.add_row(layer.name, layer.label, layer.weight, act)
    console.print(table)
    for note in [*exported.inputs.notes, *exported.result.notes]:
        err_console.print(f"[yellow]note:[/] {note}")
    if fidelity is not None:
        console.print(
            f"ONNX Runtime vs fake-quant on {fidelity.n} items: top-1 agreement {100 * fidelity.agreement:.2f} %, "
            f"top-1 {fmt_num(None if fidelity.accuracy_torch is None else 100 * fidelity.accuracy_torch)} % (PyTorch) / "
            f"{fmt_num(None if fidelity.accuracy_onnx is None else 100 * fidelity.accuracy_onnx)} % (ONNX), "
            f"max |Δ logit| {fidelity.max_abs_logit_diff:.3g}"
        )
    elif check:
        err_console.print("[yellow]note:[/] no evaluation data: the export was not checked in ONNX Runtime")
    write_json(json_path, {
        "command": "export", "model": model, "out": str(out), "opset": exported.result.opset,
        "layers": [l.to_dict() for l in exported.result.layers], "notes": exported.result.notes,
        "fidelity": fidelity.to_dict() if fidelity else None,
    })


@app.command("profile")
def profile_cmd(
    model: str = typer.Option(..., "--model", help="zoo:NAME or an exported .pt2 file."),
    out: Path = typer.Option(..., "--out", help="Latency table JSON (what --latency-table and CostModel read)."),
    bits: list[str] = typer.Option(["fp", "8/8", "4/8"], "--bits", help="Options to time, W/A. Repeatable."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint or safetensors file."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Batch size of the timed runs."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed runs before timing."),
    repeats: int = typer.Option(50, "--repeats", min=1, help="Timed runs (the table holds their median)."),
    provider: str = typer.Option("cpu", "--provider", help="cpu, cuda, tensorrt, or a full ONNX Runtime provider name."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ONNX Runtime intra-op threads."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--no-end-to-end", help="Also time the whole model at each option, uniform."),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration data for the end-to-end models (default: the model's)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write spread, overhead and end-to-end figures as JSON."),
) -> None:
    """Measure each layer at each bit option in ONNX Runtime: a latency table for the cost model."""
    from quant import Allocation
    from quant.cost import CostModel
    from quant.profile import measure_allocations, profile_layers
    from service.export import provider_name
    from service.pipeline import resolve_inputs

    prov = provider_name(provider)
    with status("loading the model") as s:
        inputs = resolve_inputs(model, str(weights) if weights else None, data, None)
        loaded = inputs.loaded
        s.update("timing layers")
        result = profile_layers(loaded.model, loaded.example_input, bits, batch_size, prov, warmup, repeats, threads)
        CostModel(inputs.layers, latency_table=result.table())  # the table must be one the cost model reads
        if end_to_end:
            s.update("timing whole models")
            allocs = {b: Allocation.uniform(inputs.layer_names, b) for b in bits}
            measure_allocations(result, loaded.model, loaded.example_input, allocs, inputs.calibration,
                                loaded.spec.input_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.table(), indent=2) + "\n")
    table = Table(title=f"{loaded.spec.ref}: ms per layer, batch {batch_size}, {prov} (median, overhead removed)")
    table.add_column("layer")
    keys = list(next(iter(result.timings.values())).keys())
    for k in keys:
        table.add_column(k, justify="right")
    for name, row in result.table().items():
        table.add_row(name, *(f"{1e3 * row[k]:.4f}" for k in keys))
    console.print(table)
    if result.end_to_end:
        e2e = Table(title="whole model: predicted (sum of layers) vs measured")
        for col in ("bits", "predicted ms", "measured ms", "IQR ms", "error %"):
            e2e.add_column(col, justify="right")
        for k, v in result.end_to_end.items():
            m = v["measured"]
            e2e.add_row(k, f"{1e3 * v['predicted_s']:.4f}", f"{1e3 * m['median_s']:.4f}",
                        f"{1e3 * (m['p75_s'] - m['p25_s']):.4f}", f"{v['error_pct']:+.1f}")
        console.print(e2e)
    console.print(f"latency table written to {out}")
    write_json(report, {"command": "profile", "model": loaded.spec.ref, **result.to_dict()})
