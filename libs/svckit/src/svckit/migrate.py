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


def create_outbox() -> None:
    """The `outbox` table every producing service has (see svckit.outbox)."""
    import sqlalchemy as sa
    from alembic import op

    from svckit.db import UTCDateTime

    op.create_table(
        "outbox",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("actor_name", sa.String(60), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("published_at", UTCDateTime(), nullable=True),
    )
    # The relay only ever scans unpublished rows.
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["created_at"],
        sqlite_where=sa.text("published_at IS NULL"),
        postgresql_where=sa.text("published_at IS NULL"),
    )


def drop_outbox() -> None:
    from alembic import op

    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")


def add_outbox_confirmation() -> None:
    """`confirmed_at`: the notifier's marker for the email was seen (see Relay.reconcile)."""
    import sqlalchemy as sa
    from alembic import op

    from svckit.db import UTCDateTime

    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("confirmed_at", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_outbox_unconfirmed",
        "outbox",
        ["published_at"],
        sqlite_where=sa.text("published_at IS NOT NULL AND confirmed_at IS NULL"),
        postgresql_where=sa.text("published_at IS NOT NULL AND confirmed_at IS NULL"),
    )


def drop_outbox_confirmation() -> None:
    from alembic import op

    op.drop_index("ix_outbox_unconfirmed", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("confirmed_at")


def add_outbox_outcome() -> None:
    """`outcome`: 'sent' or 'dead_lettered', recorded with `confirmed_at` from the notifier's
    markers (see Relay.reconcile), so a dead letter is kept in the database, not only in
    Redis. Rows confirmed before this migration keep a null outcome (the markers that told
    sent from dead-lettered were not recorded then)."""
    import sqlalchemy as sa
    from alembic import op

    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("outcome", sa.String(16), nullable=True))
        batch.create_check_constraint("ck_outbox_outcome", "outcome IN ('sent', 'dead_lettered')")
    # `<service>-relay dead-letters` and the relay's recheck only ever scan dead letters.
    op.create_index(
        "ix_outbox_dead_lettered",
        "outbox",
        ["id"],
        sqlite_where=sa.text("outcome = 'dead_lettered'"),
        postgresql_where=sa.text("outcome = 'dead_lettered'"),
    )


def drop_outbox_outcome() -> None:
    from alembic import op

    op.drop_index("ix_outbox_dead_lettered", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_constraint("ck_outbox_outcome", type_="check")
        batch.drop_column("outcome")
