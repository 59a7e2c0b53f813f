"""Engines and sessions. SQLite (WAL) under the data directory by default, PostgreSQL when configured."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def default_url() -> str:
    url = os.environ.get("BITSEARCH_DATABASE_URL")
    if url:
        return url
    data = Path(os.environ.get("BITSEARCH_DATA_DIR", Path.home() / ".bitsearch")).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data / 'bitsearch.db'}"


def normalise_url(url: str) -> str:
    # Plain postgresql:// URLs would pick psycopg2; we ship psycopg 3.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str | None = None) -> Engine:
    url = normalise_url(url or default_url())
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL lets readers run while a worker writes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; one fsync per checkpoint, not per commit
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration step is noise in a CLI
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@lru_cache(maxsize=8)
def _factory(url: str) -> sessionmaker[Session]:
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """A migrated database's session factory, one per URL per process."""
    return _factory(normalise_url(url or default_url()))


@contextmanager
def transaction(db: "sessionmaker[Session] | Session", write: bool = False) -> Iterator[Session]:
    """A session to work in. Given a `Session` (the caller's unit of work, e.g. one per request), it is used
    as is and the caller commits or rolls back; given a session factory, a session of its own that commits
    at the end (`write`) or only reads."""
    if isinstance(db, Session):
        yield db
        return
    if write:
        with db.begin() as s:
            yield s
    else:
        with db() as s:
            yield s
