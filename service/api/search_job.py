"""The "search" job kind: runs `service.pipeline.run_search` and stores its outcome in the service's tables.

Kept free of FastAPI imports: workers import this module (through `service.cli`) only to register the kind.

The job spec is a `bitsearch.SearchSpec` as JSON (what `run_search(spec, progress)` receives) plus private keys
starting with "_" that only this module reads (`_search_id`, `_tenant_id`, `_request`, `_model_ref`,
`_data_ref`, `_qat`). For uploads, `model` is the absolute path of the stored .pt2
(`zoo.uploads.load_any_model` loads it) or, for safetensors, the zoo architecture with `weights` the stored
file; `data` (and each data role's source) is "zoo:NAME", a stored .npz's path, "none" (data-free) or null
(the model's own zoo data set). The outcome is a typed `bitsearch.SearchResult`. With `_qat` (a recipe), the
recommended points are queued for fine-tuning ("qat" jobs) once the search is stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from bitsearch.spec import SearchSpec
from db import repo
from db.models import new_id
from quant.errors import BitsearchError
from service.jobs.kinds import JobCancelled, JobContext, JobOutput

from .schemas import SearchRequest

if TYPE_CHECKING:
    from bitsearch.result import SearchResult

ProgressFn = Callable[[float, str], None]


def outcome_rows(result: SearchResult) -> tuple[dict[str, Any], list[repo.PointRow], dict[str, Any]]:
    """A `SearchResult` as the rows the service stores: the sensitivity table, one row per point (index =
    position in `result.points`: mixed first, then uniform) and the search's summary."""
    from bitsearch.result import SearchResult

    if not isinstance(result, SearchResult):
        raise BitsearchError(f"a search must return a SearchResult, not {type(result).__name__}")
    d = result.to_dict()  # JSON-safe (no NaN): PostgreSQL's JSON refuses it
    recommended = result.recommended_indices()
    points = d["front"]["points"] + d["front"]["uniform"]
    rows = []
    for i, (p, pd) in enumerate(zip(result.points, points)):
        rows.append(
            repo.PointRow(
                kind=p.kind,
                label=p.label or f"{p.kind} {i}",
                predicted=pd["predicted"],
                recommended=i in recommended,
                data={k: v for k, v in pd.items() if k != "allocation"},
                allocation=pd["allocation"],
            )
        )
    recs = []
    for r, rd in zip(result.recommendations, d["recommendations"]):
        pd = points[r.index]
        recs.append({**rd, "point": {k: pd[k] for k in ("kind", "label", "metrics", "measured")}})
    summary = {
        "schema": d["schema"],
        "version": d["version"],
        "recommendations": recs,
        "front": {k: v for k, v in d["front"].items() if k not in ("points", "uniform")},
        "counts": {
            "mixed": len(result.front.points),
            "uniform": len(result.front.uniform),
            "recommended": len(recommended),
        },
        "timings": d["timings"],
        "notes": d["notes"],
        "data": d["data"],
        "reference_report": d["reference_report"],
    }
    return d["table"], rows, summary


def persist_outcome(sf, search_id: str, result: SearchResult) -> dict[str, int] | None:
    """Store a search's result (replacing an earlier attempt's); returns counts, or None when the search
    is gone."""
    sensitivity, rows, summary = outcome_rows(result)
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


def search_kind(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    from db.session import session_factory
    from service.settings import get_settings

    sf = session_factory(get_settings().db_url)
    search_id = _search_for(sf, spec, ctx.job_id)
    if search_id is not None and not repo.search_exists(sf, search_id):
        raise JobCancelled(ctx.job_id)  # deleted before it ran
    from service import pipeline

    ctx.progress(0.0, "starting")

    def progress(fraction: float, message: str = "") -> None:
        f = float(fraction) if isinstance(fraction, (int, float)) and fraction == fraction else 0.0
        ctx.progress(0.95 * min(1.0, max(0.0, f)), str(message)[:500])

    outcome = pipeline.run_search(SearchSpec.parse(pipeline_spec(spec)), progress)
    ctx.progress(0.96, "storing results")
    if search_id is None:
        return JobOutput(outcome.to_dict())
    counts = persist_outcome(sf, search_id, outcome)
    if counts is None:
        raise JobCancelled(ctx.job_id)  # the search was deleted while it ran
    result: dict[str, Any] = {"search_id": search_id, **counts}
    if spec.get("_qat") and spec.get("_tenant_id"):
        from service.searches import queue_jobs

        tenant = spec["_tenant_id"]
        specs = finetune_specs(sf, spec, search_id, tenant, None, spec["_qat"])
        ids = queue_jobs(sf, get_settings(), tenant, search_id, [("qat", p, s) for p, s in specs])
        result["qat_jobs"] = [{"point": p, "job_id": j} for (p, _), j in zip(specs, ids)]
    return JobOutput(result)


def finetune_specs(
    sf,
    spec: Mapping[str, Any],
    search_id: str,
    tenant_id: str,
    points: list[int] | None,
    recipe: dict[str, Any],
) -> list[tuple[int, dict[str, Any]]]:
    """The "qat" job spec of each point (default: the recommended ones) of a finished search, as
    [(point, spec)]. Raises BitsearchError naming points that do not exist."""
    stored = repo.get_points(sf, tenant_id, search_id)
    chosen = points if points is not None else [p.index for p in stored if p.recommended]
    by_index = {p.index: p for p in stored}
    missing = [i for i in chosen if i not in by_index or by_index[i].allocation_id is None]
    if missing:
        raise BitsearchError(
            f"no point(s) {missing} with an allocation in search {search_id} (it has {len(stored)} points)"
        )
    roles = {r: (spec.get("roles") or {}).get(r) or {} for r in ("train", "calibration", "report")}
    sources = {r: v["source"] for r, v in roles.items() if v.get("source")}
    out = []
    for i in dict.fromkeys(chosen):
        _, alloc = repo.get_point_allocation(sf, tenant_id, search_id, i)
        job_spec = {
            "model": spec["model"],
            "weights": spec.get("weights"),
            "data": None if spec.get("data") == "none" else spec.get("data"),
            "allocation": alloc.allocation,
            "recipe": dict(recipe),
        }
        if sources:  # the search named its own training (or other) data: fine-tuning uses it
            job_spec["roles"] = sources
        out.append((i, job_spec))
    return out


def build_spec(
    request: SearchRequest,
    model: dict[str, Any],
    data: str | None,
    role_sources: Mapping[str, str | None] | None = None,
    *,
    search_id: str | None,
    tenant_id: str,
) -> dict[str, Any]:
    """The job spec of a validated `SearchRequest`: its `SearchSpec` part with the model, data and role
    sources resolved (`model`: `{"model", "weights"}`; `data` and `role_sources`: zoo references or stored
    paths, see `service.api.deps`), and the job's own keys (starting with "_") beside it."""
    spec = SearchSpec.parse(request.spec_part()).model_dump(mode="json")
    spec["model"], spec["weights"], spec["data"] = model["model"], model.get("weights"), data
    for role, source in (role_sources or {}).items():
        spec["roles"][role]["source"] = source
    spec.update({
        "_qat": request.qat.model_dump(mode="json") if request.qat is not None else None,
        "_tenant_id": tenant_id,
        "_model_ref": request.model,
        "_data_ref": request.data,
    })
    if search_id is not None:
        spec["_search_id"] = search_id
    else:  # a schedule's template: each run creates its search from these
        spec["_request"] = request.model_dump(mode="json")
    return spec


def check_spec(spec: dict[str, Any]) -> SearchSpec:
    """Refuse now (a 422) what the worker would refuse later: the spec itself, and plug-ins that need what
    a search cannot give them."""
    from bitsearch.registry import check_runnable

    s = SearchSpec.parse(pipeline_spec(spec))
    check_runnable(s)
    check_against_model(s)
    return s


def _model_for_checks(s: SearchSpec):
    """(module, example input) of the spec's model, cheaply: a zoo architecture is built, not trained."""
    import torch

    from zoo.models import get_model_spec

    if s.model.startswith("zoo:") or s.weights is not None:
        ms = get_model_spec(s.model)
        return ms.builder().eval(), torch.zeros(2, *ms.input_shape)
    from zoo.uploads import load_any_model

    loaded = load_any_model(s.model, s.weights)
    return loaded.model, loaded.example_input


def check_against_model(s: SearchSpec) -> None:
    """Pins and ties must name the model's layers, and data-free calibration needs BatchNorm statistics."""
    o = s.options
    named = set(o.pins) | {n for g in o.ties or [] for n in g}
    if not named and not s.data_free:
        return
    from bitsearch.pipeline import check_layer_names
    from quant.layers import discover_layers
    from sensitivity.datafree import batchnorm_layers

    module, example = _model_for_checks(s)
    if named:
        check_layer_names(o.constraints(), [l.name for l in discover_layers(module, example)])
    if s.data_free and not batchnorm_layers(module):
        raise BitsearchError(
            "data-free calibration ('data': 'none') distils inputs from BatchNorm statistics, and this model "
            "has no BatchNorm layer: give a data set"
        )
