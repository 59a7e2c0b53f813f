"""Optuna storage for studies kept in a database: SQLite files or the service's PostgreSQL.

`make_storage(url)` opens an Optuna RDB storage, switching SQLite files to WAL (readers do not block the worker
that writes) and putting Optuna's tables into their own PostgreSQL schema, because Optuna and the app would
otherwise share the `alembic_version` table. A database that already holds another application's migrations
is refused.
"""

from __future__ import annotations

import time
from typing import Any

from quant.errors import BitsearchError


def _sqlalchemy_url(url: str) -> str:
    # The app ships psycopg 3; SQLAlchemy reads a bare postgresql:// as psycopg2.
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _check_foreign_database(url: str, engine_kwargs: dict[str, Any]) -> None:
    """Refuse a database whose `alembic_version` belongs to another application (Optuna would adopt it)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, **engine_kwargs)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if "alembic_version" in names and "version_info" not in names:
        raise BitsearchError(
            "this database already holds another application's migrations (alembic_version); Optuna would "
            "take that table over. Give the study its own SQLite file, or a PostgreSQL schema (optuna_schema)"
        )


def make_storage(storage: Any, optuna_schema: str = "optuna", **rdb_options: Any) -> Any:
    """An Optuna storage from a URL (or None: in memory; or an Optuna storage, returned as is).

    `rdb_options` go to `optuna.storages.RDBStorage` (heartbeat_interval, grace_period, failed_trial_callback).
    """
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    url = _sqlalchemy_url(storage)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60, "check_same_thread": False}}
        path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
        if path and path != ":memory:":
            import sqlite3

            # WAL (persistent in the file): readers do not block the worker that writes. Switching needs the
            # file to itself, so a worker that opens it while another writes retries, then goes on without.
            for attempt in range(10):
                con = sqlite3.connect(path, timeout=60)
                try:
                    if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                        break
                    con.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    time.sleep(0.1 * (attempt + 1))
                finally:
                    con.close()
    elif url.startswith("postgresql"):
        import sqlalchemy as sa

        # The study's tables go into their own schema: a search_path the app's URL sets (its `options`) must
        # not send Optuna into the app's schema, so that query parameter is dropped here.
        url = sa.engine.make_url(url).difference_update_query(["options"]).render_as_string(hide_password=False)
        engine = sa.create_engine(url, pool_pre_ping=True)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{optuna_schema}"'))
        finally:
            engine.dispose()
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"options": f"-csearch_path={optuna_schema}"}}
    _check_foreign_database(url, engine_kwargs)
    last: Exception | None = None
    for attempt in range(5):  # two workers creating the tables at once: the loser retries
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **rdb_options)
        except Exception as exc:  # sqlalchemy's OperationalError / IntegrityError on a racing CREATE TABLE
            last = exc
            time.sleep(0.2 * (attempt + 1))
    raise BitsearchError(f"cannot open the Optuna storage {storage!r}: {last}")


__all__ = ["make_storage"]
