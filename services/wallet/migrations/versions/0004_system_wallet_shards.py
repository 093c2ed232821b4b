"""system wallet shards

Each currency's outside world is several system wallets (shards) instead of one, so that
deposits and withdrawals of different users do not all queue for the same row lock.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SYSTEM_ONLY = {"sqlite_where": sa.text("kind = 'system'"), "postgresql_where": sa.text("kind = 'system'")}


def upgrade() -> None:
    with op.batch_alter_table("wallets") as batch:
        batch.add_column(sa.Column("shard", sa.Integer(), nullable=False, server_default="0"))
    op.drop_index("uq_wallets_system_currency", table_name="wallets")
    op.create_index("uq_wallets_system_currency_shard", "wallets", ["currency", "shard"], unique=True, **SYSTEM_ONLY)


def downgrade() -> None:
    extra = op.get_bind().execute(sa.text("SELECT count(*) FROM wallets WHERE shard > 0")).scalar_one()
    if extra:
        # Their ledger entries are history (append-only): they cannot be folded into shard 0.
        raise RuntimeError(f"{extra} system wallet shards beyond the first exist; this downgrade cannot remove them")
    op.drop_index("uq_wallets_system_currency_shard", table_name="wallets")
    with op.batch_alter_table("wallets") as batch:
        batch.drop_column("shard")
    op.create_index("uq_wallets_system_currency", "wallets", ["currency"], unique=True, **SYSTEM_ONLY)
