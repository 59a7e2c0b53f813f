"""Tables of the REST service: tenants and their API keys, uploads, searches and what a search produced.

Every user-visible row carries `tenant_id`; the repository functions in `db/repo.py` always filter on it, so
one tenant can never read or change another's rows. Files (uploads) live under
`data_dir/uploads/<tenant>/...`; `path` is stored relative to the data directory.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, new_id, utcnow


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored as the sha256 of the secret part; `prefix` finds the row without a scan."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(24), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class StoredModel(Base):
    """An uploaded model: a torch.export archive (`pt2`) or safetensors weights of a zoo architecture."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # "pt2" | "safetensors"
    architecture: Mapped[str | None] = mapped_column(String(100), nullable=True)  # zoo ref for safetensors
    filename: Mapped[str] = mapped_column(String(255))  # as uploaded
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # layers, input shape, classes...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredDataset(Base):
    """An uploaded `.npz` data set (`x`, optional `y`), validated without unpickling."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # items, shape, dtype, labels
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Search(Base):
    """One bit-width search. Its status is its job's; its results are the rows below."""

    __tablename__ = "searches"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_search_idempotency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True, index=True
    )
    schedule_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("schedules.id", ondelete="SET NULL"), nullable=True
    )
    model_ref: Mapped[str] = mapped_column(String(300), index=True)  # as the user gave it
    data_ref: Mapped[str | None] = mapped_column(String(300), nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated request body
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the job spec it became
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # recommendations, notes...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class SearchJob(Base):
    """Jobs started for a search: its own search job and any fine-tuning (QAT) jobs of its points."""

    __tablename__ = "search_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    search_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("searches.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # "search" | "qat"
    point_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SensitivityTableRow(Base):
    """The sensitivity table a search measured (a `sensitivity.table.SensitivityTable` JSON)."""

    __tablename__ = "sensitivity_tables"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    search_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("searches.id", ondelete="CASCADE"), unique=True
    )
    method: Mapped[str] = mapped_column(String(64))
    table: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AllocationRow(Base):
    """An allocation JSON (`quant.allocation` schema) of one point of a search."""

    __tablename__ = "allocations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    search_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("searches.id", ondelete="CASCADE"), index=True
    )
    allocation: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ParetoPoint(Base):
    """One point of a search's result: on the mixed-precision front, or a uniform-precision baseline."""

    __tablename__ = "pareto_points"
    __table_args__ = (UniqueConstraint("search_id", "index", name="uq_pareto_point"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    search_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("searches.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)  # position in the stored result, the `{point}` of the URLs
    kind: Mapped[str] = mapped_column(String(16))  # "mixed" | "uniform"
    label: Mapped[str] = mapped_column(String(200), default="")
    predicted: Mapped[float | None] = mapped_column(Float, nullable=True)  # predicted loss increase
    recommended: Mapped[bool] = mapped_column(Boolean, default=False)
    allocation_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("allocations.id", ondelete="SET NULL"), nullable=True
    )
    data: Mapped[dict[str, Any]] = mapped_column(JSON)  # the point as the search wrote it (minus allocation)
