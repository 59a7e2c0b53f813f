"""Deployable output: a search point as ONNX (QDQ), and stored latency tables measured by `bitsearch profile`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, Field, field_validator

from db import latency as lat_repo
from db import repo
from quant.errors import BitsearchError

from .. import views
from ..deps import SF, Limit, Offset, TenantId
from bitsearch.spec import bounded_json

from ..schemas import Page

router = APIRouter(tags=["export"])
SearchId = Annotated[str, Path(max_length=64)]
MAX_TABLE_BYTES = 4 * 1024**2


class LatencyTableIn(BaseModel):
    """A latency table as `bitsearch profile --out` writes it, with how it was measured."""

    name: str = Field("", max_length=200)
    model: str | None = Field(None, max_length=300, description="The model it was measured for, e.g. zoo:digits-cnn.")
    provider: str = Field("CPUExecutionProvider", max_length=100)
    batch_size: int = Field(1, ge=1, le=1_000_000)
    table: dict[str, dict[str, float]] = Field(
        ..., description="Seconds per layer (name or shape key) and 'W/A' option, e.g. {'conv1': {'8/8': 1e-5}}."
    )
    details: dict[str, Any] | None = Field(None, description="`bitsearch profile --report` output (spread, end-to-end).")

    @field_validator("table")
    @classmethod
    def _table(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        from quant.cost import LatencyTable

        bounded_json(v, "table", MAX_TABLE_BYTES)
        try:
            LatencyTable.from_dict(v)
        except BitsearchError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("details")
    @classmethod
    def _details(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if v is None else bounded_json(v, "details", MAX_TABLE_BYTES)


class LatencyTableOut(BaseModel):
    id: str
    url: str
    name: str
    model: str | None
    provider: str
    batch_size: int
    layers: int
    created_at: datetime
    table: dict[str, dict[str, float]] | None = None
    details: dict[str, Any] | None = None


def _out(request: Request, row, full: bool) -> LatencyTableOut:
    return LatencyTableOut(
        id=row.id, url=views.url_for(request, "get_latency_table", table_id=row.id), name=row.name,
        model=row.model_ref, provider=row.provider, batch_size=row.batch_size, layers=len(row.table),
        created_at=views._aware(row.created_at), table=row.table if full else None,
        details=row.details if full else None,
    )


@router.post("/latency-tables", status_code=201, response_model=LatencyTableOut)
def create_latency_table(body: LatencyTableIn, request: Request, response: Response, tenant: TenantId, sf: SF):
    """Store a measured latency table; searches reference it by id (`latency_table_id`)."""
    row = lat_repo.create(
        sf, tenant, name=body.name, model_ref=body.model, provider=body.provider, batch_size=body.batch_size,
        table=body.table, details=body.details,
    )
    out = _out(request, row, full=False)
    response.headers["Location"] = out.url
    return out


@router.get("/latency-tables", response_model=Page[LatencyTableOut])
def list_latency_tables(request: Request, tenant: TenantId, sf: SF, limit: Limit = 50, offset: Offset = 0):
    rows, total = lat_repo.list_for(sf, tenant, limit, offset)
    return Page(items=[_out(request, r, full=False) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/latency-tables/{table_id}", response_model=LatencyTableOut, name="get_latency_table")
def get_latency_table(table_id: Annotated[str, Path(max_length=64)], request: Request, tenant: TenantId, sf: SF):
    row = lat_repo.get(sf, tenant, views.check_id(table_id, "latency table"))
    if row is None:
        raise views.not_found("latency table", table_id)
    return _out(request, row, full=True)


@router.get(
    "/searches/{search_id}/allocations/{point}/onnx",
    name="get_allocation_onnx",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "The point's model as ONNX with QuantizeLinear/DequantizeLinear (opset 17, or 21 "
                             "with int4 weights); X-Bitsearch-Containers says what each layer became."},
        404: {"description": "No such search or point"},
        422: {"description": "The model cannot be exported (the message names the layer and operator)"},
    },
)
def get_allocation_onnx(
    search_id: SearchId,
    point: Annotated[int, Path(ge=0, le=100_000)],
    tenant: TenantId,
    sf: SF,
    int4: Annotated[Literal["auto", "always", "never"], Query(description="int4 weight containers")] = "auto",
    fold_batchnorm: Annotated[bool, Query(description="Fold BatchNorm into quantized convolutions")] = False,
) -> Response:
    """Export one point of a search: the same model, calibration and quantization config the search measured."""
    from quant import Allocation
    from service.export import export_allocation

    views.check_id(search_id, "search")
    view = repo.get_search(sf, tenant, search_id)
    if view is None:
        raise views.not_found("search", search_id)
    found = repo.get_point_allocation(sf, tenant, search_id, point)
    if found is None or found[1] is None:
        raise HTTPException(404, f"search {search_id} has no point {point} with an allocation")
    allocation = Allocation.from_dict(found[1].allocation)
    exported = export_allocation(dict(view.search.spec), allocation, int4=int4, fold_batchnorm=fold_batchnorm)
    containers = ",".join(f"{l.name}={l.weight}/{l.activation}" for l in exported.result.layers)
    return Response(
        content=exported.to_bytes(),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="search-{search_id}-point-{point}.onnx"',
            "X-Bitsearch-Opset": str(exported.result.opset),
            "X-Bitsearch-Containers": containers[:4000],
        },
    )
