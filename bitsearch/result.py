"""`SearchResult`: what a search returns, what the CLI prints, a worker stores and the API serves.

Typed all the way: the sensitivity table, the Pareto front (mixed points first, then the uniform baselines;
a point's index is its position in `SearchResult.points`), recommendations that name points by that index,
timings, notes and the data each role used. `to_dict`/`from_dict` (and `to_json`/`from_json`) round-trip it
exactly, with the same mechanism as every other bitsearch file format (tables, fronts, allocations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from quant.allocation import Allocation
from quant.errors import BitsearchError
from quant.jsonfile import JsonFile
from search.pareto import ParetoFront, ParetoPoint
from search.budgets import Budget
from sensitivity.table import SensitivityTable

from .spec import SearchSpec

RESULT_SCHEMA = "bitsearch.search"
RESULT_VERSION = 1


def finite(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (PostgreSQL's JSON refuses NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


@dataclass
class Recommendation:
    """The point chosen for `budgets`: `index` into `SearchResult.points`.

    `requested`: chosen at the budgets the user asked for (else at one budget of the sweep). `report`: its
    metrics on the report data (held out from the choice), when there was any.
    """

    index: int
    budgets: list[Budget]
    requested: bool
    point: ParetoPoint = field(repr=False)
    report: dict[str, Any] | None = None

    @property
    def allocation(self) -> Allocation:
        return self.point.allocation

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "budgets": [b.to_dict() for b in self.budgets],
            "requested": self.requested,
            "report": self.report,
        }


@dataclass
class SearchResult(JsonFile):
    """Everything one search found; see the module docstring."""

    json_what = "search result"

    spec: SearchSpec
    model: str  # the model's reference ("zoo:NAME", a path) or, from Python, "module:ClassName"
    table: SensitivityTable
    front: ParetoFront
    recommendations: list[Recommendation] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # per role: source, split, size, seed
    reference_report: dict[str, Any] | None = None  # the FP32 model on the report data
    schema_version: int = RESULT_VERSION

    @property
    def points(self) -> list[ParetoPoint]:
        """Every point, mixed first then uniform; recommendations index this list."""
        return list(self.front.points) + list(self.front.uniform)

    @property
    def recommendation(self) -> Recommendation | None:
        """The recommendation at the requested budgets, else the last one of the sweep (None: unmeasured)."""
        for r in self.recommendations:
            if r.requested:
                return r
        return self.recommendations[-1] if self.recommendations else None

    def recommended_indices(self) -> set[int]:
        return {r.index for r in self.recommendations}

    # --- files ---
    def to_dict(self) -> dict[str, Any]:
        return finite({
            "schema": RESULT_SCHEMA,
            "version": self.schema_version,
            "spec": self.spec.model_dump(mode="json"),
            "model": self.model,
            "table": self.table.to_dict(),
            "front": self.front.to_dict(),
            "recommendations": [r.to_dict() for r in self.recommendations],
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "data": self.data,
            "reference_report": self.reference_report,
        })

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchResult":
        cls.check_header(d, RESULT_SCHEMA, RESULT_VERSION)
        try:
            front = ParetoFront.from_dict(d["front"])
            points = list(front.points) + list(front.uniform)
            recs = []
            for r in d.get("recommendations") or []:
                i = r["index"]
                if type(i) is not int or not 0 <= i < len(points):
                    raise BitsearchError(f"a recommendation names point {i!r}; the front has {len(points)}")
                recs.append(Recommendation(i, [Budget.from_dict(b) for b in r.get("budgets") or []],
                                           bool(r.get("requested")), points[i], r.get("report")))
            return cls(
                spec=SearchSpec.parse(d["spec"]),
                model=str(d["model"]),
                table=SensitivityTable.from_dict(d["table"]),
                front=front,
                recommendations=recs,
                timings={str(k): float(v) for k, v in (d.get("timings") or {}).items()},
                notes=[str(n) for n in d.get("notes") or []],
                data=dict(d.get("data") or {}),
                reference_report=d.get("reference_report"),
                schema_version=int(d["version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BitsearchError(f"malformed search result: {type(exc).__name__}: {exc}") from None
