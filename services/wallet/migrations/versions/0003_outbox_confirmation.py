"""outbox delivery confirmation

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from svckit.migrate import add_outbox_confirmation, drop_outbox_confirmation

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_confirmation()


def downgrade() -> None:
    drop_outbox_confirmation()
