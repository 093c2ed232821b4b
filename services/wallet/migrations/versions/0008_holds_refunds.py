"""holds and refunds: the holds table, wallets.held, the refunds table, and the ledger's
(wallet_id, created_at) index for balances at a past time

- `holds`: money reserved on a wallet (a two-phase payment); no ledger entry until a
  capture books a transfer (`transaction_id`). Partial index on the active holds' expiry
  for the sweeper.
- `wallets.held`: what the wallet's active holds reserve, kept in step with them under
  the wallet's row lock; a CHECK keeps it between 0 and the balance (user wallets), so
  held money can never be spent whatever the code does.
- `refunds`: which transfer a refund transfer refunds, append-only like the ledger.
- `ix_ledger_wallet_created_at`: `GET /wallet/balance?at=` reads one wallet's newest entry
  at or before a time in one index lookup. (Built in the migration's transaction: on a
  large ledger, create it CONCURRENTLY beforehand, then this migration finds it.)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from wallet.models import LONG_ID

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD_CHECK = "held >= 0 AND (kind = 'system' OR held <= balance)"
LEDGER_INDEX = "ix_ledger_wallet_created_at"


def _time(name: str) -> sa.Column[sa.DateTime]:
    from svckit.db import UTCDateTime

    return sa.Column(name, UTCDateTime(), nullable=False)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.add_column("wallets", sa.Column("held", sa.BigInteger(), nullable=False, server_default="0"))
        op.create_check_constraint("ck_wallets_held", "wallets", HELD_CHECK)
    else:
        # SQLite adds a column with a CHECK in place (batch mode would copy the table).
        op.execute(
            f"ALTER TABLE wallets ADD COLUMN held BIGINT NOT NULL DEFAULT 0 CONSTRAINT ck_wallets_held CHECK ({HELD_CHECK})"
        )
    op.create_table(
        "holds",
        sa.Column("id", LONG_ID, primary_key=True),
        sa.Column("wallet_id", sa.Integer(), sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("recipient_wallet_id", sa.Integer(), sa.ForeignKey("wallets.id"), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("captured_amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("transaction_id", LONG_ID, sa.ForeignKey("transactions.id"), nullable=True),
        sa.Column("initiated_by", sa.Integer(), nullable=False),
        _time("expires_at"),
        _time("created_at"),
        _time("updated_at"),
        sa.CheckConstraint("amount > 0", name="ck_holds_amount_positive"),
        sa.CheckConstraint("captured_amount >= 0 AND captured_amount <= amount", name="ck_holds_captured"),
        sa.CheckConstraint("status IN ('active', 'captured', 'voided', 'expired')", name="ck_holds_status"),
        sa.CheckConstraint("(status = 'captured') = (transaction_id IS NOT NULL)", name="ck_holds_capture_transaction"),
    )
    op.create_index("ix_holds_wallet_status", "holds", ["wallet_id", "status", "id"])
    op.create_index(
        "ix_holds_active_expires_at",
        "holds",
        ["expires_at"],
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "refunds",
        sa.Column("transaction_id", LONG_ID, sa.ForeignKey("transactions.id"), primary_key=True),
        sa.Column("refund_of", LONG_ID, sa.ForeignKey("transactions.id"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_refunds_refund_of", "refunds", ["refund_of"])
    if postgres:  # the function is migration 0001's
        op.execute(
            "CREATE TRIGGER refunds_append_only BEFORE UPDATE OR DELETE ON refunds "
            "FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER refunds_no_{action.lower()} BEFORE {action} ON refunds "
                f"BEGIN SELECT RAISE(ABORT, 'refunds is append-only: {action} refused'); END"
            )
    op.create_index(LEDGER_INDEX, "ledger_entries", ["wallet_id", "created_at"])


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.drop_index(LEDGER_INDEX, table_name="ledger_entries")
    if postgres:
        op.execute("DROP TRIGGER IF EXISTS refunds_append_only ON refunds")
    else:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS refunds_no_{action}")
    op.drop_index("ix_refunds_refund_of", table_name="refunds")
    op.drop_table("refunds")
    op.drop_index("ix_holds_active_expires_at", table_name="holds")
    op.drop_index("ix_holds_wallet_status", table_name="holds")
    op.drop_table("holds")
    if postgres:
        op.drop_constraint("ck_wallets_held", "wallets", type_="check")
        op.drop_column("wallets", "held")
    else:
        op.execute("ALTER TABLE wallets DROP COLUMN held")  # SQLite >= 3.35; refused while a CHECK names it
