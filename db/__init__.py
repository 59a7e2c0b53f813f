"""Storage: SQLAlchemy models, sessions and Alembic migrations."""

from .models import Base, Job, JobStatus, Result, Schedule, ScheduleRun
from .session import make_engine, migrate, session_factory

__all__ = ["Base", "Job", "JobStatus", "Result", "Schedule", "ScheduleRun", "make_engine", "migrate", "session_factory"]
