"""Per-job bounds and per-tenant quotas on queued work, checked before anything is queued.

* one fine-tuning job may ask for at most `max_qat_steps` optimizer steps (422 when it asks for more; a
  recipe in epochs is checked when the job knows its training set, and counts as `max_qat_steps` below);
* one tenant may have at most `tenant_max_queued_jobs` jobs waiting (429), and at most
  `tenant_max_qat_steps` QAT steps over its queued and running jobs (429);
* one tenant may store at most `tenant_max_upload_bytes` of uploads (413, see `check_upload_quota`).

A limit of 0 turns that quota off. Refusals carry a reason and the stable code `quota_exceeded`.
"""

from __future__ import annotations

from typing import Any, Mapping

from sqlalchemy.orm import Session, sessionmaker

from quant.errors import BitsearchError

from ..settings import Settings, get_settings


class QuotaExceeded(BitsearchError):
    """A per-tenant quota is used up: try again once earlier work has finished."""

    http_status = 429
    code = "quota_exceeded"


class StorageQuotaExceeded(BitsearchError):
    http_status = 413
    code = "quota_exceeded"


class LimitExceeded(BitsearchError):
    """One job asks for more than any job may."""

    code = "limit_exceeded"


def recipe_steps(recipe: Mapping[str, Any] | None, settings: Settings) -> int:
    """The steps a QAT recipe asks for: `steps` (default 1000), or `max_qat_steps` for one in epochs."""
    if not recipe:
        return 0
    if recipe.get("epochs") is not None:
        return settings.max_qat_steps
    steps = recipe.get("steps", 1000)
    try:
        return int(steps) if steps is not None else settings.max_qat_steps
    except (TypeError, ValueError):
        return settings.max_qat_steps


def job_qat_steps(kind: str, spec: Mapping[str, Any], settings: Settings) -> int:
    """QAT steps a queued or running job stands for: a "qat" job's recipe, a search's follow-up recipe."""
    if kind == "qat":
        return recipe_steps(spec.get("recipe") or {}, settings)
    if kind == "search":
        return recipe_steps(spec.get("_qat"), settings)
    return 0


def check_qat_total(total_steps: int, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    if total_steps > settings.max_qat_steps:
        raise LimitExceeded(
            f"the fine-tuning recipe asks for {total_steps} steps; at most {settings.max_qat_steps} are "
            "allowed (BITSEARCH_MAX_QAT_STEPS)"
        )


def check_job_quota(sf: sessionmaker[Session], tenant_id: str | None, kind: str, spec: Mapping[str, Any],
                    settings: Settings | None = None, jobs: int = 1) -> None:
    """Refuse `jobs` new jobs of `kind`/`spec` for `tenant_id` when a bound or a quota says no."""
    settings = settings or get_settings()
    steps = job_qat_steps(kind, spec, settings)
    if steps:
        check_qat_total(steps, settings)
    if tenant_id is None:
        return
    from db import jobs as repo

    queued, active = repo.tenant_load(sf, tenant_id)
    cap = settings.tenant_max_queued_jobs
    if cap and queued + jobs > cap:
        raise QuotaExceeded(
            f"this tenant has {queued} job(s) waiting; at most {cap} may wait at once "
            "(try again once some have started)"
        )
    cap = settings.tenant_max_qat_steps
    if cap and steps:
        in_flight = sum(job_qat_steps(k, sp or {}, settings) for k, sp in active)
        if in_flight + steps * jobs > cap:
            raise QuotaExceeded(
                f"this tenant's queued and running fine-tuning adds up to {in_flight} steps; {steps * jobs} more "
                f"would pass its quota of {cap} (try again once some have finished)"
            )


def check_upload_quota(stored_bytes: int, incoming_bytes: int, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    cap = settings.tenant_max_upload_bytes
    if cap and stored_bytes + incoming_bytes > cap:
        raise StorageQuotaExceeded(
            f"this tenant stores {stored_bytes} bytes of uploads; {incoming_bytes} more would pass its quota "
            f"of {cap} bytes (delete uploads it no longer needs)"
        )


def tenant_upload_bytes(sf: sessionmaker[Session], tenant_id: str) -> int:
    """Bytes of the models and data sets `tenant_id` stores."""
    from sqlalchemy import func, select

    from db.tables import StoredDataset, StoredModel

    with sf() as s:
        return int(sum(
            s.scalar(select(func.coalesce(func.sum(t.size_bytes), 0)).where(t.tenant_id == tenant_id)) or 0
            for t in (StoredModel, StoredDataset)
        ))
