"""The body of every service's Alembic env.py: online migrations for SQLite and Postgres."""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData

from svckit.db import make_engine


def run_migrations(target_metadata: MetaData, url: str) -> None:
    # `-x url=...` on the alembic command line wins over the service's settings.
    url = context.get_x_argument(as_dictionary=True).get("url", url)
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER via table copy
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
