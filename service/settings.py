"""Settings from the environment (`BITSEARCH_*`), through pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BITSEARCH_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".bitsearch")
    database_url: str | None = None  # default: SQLite under data_dir
    broker_url: str | None = None  # set: jobs go to Celery; unset: the in-process/local executor
    heartbeat_interval: float = 2.0  # seconds between a running job's heartbeats
    stale_after: float = 20.0  # a running job without a heartbeat for this long is taken as lost
    max_attempts: int = 3
    qat_queue: str = "cpu"  # "gpu" sends fine-tuning to GPU workers
    poll_interval: float = 0.5  # how often an idle local worker looks for work
    worker_nice: int = Field(10, ge=0, le=19)  # local and Celery workers run this much nicer than the API
    # REST service (`bitsearch serve`)
    max_model_bytes: int = 512 * 1024**2  # largest model upload (.pt2 / safetensors)
    max_dataset_bytes: int = 2 * 1024**3  # largest .npz upload
    # an .npz is checked from its NPY headers before any array is read: elements and decompressed bytes over
    # all its arrays (a small deflated file can claim terabytes); arrays are then read this many bytes at a time
    max_dataset_elements: int = Field(1 << 30, ge=1)
    max_dataset_array_bytes: int = Field(4 << 30, ge=1)
    dataset_read_chunk_bytes: int = Field(8 << 20, ge=4096)
    max_json_bytes: int = Field(8 * 1024**2, ge=1024)  # largest JSON body, counted as it arrives (chunked too)
    # Per-tenant quotas, answered 429 (jobs) or 413 (bytes) with a reason; 0 turns one off
    max_qat_steps: int = Field(100_000, ge=1)  # most optimizer steps one fine-tuning job may ask for
    tenant_max_queued_jobs: int = Field(20, ge=0)  # queued (not yet running) jobs of one tenant
    tenant_max_qat_steps: int = Field(400_000, ge=0)  # QAT steps over one tenant's queued and running jobs
    tenant_max_upload_bytes: int = Field(8 * 1024**3, ge=0)  # stored model and dataset bytes of one tenant
    # Supervision of local workers
    db_retry_max: float = Field(30.0, gt=0)  # longest back-off between tries to reach a lost database (s)
    db_wait_at_start: float = Field(120.0, ge=0)  # how long `serve`/a worker waits for the database at start (s)
    serve_local_workers: int = 0  # set by `serve`: its local workers, which `/readyz` then requires
    scheduler_interval: float = 15.0  # how often the in-process scheduler checks cron schedules
    api_threads: int = Field(8, ge=1, le=256)  # threads that run the API's blocking work (database, files)
    api_torch_threads: int = 1  # torch threads in the API process (upload validation); jobs run in workers
    api_key_cache_seconds: float = 10.0  # a verified API key is trusted this long without a lookup (0: never)

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir.expanduser() / 'bitsearch.db'}"

    def npz_limits(self):
        """The limits an uploaded .npz is checked against (`zoo.uploads.NpzLimits`)."""
        from zoo.uploads.npz import NpzLimits

        return NpzLimits(self.max_dataset_elements, self.max_dataset_array_bytes, self.dataset_read_chunk_bytes)

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir.expanduser() / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir.expanduser() / "uploads"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
