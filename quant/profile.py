"""Measured latency: each layer at each bit option, and whole exported models, in ONNX Runtime.

    result = profile_layers(model, example_input, options=["fp", "8/8", "4/8"], batch_size=1)
    CostModel(layers, latency_table=result.table())       # the table the cost model reads

Each layer is exported alone (its QDQ form at each option, from `quant.export.onnx_qdq`) and timed on an
input of its real shape: `warmup` untimed runs, then `repeats` timed runs; the table holds the median less
the runtime's fixed cost of one call (an Identity graph on the same input, timed the same way), and the raw
spread (25th/75th percentiles, min) is kept beside it. `measure_model` times a whole exported model the
same way, so the sum of a layer table (the prediction the search uses) can be set against the measured
end-to-end latency (which also pays for the layers between, BatchNorm, pooling, additions).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .allocation import Allocation, LayerBits
from .apply import QuantConfig, apply_allocation
from .cost import _fmt_key
from .errors import BitsearchError
from .export.onnx_qdq import ExportConfig, export_float, export_onnx, ort_session
from .layers import LayerInfo, discover_layers

DEFAULT_OPTIONS = ("fp", "8/8", "4/8")


@dataclass
class Timing:
    """Seconds per run of one session: median and spread over `repeats` runs."""

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75_s - self.p25_s) / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_counts(batch_size: int, warmup: int, repeats: int) -> None:
    for what, v, lo in (("batch_size", batch_size, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BitsearchError(f"{what} must be an integer >= {lo}, got {v!r}")


def time_session(session, x: np.ndarray, warmup: int = 10, repeats: int = 50) -> Timing:
    """Time `session.run` on `x`: `warmup` untimed runs, then `repeats` timed ones."""
    _check_counts(int(x.shape[0]) or 1, warmup, repeats)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    q = np.percentile(times, [25, 75])
    return Timing(
        median_s=float(statistics.median(times)), p25_s=float(q[0]), p75_s=float(q[1]), min_s=float(min(times)),
        repeats=repeats,
    )


def measure_model(
    onnx_model: Any,
    input_shape: Sequence[int],
    batch_size: int = 1,
    provider: str = "CPUExecutionProvider",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    seed: int = 0,
) -> Timing:
    """End-to-end latency of an exported model on a random batch of `batch_size` × `input_shape`."""
    _check_counts(batch_size, warmup, repeats)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *input_shape)).astype(np.float32)
    return time_session(ort_session(onnx_model, provider, threads), x, warmup, repeats)


class _Single(nn.Module):
    """One layer as a model of its own, so it can be wrapped, exported and timed alone."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _parse_options(options: Sequence[str | LayerBits]) -> list[LayerBits]:
    out: list[LayerBits] = []
    for o in options:
        b = o if isinstance(o, LayerBits) else LayerBits.parse(str(o))
        if b not in out:
            out.append(b)
    if not out:
        raise BitsearchError("give at least one bit option to profile (e.g. fp, 8/8, 4/8)")
    return out


def layer_model(model: nn.Module, info: LayerInfo, bits: LayerBits, batch_size: int, config: QuantConfig | None,
                int4: str = "auto", seed: int = 0):
    """The ONNX graph of layer `info` alone at `bits` (random calibration data of the layer's input shape)."""
    modules = dict(model.named_modules())
    if info.name not in modules:
        raise BitsearchError(f"layer {info.name!r} is not a module of the model")
    single = _Single(copy.deepcopy(modules[info.name])).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((max(batch_size, 8), *info.input_shape), generator=gen)
    example = x[:batch_size]
    if bits.weight_bits == 32 and bits.activation_bits == 32:
        return export_float(single, example)
    q = apply_allocation(single, Allocation({"layer": bits}), calibration=x, config=config)
    return export_onnx(q, example, config=ExportConfig(int4=int4)).model  # type: ignore[arg-type]


@dataclass
class ProfileResult:
    """A measured latency table, with its spread and the conditions it was measured under."""

    timings: dict[str, dict[str, Timing]]  # layer name -> option key ("8/8", "fp/fp") -> timing
    batch_size: int
    provider: str
    warmup: int
    repeats: int
    threads: int | None
    machine: str = field(default_factory=lambda: f"{platform.machine()} {platform.processor()}".strip())
    end_to_end: dict[str, dict[str, Any]] = field(default_factory=dict)  # option -> predicted/measured
    #: per layer, the median of one `session.run` of an Identity graph on the layer's input: the runtime's
    #: fixed cost per call, which a layer inside a whole model does not pay again; the table subtracts it.
    overhead_s: dict[str, float] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float]]:
        """`{layer: {option: median seconds}}`, less the per-call overhead: what `CostModel` reads."""
        return {
            name: {k: max(t.median_s - self.overhead_s.get(name, 0.0), 0.0) for k, t in row.items()}
            for name, row in self.timings.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table(),
            "raw": {n: {k: t.to_dict() for k, t in row.items()} for n, row in self.timings.items()},
            "overhead_s": self.overhead_s,
            "batch_size": self.batch_size,
            "provider": self.provider,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "threads": self.threads,
            "machine": self.machine,
            "end_to_end": self.end_to_end,
        }


def profile_layers(
    model: nn.Module,
    example_input: Any,
    options: Sequence[str | LayerBits] = DEFAULT_OPTIONS,
    batch_size: int = 1,
    provider: str = "CPUExecutionProvider",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    config: QuantConfig | None = None,
    layers: Sequence[str] | None = None,
) -> ProfileResult:
    """Time every quantizable layer (or those named in `layers`) at every option, alone, in ONNX Runtime."""
    _check_counts(batch_size, warmup, repeats)
    bits = _parse_options(options)
    infos = discover_layers(model, example_input)
    if layers is not None:
        known = {i.name for i in infos}
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise BitsearchError(f"unknown layer(s) {unknown[:5]}; the model's layers: {sorted(known)[:10]}")
        infos = [i for i in infos if i.name in set(layers)]
    timings: dict[str, dict[str, Timing]] = {}
    overhead: dict[str, float] = {}
    for info in infos:
        row: dict[str, Timing] = {}
        x = np.random.default_rng(0).standard_normal((batch_size, *info.input_shape)).astype(np.float32)
        empty = time_session(ort_session(_identity_graph(x.shape), provider, threads), x, warmup, repeats)
        overhead[info.name] = empty.median_s
        for b in bits:
            onnx_model = layer_model(model, info, b, batch_size, config)
            sess = ort_session(onnx_model, provider, threads)
            row[_fmt_key((b.weight_bits, b.activation_bits))] = time_session(sess, x, warmup, repeats)
        timings[info.name] = row
    return ProfileResult(timings, batch_size, provider, warmup, repeats, threads, overhead_s=overhead)


def _identity_graph(shape: Sequence[int]):
    """A graph that only copies its input: the fixed cost of one `session.run` on an input of `shape`."""
    from onnx import TensorProto, helper

    shape = ["batch", *shape[1:]]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "run_overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure_allocations(
    result: ProfileResult,
    model: nn.Module,
    example_input: Any,
    allocations: dict[str, Allocation],
    calibration: Any,
    input_shape: Sequence[int],
    config: QuantConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Predicted (sum of the layer table) against measured end-to-end latency of each allocation.

    An allocation whose every layer is float is timed as the plain FP32 export. Results are also stored in
    `result.end_to_end` under the allocation's key.
    """
    from .cost import CostModel

    infos = discover_layers(model, example_input)
    cost = CostModel(infos, latency_table=result.table())
    out: dict[str, dict[str, Any]] = {}
    for key, alloc in allocations.items():
        predicted = cost.cost(alloc).latency_s
        if all(b.weight_bits == 32 and b.activation_bits == 32 for b in alloc.layers.values()):
            onnx_model = export_float(model, example_input)
        else:
            q = apply_allocation(model, alloc, calibration=calibration, config=config)
            onnx_model = export_onnx(q, example_input, allocation=alloc).model
        t = measure_model(onnx_model, input_shape, result.batch_size, result.provider, result.warmup,
                          result.repeats, result.threads)
        out[key] = {
            "predicted_s": predicted,
            "measured": t.to_dict(),
            "error_pct": 100.0 * (predicted - t.median_s) / t.median_s if predicted is not None else None,
        }
    result.end_to_end.update(out)
    return out


def measure_front_latency(
    points: Sequence[Any],
    model: nn.Module,
    example_input: Any,
    calibration: Any,
    config: QuantConfig | None = None,
    batch_size: int = 1,
    provider: str = "CPUExecutionProvider",
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
    export_config: ExportConfig | None = None,
) -> list[Timing]:
    """Measured end-to-end latency in ONNX Runtime of each front point (mixed and uniform alike).

    Each point's allocation is applied with the same calibration and `QuantConfig` as the fake-quant
    measurement, exported as a QDQ graph and timed on a random batch of `batch_size`. The median goes to
    `point.measured["latency_s"]` (the dashboard's measured latency axis), the quartiles and the relative
    interquartile spread beside it. An all-float allocation is timed as the plain FP32 export.
    """
    _check_counts(batch_size, warmup, repeats)
    example = example_input[0] if isinstance(example_input, tuple) else example_input
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise BitsearchError("end-to-end latency needs one example input tensor with a batch axis")
    shape = tuple(example.shape[1:])
    cache: dict[str, Timing] = {}
    out: list[Timing] = []
    for p in points:
        alloc = p.allocation
        key = repr(sorted((n, repr(b)) for n, b in alloc.layers.items()))
        if key not in cache:
            if all(b.weight_bits == 32 and b.activation_bits == 32 for b in alloc.layers.values()):
                onnx_model = export_float(model, example_input)
            else:
                q = apply_allocation(model, alloc, calibration=calibration, config=config)
                onnx_model = export_onnx(q, example_input, allocation=alloc, config=export_config).model
            cache[key] = measure_model(onnx_model, shape, batch_size, provider, warmup, repeats, threads)
        t = cache[key]
        p.measured.update({"latency_s": t.median_s, "latency_p25_s": t.p25_s, "latency_p75_s": t.p75_s,
                           "latency_spread": t.spread})
        out.append(t)
    return out
