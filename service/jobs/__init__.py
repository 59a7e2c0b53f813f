"""Job dispatch and workers: one runner for every job kind, a local executor and a Celery executor."""

from .dispatch import submit_job
from .kinds import KINDS, JobCancelled, JobContext, JobOutput, register_kind

__all__ = ["KINDS", "JobCancelled", "JobContext", "JobOutput", "register_kind", "submit_job"]
