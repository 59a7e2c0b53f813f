"""What the zoo offers without uploads: built-in models and data sets (`zoo:NAME` references)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import TenantId

router = APIRouter(tags=["zoo"])


@router.get("/zoo/models")
def zoo_models(tenant: TenantId) -> list[dict]:
    from zoo import list_models

    return [
        {
            "ref": s.ref,
            "input_shape": list(s.input_shape),
            "classes": s.num_classes,
            "dataset": s.dataset,
            "needs_weights": s.needs_weights,
            "description": s.description,
        }
        for s in list_models()
    ]


@router.get("/zoo/datasets")
def zoo_datasets(tenant: TenantId) -> list[dict]:
    from zoo import list_datasets

    return [{"ref": f"zoo:{d.name}", "description": d.description} for d in list_datasets()]
