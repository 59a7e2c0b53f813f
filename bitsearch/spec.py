"""`SearchSpec`: the one description of a search, and the only place its defaults live.

The Python API (`bitsearch.search`) builds it from keyword arguments, the CLI from its flags, `POST /search`
accepts it as its body (the REST schema is this model plus the job metadata beside it), a job stores it
and a worker runs it. It refuses unknown fields, NaN and infinities, and checks every value it can before
anything expensive runs (bit-widths, budgets with units, pins, solver and method settings).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quant.allocation import VALID_BITS, LayerBits
from quant.errors import BitsearchError

METRICS = ("weight_memory", "avg_weight_bits", "bpw", "bops", "peak_activation_memory", "latency")
ROLES = ("train", "calibration", "selection", "report")
MAX_SETTINGS_BYTES = 64 * 1024
MAX_CLASSES = 100_000  # a label above this is not a class index (issue: labels of 2**40 were accepted)


def check_text(v: Any, depth: int = 0) -> None:
    """Refuse strings a database cannot store: NUL characters and lone surrogates (in keys too)."""
    if depth > 50:
        raise ValueError("the request is nested too deeply")
    if isinstance(v, str):
        if "\x00" in v:
            raise ValueError("text may not contain NUL characters")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            check_text(k, depth + 1)
            check_text(x, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            check_text(x, depth + 1)


class Strict(BaseModel):
    """A model that refuses unknown fields, NaN, infinities and text a database cannot store."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        check_text(data)
        return data


def bounded_json(v: Any, what: str, limit: int = MAX_SETTINGS_BYTES) -> Any:
    try:
        text = json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be plain JSON (no NaN or infinity)") from None
    if len(text) > limit:
        raise ValueError(f"{what} is too large ({len(text)} bytes; at most {limit})")
    return v


def bits_text(v: str | LayerBits, what: str) -> str:
    """The canonical 'W/A' text of a bit option (e.g. '8/8', '4/fp'), which `LayerBits.parse` reads back."""
    try:
        b = v if isinstance(v, LayerBits) else LayerBits.parse(v)
    except BitsearchError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if b.weight_quantizer:
        raise ValueError(f"{what}: give plain bit-widths W/A (e.g. 8/8)")

    def part(n: int) -> str:
        return "fp" if n >= 32 else "fp16" if n == 16 else str(n)

    return f"{part(b.weight_bits)}/{part(b.activation_bits)}"


# --- parts of the spec -------------------------------------------------------------------------------------


class BudgetIn(Strict):
    """An upper limit on one cost metric. Also written as text: 'avg_wbits=3', 'bops<=1.2G'."""

    metric: Literal["weight_memory", "avg_weight_bits", "bpw", "bops", "peak_activation_memory", "latency"]
    value: float | str = Field(
        description="An upper limit: a number in internal units (bits for memory, BOPs, bits per weight, "
        "seconds) or a string with a unit, e.g. '64KiB', '1.2G', '3.5bits', '2ms'.",
        examples=["16KiB", 3.5],
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            from search.budgets import canonical_metric

            s = data.strip()
            sep = "<=" if "<=" in s else "=" if "=" in s else ":" if ":" in s else None
            if sep is None:
                raise ValueError(f"a budget looks like metric=value (e.g. avg_wbits=3), got {data!r}")
            name, _, value = s.partition(sep)
            try:
                metric = canonical_metric(name)
            except BitsearchError as exc:
                raise ValueError(str(exc)) from None
            return {"metric": metric, "value": value.strip()}
        return data

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a budget value must be a number or a text with a unit, not true/false")
        if isinstance(v, str) and len(v) > 40:
            raise ValueError("budget value too long")
        return v

    def limit(self) -> float:
        """The limit in internal units (raises ValueError with a message when unreadable)."""
        if isinstance(self.value, (int, float)):
            if not math.isfinite(self.value) or self.value <= 0:
                raise ValueError(f"the {self.metric} budget must be a positive number")
            return float(self.value)
        from search.budgets import parse_value

        try:
            return float(parse_value(self.metric, self.value))
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None

    def text(self) -> str:
        return f"{self.metric}={self.limit()!r}"

    @model_validator(mode="after")
    def _check(self) -> "BudgetIn":
        self.limit()
        return self


class SearchOptions(Strict):
    """The options a layer may take and what the search may not change."""

    weight_bits: list[int] = Field(
        default=[2, 3, 4, 5, 6, 8],
        min_length=0,
        max_length=10,
        description=f"Weight bit-widths a layer may take (integer, per channel); among {list(VALID_BITS)}. "
                    "May be empty when `schemes` names the options.",
    )
    schemes: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="Named weight schemes a layer may take besides `weight_bits` (quant.formats), e.g. "
                    "'int4-g128', 'int4-g128-asym', 'fp8-e4m3', 'mxfp4', 'nvfp4'; each combined with every "
                    "activation option. Priced by sensitivity methods that support schemes (measured, fisher, hessian).",
    )
    activation_bits: list[int] = Field(
        default=[32],
        min_length=1,
        max_length=10,
        description="Activation bit-widths; 32 = float (weights-only search).",
    )
    pins: dict[str, str] = Field(
        default_factory=dict,
        max_length=10000,
        description="Layer name -> the 'W/A' option it must take, e.g. {'conv1': '8/8'}.",
    )
    pin_first: str | None = Field(None, description="Pin the first layer, e.g. '8/8'.", max_length=16)
    pin_last: str | None = Field(None, description="Pin the last layer, e.g. '8/8'.", max_length=16)
    keep_first_last: bool = Field(False, description="Pin the first and last layer at 8/8 (unless pinned).")
    ties: list[list[str]] | None = Field(
        None, max_length=10000,
        description="Groups of layers that must take the same option. None (default): a transformer's fused "
                    "projections (q/k/v, gate/up) are tied, other models have no ties; [] ties nothing.",
    )

    @field_validator("weight_bits", "activation_bits")
    @classmethod
    def _bits(cls, v: list[int], info) -> list[int]:
        bad = [b for b in v if isinstance(b, bool) or b not in VALID_BITS]
        if bad:
            raise ValueError(f"{info.field_name} must be among {list(VALID_BITS)}, got {bad}")
        if info.field_name == "activation_bits" and 1 in v:
            raise ValueError("activation_bits must be at least 2 (or 16/32 for float)")
        return sorted(set(v))

    @field_validator("schemes")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            try:
                out.append(LayerBits.of(name).scheme_name)
            except BitsearchError as exc:
                raise ValueError(f"schemes: {exc}") from None
        return list(dict.fromkeys(out))

    @model_validator(mode="after")
    def _some_option(self) -> "SearchOptions":
        if not self.weight_bits and not self.schemes:
            raise ValueError("give at least one weight option: weight_bits or schemes")
        return self

    @field_validator("pins")
    @classmethod
    def _pins(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for layer, bits in v.items():
            if not layer or len(layer) > 300:
                raise ValueError("pinned layer names must be 1-300 characters")
            out[layer] = bits_text(bits, f"pin of {layer!r}")
        return out

    @field_validator("pin_first", "pin_last")
    @classmethod
    def _pin_edge(cls, v: str | None, info) -> str | None:
        return None if v is None else bits_text(v, info.field_name)

    @field_validator("ties")
    @classmethod
    def _ties(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        for group in v or []:
            if not group or len(group) > 10000 or any(not n or len(n) > 300 for n in group):
                raise ValueError("each tie group needs 1 or more layer names of 1-300 characters")
        return v

    def constraints(self):
        """The `search.Constraints` these options describe."""
        from search import Constraints

        eight = LayerBits(8, 8)
        first = LayerBits.parse(self.pin_first) if self.pin_first else (eight if self.keep_first_last else None)
        last = LayerBits.parse(self.pin_last) if self.pin_last else (eight if self.keep_first_last else None)
        return Constraints(
            pinned={k: LayerBits.parse(b) for k, b in self.pins.items()},
            ties=[tuple(g) for g in self.ties or []],
            pin_first=first,
            pin_last=last,
        )


class MethodSpec(Strict):
    """The sensitivity method and its settings (checked against the method's own config)."""

    method: str = Field("hessian", pattern=r"^[a-z0-9_\-]{1,40}$", description="Sensitivity method.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Method-specific settings.")
    samples: int = Field(256, ge=1, le=100_000, description="Data items the method may use.")

    @field_validator("settings")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return bounded_json(v, "sensitivity settings")

    @model_validator(mode="after")
    def _known(self) -> "MethodSpec":
        from .registry import sensitivity_methods

        try:
            sensitivity_methods.check(self.method, self.settings)
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None
        return self


class SolverSpec(Strict):
    """The allocation solver and its settings (checked against the solver's own config)."""

    name: str = Field("ilp", pattern=r"^[a-z0-9_\-]{1,40}$", description="Allocation solver.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Solver-specific settings.")

    @field_validator("settings")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return bounded_json(v, "solver settings")

    @model_validator(mode="after")
    def _known(self) -> "SolverSpec":
        from .registry import solvers

        try:
            solvers.check(self.name, self.settings)
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None
        return self


RoleName = Literal["data", "train", "calibration", "selection", "report"]


class RoleData(Strict):
    """Where one role's data comes from: a source (zoo:NAME, an .npz path, or an uploaded data set's id), or
    `size` items split off another role's set (`split_of`), disjoint from what that role keeps."""

    source: str | None = Field(None, min_length=1, max_length=300)
    split_of: RoleName | None = None
    size: int | None = Field(None, ge=1, le=10_000_000, description="Items to take (seeded random).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one(self) -> "RoleData":
        if self.source == "none":
            raise ValueError("a data role needs data: 'none' (data-free) is only for 'data'")
        if (self.source is None) == (self.split_of is None):
            raise ValueError("a data role needs exactly one of 'source' and 'split_of'")
        if self.split_of is not None and self.size is None:
            raise ValueError("a split needs its 'size' (items)")
        return self


class DataRoles(Strict):
    """Data by role. A role left out is derived from `data` (see `bitsearch.data.resolve_data`): train from
    its train split, calibration from its calibration split (else split off the evaluation part), selection
    and report as two disjoint halves of its evaluation part."""

    train: RoleData | None = Field(None, description="Fine-tuning (QAT) data.")
    calibration: RoleData | None = Field(None, description="Sensitivity and quantizer calibration data.")
    selection: RoleData | None = Field(None, description="Data the recommendation is chosen on.")
    report: RoleData | None = Field(None, description="Held-out data the chosen points are reported on.")

    @model_validator(mode="after")
    def _acyclic(self) -> "DataRoles":
        for role in ROLES:
            seen, r = [role], getattr(self, role)
            while r is not None and r.split_of is not None and r.split_of != "data":
                if r.split_of in seen:
                    raise ValueError(f"data roles split from each other in a cycle: {' -> '.join(seen)}")
                seen.append(r.split_of)
                r = getattr(self, r.split_of)
        return self

    def sources(self) -> dict[str, str]:
        return {r: getattr(self, r).source for r in ROLES if getattr(self, r) and getattr(self, r).source}


# --- the spec ------------------------------------------------------------------------------------------------


class LatencyMeasurement(Strict):
    """End-to-end latency of every front point, exported as ONNX QDQ and timed in ONNX Runtime (off by default)."""

    enabled: bool = Field(False, description="Time each point of the measured front in ONNX Runtime.")
    batch_size: int = Field(1, ge=1, le=4096, description="Batch the model is timed on.")
    warmup: int = Field(5, ge=0, le=1000, description="Untimed runs before the timed ones.")
    repeats: int = Field(20, ge=1, le=10_000, description="Timed runs; the median and the quartiles are kept.")
    provider: str = Field("CPUExecutionProvider", min_length=1, max_length=80,
                          description="ONNX Runtime execution provider (CPU, CUDA, TensorRT...).")
    threads: int | None = Field(None, ge=1, le=1024, description="Intra-op threads (default: the runtime's).")

    @model_validator(mode="after")
    def _runtime(self) -> "LatencyMeasurement":
        if not self.enabled:
            return self
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort
        except ImportError:
            raise ValueError("measuring latency needs 'onnx' and 'onnxruntime': pip install 'bitsearch[export]'"
                             ) from None
        available = ort.get_available_providers()
        if self.provider not in available:
            raise ValueError(f"execution provider {self.provider!r} is not available here; available: {available}")
        return self


class SearchSpec(Strict):
    """One search request. Every default of a search is here and nowhere else."""

    model: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        examples=["zoo:digits-cnn"],
        description="'zoo:NAME', an exported .pt2 path, or (REST) the id of an uploaded model. None when the "
        "Python API is given a model object.",
    )
    weights: str | None = Field(None, max_length=1000, description="A weights file for a zoo architecture.")
    data: str | None = Field(
        None,
        max_length=300,
        examples=["zoo:digits"],
        description="'zoo:NAME', an .npz path or (REST) an uploaded data set's id; null: the model's own zoo "
        "data set; 'none': data-free calibration.",
    )
    roles: DataRoles = Field(default_factory=DataRoles, description="Data by role; see DataRoles.")
    budgets: list[BudgetIn] = Field(default_factory=list, max_length=5)
    latency_table: dict[str, dict[str, float]] | None = Field(
        None,
        description="Seconds per layer (name or shape key) and 'W/A' option; needed by a latency budget.",
    )
    options: SearchOptions = Field(default_factory=SearchOptions)
    sensitivity: MethodSpec = Field(default_factory=MethodSpec)
    solver: SolverSpec = Field(default_factory=SolverSpec)
    pareto_points: int = Field(10, ge=1, le=64, description="Points of the Pareto sweep.")
    pareto_metric: str | None = Field(
        None, max_length=40, description="Cost axis of the sweep; default: the first budget's metric."
    )
    measure: bool = Field(True, description="Measure every point of the front (else: predicted only).")
    measure_latency: LatencyMeasurement = Field(
        default_factory=LatencyMeasurement,
        description="Also time every measured front point end to end in ONNX Runtime (point.measured.latency_s).",
    )
    quant: dict[str, Any] = Field(
        default_factory=dict,
        description="QuantConfig fields (clipping, granularity...), over the search's recipe "
        "(quant.apply.SEARCH_PTQ_DEFAULTS: output-MSE weight clipping, GPTQ rounding, MSE activation clipping, "
        "bias correction) when calibration data exist.",
    )
    calib_size: int = Field(256, ge=1, le=100_000, description="Calibration items.")
    eval_limit: int | None = Field(None, ge=1, le=10_000_000, description="At most this many evaluation items.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    refine: bool | dict[str, Any] = Field(
        True,
        description="Interaction-aware refinement of the solver's point at the requested budgets (measured in "
        "the quantized network): true, false, or settings {max_passes (default: passes_per_variable x the "
        "number of decision variables), passes_per_variable, max_rounds, verify_per_round, batch_size, "
        "measure_samples}.",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1.0,
        description="Confidence level of the paired test that lets a mixed allocation replace the best uniform "
        "one, and of every interval shown.",
    )
    report_points: Literal["evidence", "all"] = Field(
        "evidence",
        description="Which front points are measured on the report data: 'evidence' (default) only the points "
        "shown with evidence (the recommendation at the requested budgets, its uniform baseline and its mixed "
        "contender; without budgets, those of every swept budget), 'all' every point. The recommendations are "
        "the same either way (they are chosen on the selection data); 'all' costs one report pass per point.",
    )

    @field_validator("refine")
    @classmethod
    def _refine(cls, v: Any) -> Any:
        from search.refine import RefineConfig

        try:
            RefineConfig.from_dict(v)
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("pareto_metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from search.budgets import canonical_metric

        try:
            return canonical_metric(v)
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        metrics = [b.metric for b in self.budgets]
        if len(set(metrics)) != len(metrics):
            raise ValueError("give at most one budget per metric")
        if self.options.schemes:
            from sensitivity.base import check_schemes

            try:
                check_schemes(self.sensitivity.method, self.options.schemes)
            except BitsearchError as exc:
                raise ValueError(str(exc)) from None
        # (a REST request may name a stored table instead: `latency_table_id`, copied in before it runs)
        if "latency" in metrics + [self.pareto_metric] and not (
                self.latency_table or getattr(self, "latency_table_id", None)):
            raise ValueError("a latency budget needs a latency_table (or, through the API, a latency_table_id)")
        if self.latency_table is not None:
            bounded_json(self.latency_table, "latency_table", 4 * 1024**2)
            from quant.cost import LatencyTable

            try:
                LatencyTable.from_dict(self.latency_table)
            except BitsearchError as exc:
                raise ValueError(str(exc)) from None
        bounded_json(self.quant, "quant")
        if self.quant:
            from quant.apply import QuantConfig

            try:
                QuantConfig.from_dict(self.quant)
            except BitsearchError as exc:
                raise ValueError(str(exc)) from None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"quant: {exc}") from None
        if self.data == "none" and self.roles.calibration is not None:
            raise ValueError("data 'none' (data-free) and a calibration role contradict each other")
        return self

    # --- conveniences ---

    @classmethod
    def parse(cls, d: Any) -> "SearchSpec":
        """`model_validate` with the library's error type: a `BitsearchError` that names every problem."""
        from pydantic import ValidationError

        if isinstance(d, SearchSpec):
            return d
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            raise BitsearchError("invalid search spec: " + describe_errors(exc)) from None

    def budget_texts(self) -> list[str]:
        return [b.text() for b in self.budgets]

    @property
    def data_free(self) -> bool:
        return self.data == "none"


def describe_errors(exc) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def spec_defaults() -> dict[str, Any]:
    """Every default, flattened to dotted names ('sensitivity.method': 'hessian', ...)."""
    out: dict[str, Any] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name, value in model:
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                out[prefix + name] = value

    walk(SearchSpec(), "")
    return out
