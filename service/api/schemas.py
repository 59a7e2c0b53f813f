"""Request and response bodies of the REST service (pydantic 2).

Requests refuse unknown fields, NaN and infinities; every value that reaches a job has been validated here
(bit-widths, budgets with units, layer names as strings, bounded sizes), so a bad request is a 422 and never
a job that fails later or a 5xx.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bitsearch.spec import (  # noqa: F401  (re-exported: the REST schema is made of the spec's parts)
    METRICS,
    BudgetIn,
    DataRoles,
    MethodSpec,
    RoleData,
    SearchOptions,
    SearchSpec,
    SolverSpec,
    Strict,
    bits_text,
    bounded_json,
    check_text,
)
from quant.errors import BitsearchError

T = TypeVar("T")

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
NAME = r"^[A-Za-z0-9_.:\-]{1,100}$"
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
        bounded_json(recipe, "the QAT recipe")
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


#: SearchSpec fields a REST client may not set: they name files on the server.
SERVER_ONLY = ("weights",)
#: Fields of a `SearchRequest` beside its `SearchSpec`: what the service does after the search, and a stored
#: latency table the service copies into the spec.
REST_ONLY = ("qat", "latency_table_id")


def _drop_server_only(schema: dict[str, Any]) -> None:
    for name in SERVER_ONLY:
        schema.get("properties", {}).pop(name, None)
    schema["required"] = sorted(set(schema.get("required", [])) | {"model"})


class SearchRequest(SearchSpec):
    """`POST /search`: a `SearchSpec` (the same fields and defaults as the Python API and the CLI; `model`,
    `data` and role sources name zoo entries or the tenant's uploads) plus what the service does after it."""

    model_config = ConfigDict(json_schema_extra=_drop_server_only)

    latency_table_id: str | None = Field(
        None, max_length=64,
        description="The id of a stored latency table (POST /latency-tables), instead of latency_table.",
    )

    qat: QATRecipe | None = Field(None, description="Fine-tune the recommended points with this recipe.")

    @model_validator(mode="before")
    @classmethod
    def _rest_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in SERVER_ONLY if data.get(k) is not None]
            if given:
                raise ValueError(f"{given} cannot be given through the API: upload the model (safetensors with "
                                 "its architecture, or a .pt2) and give its id as 'model'")
            if data.get("latency_table") is not None and data.get("latency_table_id") is not None:
                raise ValueError("give latency_table or latency_table_id, not both")
            if not data.get("model"):
                raise ValueError("a search needs a model: 'zoo:NAME' or the id of an uploaded model")
        return data

    def spec_part(self) -> dict[str, Any]:
        """The `SearchSpec` fields of this request (what a job stores and a worker runs)."""
        return self.model_dump(mode="json", exclude=set(REST_ONLY))


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


class TrialOut(BaseModel):
    """One trial of a measured search's Optuna study (`bayes`, `bomp-nas`). Costs are in the cost model's
    units (weight memory in bits, latency in seconds)."""

    number: int
    state: Literal["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"]
    score: float | None = Field(description="The measured score (e.g. selection top-1); None when the trial "
                                            "was not measured (over a budget, failed or unfinished)")
    cost: float | None = Field(description="The study's cost objective (`cost_metric`)")
    metrics: dict[str, float]
    measured: bool
    pareto: bool = Field(description="Not dominated in (score, cost) by another measured trial")
    bits: dict[str, str] = Field(description="Layer (or tie group) -> bit option label")
    arch: dict[str, Any] | None = Field(description="bomp-nas: the trial's architecture")
    error: str | None
    retry_of: int | None = Field(description="The trial this one re-runs (its worker was lost)")
    worker: str | None
    warm_start: bool
    seconds: float | None
    cancelled: bool = Field(False, description="Ended unfinished because its search was cancelled")


class TrialProgressOut(BaseModel):
    total: int | None
    done: int
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int
    infeasible: int = Field(description="Complete but over a budget: costed, never measured")


class TrialsOut(BaseModel):
    search_id: str
    solver: str
    status: str
    study: str
    exists: bool = Field(description="Whether the study has been created yet")
    direction: Literal["maximize", "minimize"]
    score_name: str
    cost_metric: str | None
    progress: TrialProgressOut
    trials: list[TrialOut]


class LayerBitsHistoryOut(BaseModel):
    name: str
    weight_bits: list[int | None]
    labels: list[str]


class BitsHistoryOut(BaseModel):
    """QBitOpt's per-layer bits at each re-allocation step of its quantization-aware training."""

    search_id: str
    status: str
    source: Literal["result", "running"]
    point: int | None
    steps: list[int]
    layers: list[LayerBitsHistoryOut]
    changed: list[list[str]]
    objective: list[float | None]


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


class ZooModelOut(BaseModel):
    """A built-in model (`zoo:NAME`): trained on first use from data every machine has."""

    ref: str
    input_shape: list[int]
    classes: int
    dataset: str | None
    needs_weights: bool
    description: str


class ZooDatasetOut(BaseModel):
    ref: str
    description: str


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
            bits_text(b, "bits")
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
