"""What the zoo offers without uploads: built-in models and data sets (`zoo:NAME` references)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import TenantId
from ..schemas import ZooDatasetOut, ZooModelOut

router = APIRouter(tags=["zoo"])


@router.get("/zoo/models", response_model=list[ZooModelOut])
def zoo_models(tenant: TenantId) -> list[ZooModelOut]:
    from zoo import list_models

    return [
        ZooModelOut(ref=s.ref, input_shape=list(s.input_shape), classes=s.num_classes, dataset=s.dataset,
                    needs_weights=s.needs_weights, description=s.description)
        for s in list_models()
    ]


@router.get("/zoo/datasets", response_model=list[ZooDatasetOut])
def zoo_datasets(tenant: TenantId) -> list[ZooDatasetOut]:
    from zoo import list_datasets

    return [ZooDatasetOut(ref=f"zoo:{d.name}", description=d.description) for d in list_datasets()]
