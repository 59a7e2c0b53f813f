"""The hardware cost of an allocation: weight memory, BOPs, activation memory and (optionally) latency.

Everything here is arithmetic on the `LayerInfo` records of `quant.layers.discover_layers`, so costing an
allocation needs no model and no forward pass; the solvers call `CostModel.option_table` once and then work on
plain arrays. Units: memory in bits (bytes via the `*_bytes` properties), BOPs as integers, latency in
seconds.

Conventions, chosen so that numbers match the usual papers and stay comparable between allocations:

* Float bits (16/32) count as 16/32 everywhere: a float layer stores params × 16 or 32 bits, has no scale
  overhead, and its BOPs are MACs × 16 × 32 etc. (a crude but monotone stand-in for a float MAC's cost).
* Integer weights carry scales: one per output channel (`weight_granularity="per_channel"`) or one per
  tensor, each `scale_bits` wide. Binary weights (1 bit, XNOR-style) always have per-channel scales, since
  that is how binary layers are defined; ternary (2-bit slot) follows the granularity like any integer layer.
* Bias terms stay in high precision and are not counted (they are not in `LayerInfo.params`).
* An option with a named weight scheme (`LayerBits.scheme`: int4-g128, mxfp4, nvfp4, fp8-e4m3, ...) stores
  exactly what its `quant.formats` format says, scales and zero points included, whatever the model's
  `scale_bits`/granularity: the weight is viewed as `weight.flatten(1)` (rows × the input elements one row
  multiplies) and groups run along the inputs. BOPs use the scheme's element bits.
* `bpw` (bits per weight) is the weight memory divided by the number of weights: the effective bits that
  ModelOpt, AutoRound and llama.cpp budget, INT4 g128 with fp16 scales = 4.125, MXFP4 = 4.25, NVFP4 = 4.5
  (+ 32 bits per tensor). `avg_weight_bits` is the nominal element width without any scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .allocation import Allocation, LayerBits, is_float_bits
from .errors import BitsearchError
from .layers import LayerInfo

#: The metrics a budget may constrain, in the units of `CostReport.metrics()`.
METRICS = ("weight_memory", "avg_weight_bits", "bpw", "bops", "peak_activation_memory", "latency")

#: Metrics that add up over layers; the others (peak_activation_memory) combine by max.
SUM_METRICS = ("weight_memory", "avg_weight_bits", "bpw", "bops", "latency")
MAX_METRICS = ("peak_activation_memory",)

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")

BitsKey = tuple[int, int]  # (weight_bits, activation_bits)


# --- latency table ----------------------------------------------------------------------------------


def _option_key(key: Any, where: str) -> BitsKey:
    """Normalise a latency-table option key ("4/8", "fp", (4, 8), LayerBits) to (weight_bits, act_bits)."""
    if isinstance(key, LayerBits):
        return (key.weight_bits, key.activation_bits)
    try:
        if isinstance(key, tuple) and len(key) == 2:
            b = LayerBits(*key)  # validates both bit-widths
            return (b.weight_bits, b.activation_bits)
        if isinstance(key, (str, int)) and not isinstance(key, bool):
            b = LayerBits.parse(str(key))
            return (b.weight_bits, b.activation_bits)
    except BitsearchError as exc:
        raise BitsearchError(f"{where}: {exc}") from None
    raise BitsearchError(f"{where}: an option must look like 'W/A' (e.g. '4/8'), got {key!r}")


def _fmt_key(key: BitsKey) -> str:
    w, a = key
    return f"{'fp' if w == 32 else w}/{'fp' if a == 32 else a}"


@dataclass
class LatencyTable:
    """Measured seconds per layer and bit option.

    Keys are a layer name (this model only) or a layer `shape_key` (shareable between models that contain
    the same layer shape); the name wins when both are present. Options are (weight_bits, activation_bits);
    the weight quantizer (ternary, binary) is not part of the key, since a kernel is chosen by bit-width.
    """

    entries: dict[str, dict[BitsKey, float]]

    def __post_init__(self) -> None:
        if not self.entries:
            raise BitsearchError("the latency table is empty: give at least one layer with timed options")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyTable":
        """Read `{"layer name or shape key": {"4/8": 1.2e-4, "fp": 3e-4, ...}, ...}`."""
        if not isinstance(data, Mapping):
            raise BitsearchError(f"a latency table must be a JSON object, got {type(data).__name__}")
        entries: dict[str, dict[BitsKey, float]] = {}
        for layer, options in data.items():
            where = f"latency table, layer {layer!r}"
            if not isinstance(layer, str) or not layer:
                raise BitsearchError(f"latency table: keys must be layer names or shape keys, got {layer!r}")
            if not isinstance(options, Mapping) or not options:
                raise BitsearchError(f"{where}: expected a non-empty object like {{\"4/8\": 1.2e-4}}")
            row: dict[BitsKey, float] = {}
            for opt, secs in options.items():
                key = _option_key(opt, where)
                if isinstance(secs, bool) or not isinstance(secs, (int, float)):
                    raise BitsearchError(f"{where}, option {opt!r}: seconds must be a number, got {secs!r}")
                if not math.isfinite(secs) or secs < 0:
                    raise BitsearchError(
                        f"{where}, option {opt!r}: seconds must be finite and non-negative, got {secs!r}"
                    )
                if key in row:
                    raise BitsearchError(f"{where}: option {_fmt_key(key)} is given twice (as {opt!r})")
                row[key] = float(secs)
            entries[layer] = row
        return cls(entries)

    @classmethod
    def from_json(cls, path: str | Path) -> "LatencyTable":
        p = Path(path)
        if not p.is_file():
            raise BitsearchError(f"latency table file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BitsearchError(f"the latency table {p} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: {f"{w}/{a}": s for (w, a), s in row.items()} for k, row in self.entries.items()}

    def options_for(self, layer: LayerInfo) -> list[BitsKey]:
        """Every option timed for `layer`, by name or by shape key."""
        keys = set(self.entries.get(layer.name, {})) | set(self.entries.get(layer.shape_key, {}))
        return sorted(keys)

    def lookup(self, layer: LayerInfo, bits: LayerBits) -> float:
        """Seconds for `layer` at `bits`: the name's entry first, then the shape key's."""
        key = (bits.weight_bits, bits.activation_bits)
        for k in (layer.name, layer.shape_key):
            row = self.entries.get(k)
            if row is not None and key in row:
                return row[key]
        avail = self.options_for(layer)
        if not avail:
            raise BitsearchError(
                f"the latency table has no entry for layer {layer.name!r} "
                f"(nor for its shape key {layer.shape_key!r})"
            )
        raise BitsearchError(
            f"the latency table has no option {_fmt_key(key)} for layer {layer.name!r}; "
            f"it has {[_fmt_key(k) for k in avail]}"
        )


# --- reports ----------------------------------------------------------------------------------------


@dataclass
class LayerCost:
    """The cost of one layer at one bit option."""

    name: str
    bits: LayerBits
    params: int
    macs: int
    weight_memory_bits: int  # params × w_bits + scale overhead
    scale_overhead_bits: int
    bops: int  # MACs × w_bits × a_bits
    activation_memory_bits: int  # input-activation elements × a_bits
    latency_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits.to_dict(),
            "label": self.bits.label(),
            "params": self.params,
            "macs": self.macs,
            "weight_memory_bits": self.weight_memory_bits,
            "scale_overhead_bits": self.scale_overhead_bits,
            "bops": self.bops,
            "activation_memory_bits": self.activation_memory_bits,
            "latency_s": self.latency_s,
        }


@dataclass
class CostReport:
    """The cost of a whole allocation, per layer and in total."""

    layers: list[LayerCost]
    weight_memory_bits: int
    avg_weight_bits: float  # Σ params·w_bits / Σ params: the storage per weight, without scale overhead
    bops: int
    peak_activation_bits: int  # a per-layer peak: the largest input-activation a single layer holds
    latency_s: float | None = None  # sum over layers; None without a latency table
    bpw: float = 0.0  # weight_memory_bits / Σ params: bits per weight including scales and zero points

    @property
    def weight_memory_bytes(self) -> float:
        return self.weight_memory_bits / 8

    @property
    def peak_activation_bytes(self) -> float:
        return self.peak_activation_bits / 8

    def metrics(self) -> dict[str, float | None]:
        """The totals under the names of `METRICS` (memory in bits, latency in seconds)."""
        return {
            "weight_memory": float(self.weight_memory_bits),
            "avg_weight_bits": self.avg_weight_bits,
            "bpw": self.bpw,
            "bops": float(self.bops),
            "peak_activation_memory": float(self.peak_activation_bits),
            "latency": self.latency_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_memory_bits": self.weight_memory_bits,
            "weight_memory_bytes": self.weight_memory_bytes,
            "avg_weight_bits": self.avg_weight_bits,
            "bpw": self.bpw,
            "bops": self.bops,
            "peak_activation_bits": self.peak_activation_bits,
            "peak_activation_bytes": self.peak_activation_bytes,
            "latency_s": self.latency_s,
            "layers": [c.to_dict() for c in self.layers],
        }


# --- the model --------------------------------------------------------------------------------------


class CostModel:
    """Costs allocations of one model's layers; see the module docstring for the conventions."""

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        latency_table: LatencyTable | Mapping[str, Any] | None = None,
        weight_granularity: str = "per_channel",
        scale_bits: int = 32,
    ) -> None:
        self.layers: list[LayerInfo] = list(layers)
        if not self.layers:
            raise BitsearchError("the cost model needs at least one layer")
        self._by_name: dict[str, LayerInfo] = {}
        for layer in self.layers:
            if layer.name in self._by_name:
                raise BitsearchError(f"layer {layer.name!r} appears twice in the layer list")
            self._by_name[layer.name] = layer
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise BitsearchError(
                f"weight_granularity must be one of {list(WEIGHT_GRANULARITIES)}, got {weight_granularity!r}"
            )
        if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or scale_bits < 0:
            raise BitsearchError(f"scale_bits must be a non-negative integer, got {scale_bits!r}")
        self.weight_granularity = weight_granularity
        self.scale_bits = scale_bits
        if latency_table is not None and not isinstance(latency_table, LatencyTable):
            latency_table = LatencyTable.from_dict(latency_table)
        self.latency_table: LatencyTable | None = latency_table
        self.total_params = sum(layer.params for layer in self.layers)
        if self.total_params <= 0:
            raise BitsearchError("the layers have no weights to quantize (total params is 0)")

    # --- small accessors -----------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def has_latency(self) -> bool:
        return self.latency_table is not None

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def layer(self, name: str) -> LayerInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise BitsearchError(f"unknown layer {name!r}") from None

    def _channels(self, layer: LayerInfo) -> int:
        # `out_channels` is 0 only in hand-made LayerInfo records; the weight's first dim is the best guess.
        return layer.out_channels or (layer.weight_shape[0] if layer.weight_shape else 1)

    def _scale_count(self, layer: LayerInfo, bits: LayerBits) -> int:
        """How many scales the layer's weights carry at `bits` (0 for float weights)."""
        if is_float_bits(bits.weight_bits):
            return 0
        binary = bits.weight_bits == 1 or bits.weight_quantizer == "binary"
        if binary or self.weight_granularity == "per_channel":
            return self._channels(layer)
        return 1

    def storage_bits(self, layer: LayerInfo, bits: LayerBits) -> int:
        """The layer's weight storage at `bits`, scales and zero points included."""
        fmt = bits.format
        if fmt is not None:
            rows = layer.weight_shape[0] if layer.weight_shape else self._channels(layer)
            return fmt.storage_bits(rows, max(1, layer.params // max(1, rows)))
        return layer.params * bits.weight_bits + self._scale_count(layer, bits) * self.scale_bits

    # --- costing ---------------------------------------------------------------------------------------
    def layer_cost(self, name: str, bits: LayerBits) -> LayerCost:
        layer = self.layer(name)
        w, a = bits.weight_bits, bits.activation_bits
        storage = self.storage_bits(layer, bits)
        overhead = storage - layer.params * w
        return LayerCost(
            name=name,
            bits=bits,
            params=layer.params,
            macs=layer.macs,
            weight_memory_bits=storage,
            scale_overhead_bits=overhead,
            bops=layer.macs * w * a,
            activation_memory_bits=layer.input_numel * a,
            latency_s=self.latency_table.lookup(layer, bits) if self.latency_table else None,
        )

    def layer_metrics(self, name: str, bits: LayerBits) -> dict[str, float]:
        """One layer's contribution to each metric (latency only with a table).

        Sum metrics add up to the report's totals (avg_weight_bits is params·w / Σ params for that reason);
        peak_activation_memory is the layer's own input size, and the total is the max over layers.
        """
        c = self.layer_cost(name, bits)
        out = {
            "weight_memory": float(c.weight_memory_bits),
            "avg_weight_bits": c.params * bits.weight_bits / self.total_params,
            "bpw": c.weight_memory_bits / self.total_params,
            "bops": float(c.bops),
            "peak_activation_memory": float(c.activation_memory_bits),
        }
        if c.latency_s is not None:
            out["latency"] = c.latency_s
        return out

    def cost(self, allocation: Allocation | Mapping[str, LayerBits]) -> CostReport:
        """The cost of an allocation that names exactly this model's layers."""
        alloc = allocation if isinstance(allocation, Allocation) else Allocation(dict(allocation))
        alloc.check_layers(self.layer_names)
        costs = [self.layer_cost(layer.name, alloc[layer.name]) for layer in self.layers]
        latency = sum(c.latency_s for c in costs) if self.latency_table else None  # type: ignore[misc]
        memory = sum(c.weight_memory_bits for c in costs)
        return CostReport(
            bpw=memory / self.total_params,
            layers=costs,
            weight_memory_bits=memory,
            avg_weight_bits=sum(c.params * c.bits.weight_bits for c in costs) / self.total_params,
            bops=sum(c.bops for c in costs),
            peak_activation_bits=max(c.activation_memory_bits for c in costs),
            latency_s=latency,
        )

    def uniform(self, bits: LayerBits | str) -> CostReport:
        """The cost of giving every layer the same option."""
        return self.cost(Allocation.uniform(self.layer_names, bits))

    def fp32(self) -> CostReport:
        """The unquantized baseline (weights and activations in float32)."""
        return self.uniform(LayerBits(32, 32))

    def option_table(
        self, options: Sequence[LayerBits], metrics: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Per-layer contribution of every option: `{metric: float64 array (n_layers, n_options)}`.

        Rows follow `self.layers`, columns follow `options`. Entry [i, j] equals
        `layer_metrics(layers[i].name, options[j])[metric]`, so a solver sums a choice's column entries for
        the sum metrics and takes their max for peak_activation_memory. `metrics` defaults to every metric
        this model can compute (latency only with a table); asking for latency without one is an error.
        """
        opts = list(options)
        if not opts:
            raise BitsearchError("option_table needs at least one bit option")
        if metrics is None:
            wanted = [m for m in METRICS if m != "latency" or self.latency_table is not None]
        else:
            wanted = list(metrics)
            bad = [m for m in wanted if m not in METRICS]
            if bad:
                raise BitsearchError(f"unknown metric(s) {bad}; known: {list(METRICS)}")
            if "latency" in wanted and self.latency_table is None:
                raise BitsearchError("the latency metric needs a latency table (none was given)")

        params = np.array([layer.params for layer in self.layers], dtype=np.float64)[:, None]
        w = np.array([o.weight_bits for o in opts], dtype=np.float64)[None, :]
        a = np.array([o.activation_bits for o in opts], dtype=np.float64)[None, :]
        out: dict[str, np.ndarray] = {}
        if "weight_memory" in wanted or "bpw" in wanted:
            storage = np.array(
                [[self.storage_bits(layer, o) for o in opts] for layer in self.layers], dtype=np.float64
            )
            out["weight_memory"] = storage
            out["bpw"] = storage / self.total_params
        if "avg_weight_bits" in wanted:
            out["avg_weight_bits"] = params * w / self.total_params
        if "bops" in wanted:
            macs = np.array([layer.macs for layer in self.layers], dtype=np.float64)[:, None]
            out["bops"] = macs * w * a
        if "peak_activation_memory" in wanted:
            numel = np.array([layer.input_numel for layer in self.layers], dtype=np.float64)[:, None]
            out["peak_activation_memory"] = numel * a
        if "latency" in wanted:
            table = self.latency_table
            assert table is not None
            out["latency"] = np.array(
                [[table.lookup(layer, o) for o in opts] for layer in self.layers], dtype=np.float64
            )
        return {m: out[m] for m in wanted}
