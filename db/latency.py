"""Stored latency tables: per-layer seconds measured by `bitsearch profile`, owned by a tenant.

A search references one by id (`latency_table_id`) instead of carrying the table in its request; the table
is copied into the search's spec when the search is submitted, so a later deletion cannot change a search.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, func, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from .models import Base, new_id, utcnow


class LatencyTableRow(Base):
    """A latency table (`quant.cost.LatencyTable` JSON) and how it was measured."""

    __tablename__ = "latency_tables"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    model_ref: Mapped[str | None] = mapped_column(String(300), nullable=True)
    provider: Mapped[str] = mapped_column(String(100), default="CPUExecutionProvider")
    batch_size: Mapped[int] = mapped_column(Integer, default=1)
    table: Mapped[dict[str, Any]] = mapped_column(JSON)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # spread, end-to-end, machine
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def create(sf: sessionmaker, tenant_id: str, **fields: Any) -> LatencyTableRow:
    row = LatencyTableRow(tenant_id=tenant_id, **fields)
    with sf.begin() as s:
        s.add(row)
    return row


def get(sf: sessionmaker, tenant_id: str, table_id: str) -> LatencyTableRow | None:
    with sf() as s:
        return s.execute(
            select(LatencyTableRow).where(LatencyTableRow.id == table_id, LatencyTableRow.tenant_id == tenant_id)
        ).scalar_one_or_none()


def list_for(sf: sessionmaker, tenant_id: str, limit: int, offset: int) -> tuple[list[LatencyTableRow], int]:
    with sf() as s:
        where = LatencyTableRow.tenant_id == tenant_id
        total = s.execute(select(func.count()).select_from(LatencyTableRow).where(where)).scalar_one()
        rows = s.execute(
            select(LatencyTableRow).where(where).order_by(LatencyTableRow.created_at.desc(), LatencyTableRow.id)
            .limit(limit).offset(offset)
        ).scalars().all()
    return list(rows), int(total)
