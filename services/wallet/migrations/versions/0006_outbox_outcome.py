"""outbox outcome: sent or dead-lettered, so dead letters are kept in the database

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from svckit.migrate import add_outbox_outcome, drop_outbox_outcome

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_outcome()


def downgrade() -> None:
    drop_outbox_outcome()
