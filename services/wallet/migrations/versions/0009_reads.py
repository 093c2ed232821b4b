"""reads: a (wallet_id, created_at, transaction_id) index on ledger_entries

`GET /wallet/statement` finds a wallet's opening balance (its last entry before `from`)
and its lines (`from` to `to`, oldest first), and `GET /transaction/history` with `from`
or `to` walks a time range: both are index range scans on this index, so they cost the
lines read, not the ledger's size. On Postgres it is built CONCURRENTLY, so a large ledger
keeps taking movements meanwhile (svckit.retention.create_purge_index).

Revision ID: 0009_reads
Revises: 0007 (re-chained onto 0008 at merge)
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from svckit.retention import create_purge_index, drop_purge_index

revision: str = "0009_reads"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_ledger_wallet_created"


def upgrade() -> None:
    create_purge_index(INDEX, "ledger_entries", ["wallet_id", "created_at", "transaction_id"])


def downgrade() -> None:
    drop_purge_index(INDEX, "ledger_entries")
