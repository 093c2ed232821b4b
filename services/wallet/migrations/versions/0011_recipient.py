"""recipient: the owner's email address and names on the wallet row

A receipt carries its recipient (svckit.messages.Recipient), so the notifier sends it
without asking the auth service for the address once per email. The wallet learns them
where it already learns the owner's display name: from auth's `/internal/users`, when the
wallet is opened. Nullable: wallets opened before this migration have none, and their
receipts go out without a recipient (the notifier looks it up, as before).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("owner_email", 320), ("owner_first_name", 100), ("owner_last_name", 100))  # auth's limits


def upgrade() -> None:
    # A plain ADD COLUMN on both databases (nullable, no default): SQLite does not copy the table.
    for name, length in COLUMNS:
        op.add_column("wallets", sa.Column(name, sa.String(length), nullable=True))


def downgrade() -> None:
    # In place on SQLite too (>= 3.35): batch mode would copy the table, turning 0008's
    # column CHECK on `held` into a table constraint that its own downgrade cannot drop.
    for name, _ in reversed(COLUMNS):
        op.execute(f"ALTER TABLE wallets DROP COLUMN {name}")
