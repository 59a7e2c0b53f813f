"""The "search" job kind: runs `service.pipeline.run_search` and stores its outcome in the service's tables.

Kept free of FastAPI imports: workers import this module (through `service.cli`) only to register the kind.

The job spec is a `service.pipeline.SearchSpec` (what `run_search(spec, progress)` receives) plus private keys
starting with "_" that only this module reads (`_search_id`, `_tenant_id`, `_request`, `_model_ref`,
`_data_ref`, `_qat`). For uploads, `model` is the absolute path of the stored .pt2
(`zoo.uploads.load_any_model` loads it) or, for safetensors, the zoo architecture with `weights` the stored
file; `data` is "zoo:NAME", the stored .npz's path, or "none" (data-free). With `_qat` (a recipe), the
recommended points are queued for fine-tuning ("qat" jobs) once the search is stored.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from db import repo
from db.models import new_id
from quant.errors import BitsearchError
from service.jobs.kinds import JobCancelled, JobContext, JobOutput, register_kind

ProgressFn = Callable[[float, str], None]


def jsonable(obj: Any, depth: int = 0) -> Any:
    """Plain JSON: numpy scalars and arrays become numbers and lists, non-finite floats None, objects with
    `to_dict` their dict (PostgreSQL's JSON refuses NaN, so none may reach the database)."""
    if depth > 100:
        raise BitsearchError("the search outcome is nested too deeply to store")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v, depth + 1) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict(), depth + 1)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist(), depth + 1)
    if hasattr(obj, "item"):
        return jsonable(obj.item(), depth + 1)
    return str(obj)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _predicted(point: Mapping[str, Any]) -> float | None:
    p = point.get("predicted")
    if _number(p) is not None:
        return _number(p)
    if isinstance(p, Mapping):
        for key in ("loss_increase", "objective", "value", "sensitivity", "delta_loss"):
            if _number(p.get(key)) is not None:
                return _number(p.get(key))
    return _number(point.get("objective"))


def _rec_indices(recs: list[Any], points: list[dict[str, Any]]) -> set[int]:
    """Which stored points the recommendations name: by index, by a dict's index/point, or by allocation."""
    out: set[int] = set()
    for r in recs:
        if isinstance(r, int) and not isinstance(r, bool):
            if 0 <= r < len(points):
                out.add(r)
            continue
        if not isinstance(r, Mapping):
            continue
        for key in ("index", "point", "point_index"):
            v = r.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(points):
                out.add(v)
                break
        else:
            alloc = r.get("allocation")
            if isinstance(r.get("point"), Mapping):
                alloc = r["point"].get("allocation", alloc)
            if alloc is not None:
                for i, p in enumerate(points):
                    if p.get("allocation") == alloc:
                        out.add(i)
    return out


def outcome_rows(
    outcome: Mapping[str, Any],
) -> tuple[dict[str, Any] | None, list[repo.PointRow], dict[str, Any]]:
    """Split a `run_search` outcome into the sensitivity table, the points to store and the search summary.

    Points come from `front["points"]` (each with a `kind`, "mixed" or "uniform") and, when the front keeps
    the uniform baselines apart, from `front["uniform"]` / `front["baselines"]`. Mixed points come first;
    a point's index is its position in that order and names it in the URLs.
    """
    if not isinstance(outcome, Mapping):
        raise BitsearchError(f"run_search returned {type(outcome).__name__}, not a dict")
    outcome = jsonable(outcome)
    sensitivity = outcome.get("sensitivity")
    if sensitivity is not None and not isinstance(sensitivity, dict):
        raise BitsearchError("the outcome's 'sensitivity' must be a SensitivityTable JSON object")
    front = outcome.get("front") or {}
    if isinstance(front, list):
        front = {"points": front}
    if not isinstance(front, dict):
        raise BitsearchError("the outcome's 'front' must be a ParetoFront JSON object")
    raw: list[tuple[str, dict[str, Any]]] = []
    for p in front.get("points") or []:
        if isinstance(p, dict):
            raw.append((str(p.get("kind") or "mixed"), p))
    for key in ("uniform", "baselines"):
        for p in front.get(key) or []:
            if isinstance(p, dict):
                raw.append((str(p.get("kind") or "uniform"), p))
    raw.sort(key=lambda kp: kp[0] != "mixed")  # stable: mixed first, each group in its given order
    plain = [p for _, p in raw]
    recs = outcome.get("recommendations") or []
    if not isinstance(recs, list):
        recs = [recs]
    recommended = _rec_indices(recs, plain)
    rows = []
    for i, (kind, p) in enumerate(raw):
        alloc = p.get("allocation")
        alloc = alloc if isinstance(alloc, dict) else None
        meta = (alloc or {}).get("metadata") or {}
        label = p.get("label") or (meta.get("uniform") if isinstance(meta, dict) else None) or f"{kind} {i}"
        data = {k: v for k, v in p.items() if k != "allocation"}
        rows.append(
            repo.PointRow(
                kind=kind,
                label=str(label),
                predicted=_predicted(p),
                recommended=i in recommended or bool(p.get("recommended")),
                data=data,
                allocation=alloc,
            )
        )
    summary = {
        "recommendations": recs,
        "front": {k: v for k, v in front.items() if k not in ("points", "uniform", "baselines")},
        "counts": {
            "mixed": sum(1 for r in rows if r.kind == "mixed"),
            "uniform": sum(1 for r in rows if r.kind != "mixed"),
            "recommended": len(recommended),
        },
    }
    for key, value in outcome.items():  # timings, notes...; not the spec (server paths) nor the layers
        if key not in ("sensitivity", "front", "recommendations", "spec", "layers"):
            summary.setdefault(key, value)
    return sensitivity, rows, summary


def persist_outcome(sf, search_id: str, outcome: Mapping[str, Any]) -> dict[str, int] | None:
    """Store a search's outcome (replacing an earlier attempt's); returns counts, or None when the search
    is gone."""
    sensitivity, rows, summary = outcome_rows(outcome)
    if not repo.save_search_outcome(sf, search_id, sensitivity, rows, summary):
        return None
    return dict(summary["counts"])


def pipeline_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def _search_for(sf, spec: Mapping[str, Any], job_id: str) -> str | None:
    """The search this job works for. A scheduled job has none yet: it gets one, made once per job."""
    if spec.get("_search_id"):
        return str(spec["_search_id"])
    existing = repo.search_for_job(sf, job_id)
    if existing is not None:
        return existing.id
    tenant = spec.get("_tenant_id")
    if not tenant:
        return None  # a search job from outside the service (CLI): nothing to store it in
    from db import jobs as job_repo

    job = job_repo.get(sf, job_id)
    search, _ = repo.create_search(
        sf,
        search_id=new_id(),
        tenant_id=tenant,
        model_ref=str(spec.get("_model_ref") or spec.get("model"))[:300],
        data_ref=spec.get("_data_ref"),
        request=spec.get("_request") or {},
        spec=dict(spec),
        job_id=job_id,
        schedule_id=job.schedule_id if job is not None else None,
    )
    repo.link_job(sf, search.id, job_id, tenant, "search")
    return search.id


@register_kind("search")
def search_kind(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    from db.session import session_factory
    from service.settings import get_settings

    sf = session_factory(get_settings().db_url)
    search_id = _search_for(sf, spec, ctx.job_id)
    if search_id is not None and not repo.search_exists(sf, search_id):
        raise JobCancelled(ctx.job_id)  # deleted before it ran
    try:
        from service import pipeline
    except ImportError as exc:
        raise BitsearchError(f"the search pipeline cannot be imported: {exc}") from exc
    run_search = getattr(pipeline, "run_search", None)
    if run_search is None:
        raise BitsearchError("this bitsearch has no search pipeline yet (service.pipeline.run_search)")
    ctx.progress(0.0, "starting")

    def progress(fraction: float, message: str = "") -> None:
        f = _number(fraction)
        ctx.progress(0.95 * min(1.0, max(0.0, f if f is not None else 0.0)), str(message)[:500])

    outcome = run_search(pipeline_spec(spec), progress)
    ctx.progress(0.96, "storing results")
    if search_id is None:
        return JobOutput(jsonable(outcome))
    counts = persist_outcome(sf, search_id, outcome)
    if counts is None:
        raise JobCancelled(ctx.job_id)  # the search was deleted while it ran
    result: dict[str, Any] = {"search_id": search_id, **counts}
    if spec.get("_qat") and spec.get("_tenant_id"):
        result["qat_jobs"] = submit_finetunes(sf, spec, search_id, spec["_tenant_id"], None, spec["_qat"])
    return JobOutput(result)


def submit_finetunes(
    sf,
    spec: Mapping[str, Any],
    search_id: str,
    tenant_id: str,
    points: list[int] | None,
    recipe: dict[str, Any],
    settings=None,
    quota: bool = False,
) -> list[dict[str, Any]]:
    """Queue one "qat" job per point (default: the recommended ones) of a finished search; returns
    [{"point", "job_id"}]. Raises BitsearchError naming points that do not exist."""
    from service.jobs.dispatch import submit_job

    stored = repo.get_points(sf, tenant_id, search_id)
    chosen = points if points is not None else [p.index for p in stored if p.recommended]
    by_index = {p.index: p for p in stored}
    missing = [i for i in chosen if i not in by_index or by_index[i].allocation_id is None]
    if missing:
        raise BitsearchError(
            f"no point(s) {missing} with an allocation in search {search_id} (it has {len(stored)} points)"
        )
    if quota:  # a user's request (not a search's own follow-up): bounds and the tenant's quotas first
        from service.jobs.quotas import check_job_quota

        check_job_quota(sf, tenant_id, "qat", {"recipe": recipe}, settings, jobs=len(dict.fromkeys(chosen)))
    jobs = []
    for i in dict.fromkeys(chosen):
        _, alloc = repo.get_point_allocation(sf, tenant_id, search_id, i)
        job_spec = {
            "model": spec["model"],
            "weights": spec.get("weights"),
            "data": None if spec.get("data") == "none" else spec.get("data"),
            "allocation": alloc.allocation,
            "recipe": dict(recipe),
        }
        job = submit_job(sf, "qat", job_spec, settings=settings, tenant_id=tenant_id)
        repo.link_job(sf, search_id, job.id, tenant_id, "qat", i)
        jobs.append({"point": i, "job_id": job.id})
    return jobs


def build_spec(
    request: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    *,
    search_id: str | None,
    tenant_id: str,
) -> dict[str, Any]:
    """The job spec of a validated `SearchRequest` (as a dict), with model and data already resolved to
    `{"model", "weights"}` and `{"data"}` (see `service.api.deps.resolve_model` / `resolve_data`). The public
    keys are `service.pipeline.SearchSpec` fields."""
    from .schemas import BudgetIn

    opts = request.get("options") or {}
    sens = request.get("sensitivity") or {}
    solver = request.get("solver") or {}
    spec: dict[str, Any] = {
        "model": model["model"],
        "weights": model.get("weights"),
        "data": data.get("data") or "none",  # the user's null: data-free
        "calib_size": request.get("calib_size", 256),
        "eval_limit": request.get("eval_limit"),
        "seed": request.get("seed", 0),
        "budgets": [
            {"metric": b["metric"], "limit": BudgetIn(**b).limit()} for b in request.get("budgets") or []
        ],
        "latency_table": request.get("latency_table"),
        "weight_bits": list(opts.get("weight_bits") or []),
        "activation_bits": list(opts.get("activation_bits") or []),
        "constraints": {
            "pinned": dict(opts.get("pins") or {}),
            "ties": [list(g) for g in opts.get("ties") or []],
            "pin_first": opts.get("pin_first"),
            "pin_last": opts.get("pin_last"),
        },
        "method": sens.get("method", "fisher"),
        "method_params": dict(sens.get("settings") or {}),
        "solver": solver.get("name", "ilp"),
        "solver_params": dict(solver.get("settings") or {}),
        "pareto": request.get("pareto_points", 8),
        "quant": dict(request.get("quant") or {}),
        "_qat": request.get("qat"),
        "_tenant_id": tenant_id,
        "_model_ref": request.get("model"),
        "_data_ref": request.get("data"),
    }
    if search_id is not None:
        spec["_search_id"] = search_id
    else:  # a schedule's template: each run creates its search from these
        spec["_request"] = request
    return spec


def check_spec(spec: dict[str, Any]) -> None:
    """Let the pipeline refuse a spec now (a 422) rather than in the job, when it can say."""
    try:
        from service.pipeline import SearchSpec
    except ImportError:
        return
    SearchSpec.from_dict(pipeline_spec(spec))
