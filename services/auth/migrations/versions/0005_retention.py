"""retention: the outbox purge's index

`ix_outbox_confirmed` (confirmed_at, id) of confirmed rows: `auth-purge` walks it in that
order (svckit.retention). On Postgres it is built CONCURRENTLY, so a large outbox keeps
taking writes meanwhile. The service's role may now DELETE outbox rows (models.GRANTS),
for the purge.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from svckit.retention import create_outbox_purge_index, drop_outbox_purge_index

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_outbox_purge_index()


def downgrade() -> None:
    drop_outbox_purge_index()
