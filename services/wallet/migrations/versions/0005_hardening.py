"""hardening: no INSERT over a ledger row (SQLite), 64-bit ledger ids (Postgres), the
request token of idempotency records

- SQLite: `INSERT OR REPLACE` (and `REPLACE`) with an existing id deletes the old row
  without firing DELETE triggers (recursive_triggers is off), so the append-only triggers
  of 0001 did not see it. A BEFORE INSERT trigger refuses any insert whose id exists; it
  fires before the conflict is resolved. (An upsert, `ON CONFLICT DO UPDATE`, already
  fires the UPDATE trigger on both databases; Postgres has no REPLACE.)
- Postgres: the ids of transactions, ledger entries and idempotency records, and the
  columns naming a transaction, become BIGINT, and so do their sequences (a serial's
  sequence stops at 2^31 - 1 otherwise). SQLite's INTEGER is 64-bit already. The outbox
  id is a 32-character string (svckit), nothing to widen. Changing a column's type
  rewrites the table under an exclusive lock: on a large database run this in a
  maintenance window.
- `idempotency_records.request_token`: the random token of the request that wrote the
  record, so that a request whose connection died at COMMIT recognises its own record
  when it runs again (and answers as a first answer, not a replay).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = ("transactions", "ledger_entries")
# Postgres columns widened to BIGINT; the first of each table is its serial id.
WIDENED = {
    "transactions": ("id",),
    "ledger_entries": ("id", "transaction_id"),
    "idempotency_records": ("id", "transaction_id"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _retype(sa.Integer(), sa.BigInteger(), "bigint")
    else:
        for table in APPEND_ONLY:
            exists = f"EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id)"  # noqa: S608 (table names are constants)
            refuse = f"SELECT RAISE(ABORT, '{table} is append-only: INSERT over an existing row refused')"
            op.execute(
                f"CREATE TRIGGER {table}_no_overwrite BEFORE INSERT ON {table} WHEN {exists} BEGIN {refuse}; END"
            )
    with op.batch_alter_table("idempotency_records") as batch:
        batch.add_column(sa.Column("request_token", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_column("request_token")
    if op.get_bind().dialect.name == "postgresql":
        # Fails (and changes nothing) once an id is past 2^31 - 1: it cannot be narrowed.
        _retype(sa.BigInteger(), sa.Integer(), "integer")
    else:
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_overwrite")


def _retype(old: sa.types.TypeEngine[int], new: sa.types.TypeEngine[int], sequence_type: str) -> None:
    bind = op.get_bind()
    for table, columns in WIDENED.items():
        for column in columns:
            op.alter_column(table, column, type_=new, existing_type=old)
        sequence = bind.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one()
        op.execute(f"ALTER SEQUENCE {sequence} AS {sequence_type}")
