"""Alembic environment: runs on the connection handed over by db.session.migrate, or on a URL."""

from alembic import context
from sqlalchemy import create_engine

from db.models import Base
from db.session import default_url, normalise_url

config = context.config
target_metadata = Base.metadata


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is None:
        engine = create_engine(normalise_url(config.get_main_option("sqlalchemy.url") or default_url()))
        with engine.begin() as conn:
            _configure_and_run(conn)
    else:
        _configure_and_run(conn)


def _configure_and_run(conn) -> None:
    context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run()
