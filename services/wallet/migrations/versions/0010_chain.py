"""tamper evidence: hash-chain every wallet's ledger entries

- `ledger_entries.prev_hash` and `ledger_entries.hash`, and `wallets.chain_head` (the hash
  of the wallet's newest entry): see wallet.chain for the chain and its encoding.
- Every existing entry is hashed, in chain order per wallet, in keyset batches (flat
  memory for any ledger), and every wallet's head is set. The append-only trigger on
  UPDATE is paused for that, inside this migration's transaction, and restored.
- The columns stay nullable: an entry written behind the service's back without a hash
  is a break that `wallet-audit --verify-chain` reports, not a refused insert. (On SQLite
  a NOT NULL column would mean rebuilding the table, and with it its triggers.)

Its down_revision is 0008 (holds and refunds); written on 0007, re-chained after the
merge of main. A statements migration 0009, if any, goes before it.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from wallet.chain import chain_unchained

revision: str = "0010"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("prev_hash", sa.String(64), nullable=True))
    op.add_column("ledger_entries", sa.Column("hash", sa.String(64), nullable=True))
    op.add_column("wallets", sa.Column("chain_head", sa.String(64), nullable=True))
    chain_unchained(op.get_bind())


def downgrade() -> None:
    # Plain DROP COLUMN on both (SQLite >= 3.35): no table rebuild, so the triggers stay.
    op.drop_column("wallets", "chain_head")
    op.drop_column("ledger_entries", "hash")
    op.drop_column("ledger_entries", "prev_hash")
