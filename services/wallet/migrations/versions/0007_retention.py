"""retention: the purge's indexes, and no idempotency record deleted before 24 hours

- `ix_idempotency_records_created_at` (created_at, id) and `ix_outbox_confirmed`
  (confirmed_at, id) of confirmed rows: `wallet-purge` walks them in that order
  (svckit.retention). On Postgres they are built CONCURRENTLY, so a large table keeps
  taking writes meanwhile.
- The service's role may now DELETE from both tables (models.GRANTS), for the purge; a
  trigger refuses to delete an idempotency record younger than 24 hours, the contract's
  minimum, whoever asks. On Postgres one check per statement (a transition table), on
  SQLite one per row. A later migration that rebuilds `idempotency_records` on SQLite
  (batch_alter_table copies the table) must create the trigger again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

from svckit.retention import create_outbox_purge_index, create_purge_index, drop_outbox_purge_index, drop_purge_index

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_idempotency_records_created_at"
TRIGGER = "idempotency_records_retention"
REFUSED = "idempotency_records are kept at least 24 hours (the contract): DELETE of a younger record refused"


def upgrade() -> None:
    create_purge_index(INDEX, "idempotency_records", ["created_at", "id"])
    create_outbox_purge_index()
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION refuse_young_idempotency_delete() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF EXISTS (SELECT 1 FROM purged WHERE created_at > now() - interval '24 hours') THEN
                RAISE EXCEPTION '{REFUSED}' USING ERRCODE = 'restrict_violation';
              END IF;
              RETURN NULL;
            END $$
            """  # noqa: S608 (a constant message)
        )
        op.execute(
            f"CREATE TRIGGER {TRIGGER} AFTER DELETE ON idempotency_records REFERENCING OLD TABLE AS purged "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse_young_idempotency_delete()"
        )
    else:
        # created_at is stored as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC, which sorts as text.
        op.execute(
            f"CREATE TRIGGER {TRIGGER} BEFORE DELETE ON idempotency_records "
            "WHEN OLD.created_at > strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 day') "
            f"BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON idempotency_records")
        op.execute("DROP FUNCTION IF EXISTS refuse_young_idempotency_delete()")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}")
    drop_outbox_purge_index()
    drop_purge_index(INDEX, "idempotency_records")
