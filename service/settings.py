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

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir.expanduser() / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir.expanduser() / "uploads"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
