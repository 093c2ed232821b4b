"""recorded keys: the batch's look-up of its keys' records, planned as index look-ups always

A batch of movements (wallet.movements) first asks which of its keys have a record
already (repository.recorded_keys). As a plain statement, asyncpg prepares it once per
connection and Postgres caches a generic plan after five runs, planned for the table as it
was then. Planned while `idempotency_records` is small (a new deployment, or any database
whose statistics are stale: autovacuum off or behind), that plan is a hash join over a
sequential scan, and it stays: every batch then reads the whole table, which grows by a
row per movement (measured: 3.7 million rows read in 975 batches of a 30-second run on a
fresh database, never the index; 8 ms per batch at 20,000 records, growing with them).

This function holds the query instead, planned with sequential scans and hash and merge
joins off (its SET clause applies whenever PL/pgSQL plans or replans it): a nested loop of
unique-index look-ups, one per key, whatever the table's size and statistics. Postgres
only; SQLite looks each key up by the index in process.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTION = "idempotency_keys_recorded"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION {FUNCTION}(user_ids bigint[], endpoints text[], keys text[])
        RETURNS TABLE (user_id bigint, endpoint text, key text)
        LANGUAGE plpgsql STABLE
        SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
        SET search_path FROM CURRENT
        AS $$
        #variable_conflict use_column
        BEGIN
          RETURN QUERY
            SELECT i.user_id::bigint, i.endpoint::text, i.key::text
            FROM unnest(user_ids, endpoints, keys) AS asked(user_id, endpoint, key)
            JOIN idempotency_records AS i
              ON i.user_id = asked.user_id AND i.endpoint = asked.endpoint AND i.key = asked.key;
        END $$
        """  # noqa: S608 (constant names)
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}(bigint[], text[], text[])")
