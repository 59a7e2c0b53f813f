"""Request and response bodies of the REST service (pydantic 2).

Requests refuse unknown fields, NaN and infinities; every value that reaches a job has been validated here
(bit-widths, budgets with units, layer names as strings, bounded sizes), so a bad request is a 422 and never
a job that fails later or a 5xx.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quant.allocation import VALID_BITS, LayerBits
from quant.errors import BitsearchError

T = TypeVar("T")

METRICS = ("weight_memory", "avg_weight_bits", "bops", "peak_activation_memory", "latency")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
NAME = r"^[A-Za-z0-9_.:\-]{1,100}$"
MAX_SETTINGS_BYTES = 64 * 1024


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
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        check_text(data)
        return data


def _bounded_json(v: Any, what: str, limit: int = MAX_SETTINGS_BYTES) -> Any:
    try:
        text = json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be plain JSON (no NaN or infinity)") from None
    if len(text) > limit:
        raise ValueError(f"{what} is too large ({len(text)} bytes; at most {limit})")
    return v


def _bits_text(v: str, what: str) -> str:
    try:
        return LayerBits.parse(v).label()
    except BitsearchError as exc:
        raise ValueError(f"{what}: {exc}") from None


# --- search ------------------------------------------------------------------------------------------------


class BudgetIn(Strict):
    metric: Literal["weight_memory", "avg_weight_bits", "bops", "peak_activation_memory", "latency"]
    value: float | str = Field(
        description="An upper limit: a number in internal units (bits for memory, BOPs, bits per weight, "
        "seconds) "
        "or a string with a unit, e.g. '64KiB', '1.2G', '3.5bits', '2ms'.",
        examples=["16KiB", 3.5],
    )

    @field_validator("value")
    @classmethod
    def _value(cls, v: float | str) -> float | str:
        if isinstance(v, str) and len(v) > 40:
            raise ValueError("budget value too long")
        return v

    def limit(self) -> float:
        """The limit in internal units (raises ValueError with a message when unreadable)."""
        if isinstance(self.value, (int, float)):
            if not math.isfinite(self.value) or self.value <= 0:
                raise ValueError(f"the {self.metric} budget must be a positive number")
            return float(self.value)
        try:
            from search.problem import parse_value
        except ImportError:  # pragma: no cover - search package not importable
            return float(self.value)
        try:
            return float(parse_value(self.metric, self.value))
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> "BudgetIn":
        self.limit()
        return self


class SearchOptions(Strict):
    weight_bits: list[int] = Field(
        default=[2, 3, 4, 8],
        min_length=1,
        max_length=10,
        description=f"Weight bit-widths a layer may take; one of {list(VALID_BITS)}.",
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
        description="Layer name -> 'W/A' it must take, e.g. {'conv1': '8/8'}.",
    )
    pin_first: str | None = Field(None, description="Pin the first layer, e.g. '8/8'.", max_length=16)
    pin_last: str | None = Field(None, description="Pin the last layer, e.g. '8/8'.", max_length=16)
    ties: list[list[str]] = Field(
        default_factory=list, max_length=10000, description="Groups of layers that must take the same option."
    )

    @field_validator("weight_bits", "activation_bits")
    @classmethod
    def _bits(cls, v: list[int], info) -> list[int]:
        bad = [b for b in v if b not in VALID_BITS]
        if bad:
            raise ValueError(f"{info.field_name} must be among {list(VALID_BITS)}, got {bad}")
        if info.field_name == "activation_bits" and 1 in v:
            raise ValueError("activation_bits must be at least 2 (or 16/32 for float)")
        return sorted(set(v))

    @field_validator("pins")
    @classmethod
    def _pins(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for layer, bits in v.items():
            if not layer or len(layer) > 300:
                raise ValueError("pinned layer names must be 1-300 characters")
            out[layer] = _bits_text(bits, f"pin of {layer!r}")
        return out

    @field_validator("pin_first", "pin_last")
    @classmethod
    def _pin_edge(cls, v: str | None, info) -> str | None:
        return None if v is None else _bits_text(v, info.field_name)

    @field_validator("ties")
    @classmethod
    def _ties(cls, v: list[list[str]]) -> list[list[str]]:
        for group in v:
            if not group or len(group) > 10000 or any(not n or len(n) > 300 for n in group):
                raise ValueError("each tie group needs 1 or more layer names of 1-300 characters")
        return v


class MethodSpec(Strict):
    method: str = Field("fisher", pattern=r"^[a-z0-9_\-]{1,40}$", description="Sensitivity method.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Method-specific settings.")

    @field_validator("settings")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _bounded_json(v, "sensitivity settings")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            from sensitivity import METHODS
        except Exception:  # the sensitivity package could not be imported here; the job will check
            return v
        if METHODS and v not in METHODS:
            raise ValueError(f"unknown sensitivity method {v!r}; known: {sorted(METHODS)}")
        return v


class SolverSpec(Strict):
    name: str = Field("ilp", pattern=r"^[a-z0-9_\-]{1,40}$", description="Allocation solver.")
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("settings")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _bounded_json(v, "solver settings")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            from search.solvers import SOLVERS
        except Exception:
            return v
        if SOLVERS and v not in SOLVERS:
            raise ValueError(f"unknown solver {v!r}; known: {sorted(SOLVERS)}")
        return v


class QATRecipe(BaseModel):
    """A quantization-aware fine-tuning recipe (`quant.qat.QATRecipe` fields: `steps` or `epochs`, `lr`,
    `batch_size`, `optimizer`, `weight_quantizer`, `distill`, ...); fields left out take its defaults."""

    model_config = ConfigDict(
        extra="allow", allow_inf_nan=False, json_schema_extra={"examples": [{"epochs": 2}]}
    )

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        check_text(data)
        return data

    @model_validator(mode="after")
    def _check(self) -> "QATRecipe":
        recipe = self.model_dump()
        _bounded_json(recipe, "the QAT recipe")
        try:
            from quant.qat.recipe import QATRecipe as Recipe
        except ImportError:  # pragma: no cover - QAT not installed here; the job will check
            return self
        try:
            Recipe.from_dict(recipe)
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"QAT recipe: {exc}") from None
        return self


class SearchRequest(Strict):
    model: str = Field(
        min_length=1,
        max_length=300,
        examples=["zoo:digits-cnn"],
        description="'zoo:NAME' or the id of an uploaded model.",
    )
    data: str | None = Field(
        None,
        max_length=300,
        examples=["zoo:digits"],
        description="'zoo:NAME', the id of an uploaded dataset, or null for data-free.",
    )
    budgets: list[BudgetIn] = Field(default_factory=list, max_length=5)
    latency_table: dict[str, dict[str, float]] | None = Field(
        None,
        description="Seconds per layer (name or shape key) and 'W/A' option; needed by a latency budget.",
    )
    latency_table_id: str | None = Field(
        None, max_length=64, description="The id of a stored latency table (POST /latency-tables), instead of latency_table."
    )
    options: SearchOptions = Field(default_factory=SearchOptions)
    sensitivity: MethodSpec = Field(default_factory=MethodSpec)
    solver: SolverSpec = Field(default_factory=SolverSpec)
    pareto_points: int = Field(8, ge=1, le=64, description="Points of the Pareto front to compute.")
    qat: QATRecipe | None = Field(None, description="Fine-tune the recommended points with this recipe.")
    quant: dict[str, Any] = Field(
        default_factory=dict, description="QuantConfig fields (clipping, granularity...)."
    )
    calib_size: int = Field(256, ge=1, le=100_000)
    eval_limit: int | None = Field(None, ge=1, le=10_000_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _check(self) -> "SearchRequest":
        metrics = [b.metric for b in self.budgets]
        if len(set(metrics)) != len(metrics):
            raise ValueError("give at most one budget per metric")
        if self.latency_table is not None and self.latency_table_id is not None:
            raise ValueError("give latency_table or latency_table_id, not both")
        if "latency" in metrics and not (self.latency_table or self.latency_table_id):
            raise ValueError("a latency budget needs a latency_table (or a latency_table_id)")
        if self.latency_table is not None:
            _bounded_json(self.latency_table, "latency_table", 4 * 1024**2)
            from quant.cost import LatencyTable

            try:
                LatencyTable.from_dict(self.latency_table)
            except BitsearchError as exc:
                raise ValueError(str(exc)) from None
        _bounded_json(self.quant, "quant")
        if self.quant:
            from quant.apply import QuantConfig

            try:
                QuantConfig.from_dict(self.quant)
            except BitsearchError as exc:
                raise ValueError(str(exc)) from None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"quant: {exc}") from None
        return self


class SearchAccepted(BaseModel):
    id: str
    url: str
    status: str
    job_id: str | None


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queued_seconds: float | None = None
    run_seconds: float | None = None


class SearchOut(BaseModel):
    id: str
    status: str
    progress: float
    message: str
    error: str | None
    model: str
    data: str | None
    job_id: str | None
    attempts: int
    timings: Timings
    request: dict[str, Any]
    summary: dict[str, Any] | None
    links: dict[str, str]
    finetune_jobs: list[dict[str, Any]] = Field(default_factory=list)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class SensitivityOut(BaseModel):
    search_id: str
    method: str
    table: dict[str, Any]


class PointOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    kind: str
    label: str
    predicted: float | None
    recommended: bool
    allocation_url: str | None


class ParetoOut(BaseModel):
    search_id: str
    status: str
    points: list[PointOut]
    uniform: list[PointOut]
    recommendations: list[Any]
    front: dict[str, Any]


class FinetuneRequest(Strict):
    points: list[int] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Point indices to fine-tune; default: the recommended points.",
    )
    recipe: QATRecipe = Field(default_factory=QATRecipe)


class FinetuneAccepted(BaseModel):
    search_id: str
    jobs: list[dict[str, Any]]


# --- uploads -----------------------------------------------------------------------------------------------


class ModelOut(BaseModel):
    id: str
    name: str
    format: str
    architecture: str | None
    filename: str
    size_bytes: int
    sha256: str
    info: dict[str, Any]
    created_at: datetime


class DatasetOut(BaseModel):
    id: str
    name: str
    filename: str
    size_bytes: int
    sha256: str
    info: dict[str, Any]
    created_at: datetime


# --- jobs and schedules ------------------------------------------------------------------------------------


class JobOut(BaseModel):
    id: str
    kind: str
    queue: str
    status: str
    progress: float
    message: str
    attempts: int
    max_attempts: int
    error: str | None
    result: dict[str, Any] | None
    schedule_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class PTQRequest(Strict):
    """A scheduled post-training-quantization run at uniform bit-widths."""

    model: str = Field(min_length=1, max_length=300)
    data: str | None = Field(None, max_length=300)
    bits: list[str] = Field(default=["8/8", "4/8"], min_length=1, max_length=16)
    calib_size: int = Field(256, ge=1, le=100_000)
    eval_limit: int | None = Field(None, ge=1)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[str]) -> list[str]:
        for b in v:
            if len(b) > 16:
                raise ValueError("bits entries look like '4/8'")
            _bits_text(b, "bits")
        return v


class ScheduleIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    cron: str = Field(
        min_length=1,
        max_length=120,
        examples=["0 3 * * *"],
        description="Five cron fields: minute hour day month weekday (UTC).",
    )
    kind: Literal["search", "ptq"] = "search"
    spec: dict[str, Any] = Field(description="A SearchRequest (kind 'search') or a PTQRequest (kind 'ptq').")
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a schedule needs a non-blank name")
        return v


class ScheduleOut(BaseModel):
    id: str
    name: str
    cron: str
    kind: str
    enabled: bool
    request: dict[str, Any] | None
    created_at: datetime
    last_tick: datetime | None
