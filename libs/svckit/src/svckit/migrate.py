"""The body of every service's Alembic env.py: online migrations for SQLite and Postgres,
and on Postgres the privileges of the role the service connects as.

Two roles per database in production: the migration role owns the tables (and with them
ALTER, DISABLE TRIGGER, DROP TRIGGER, TRUNCATE), and the app role the service connects as
holds only what the service's queries need, declared once per service (`GRANTS` next to
its models) and applied again after every migration run, so a new image's privileges
arrive with it. Nothing else is granted: a table without a declaration gets nothing, and
`alembic_version` only SELECT (`*-migrations wait`, svckit.schema_wait, reads it as the
app role before a new image serves).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from alembic import context
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.engine import make_url

from svckit.db import make_engine
from svckit.settings import BaseServiceSettings

log = logging.getLogger("svckit.migrate")

Grants = Mapping[str, Collection[str]]
# What a service may be granted on a table. TRUNCATE, REFERENCES and TRIGGER never: each
# would let it bypass or tamper with the append-only ledger.
PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
VERSION_TABLE = "alembic_version"  # Alembic's default; no env.py of ours names another


def app_role(settings: BaseServiceSettings) -> str:
    """The role the service's privileges are granted to: `*_DATABASE_APP_ROLE`, else the user
    of `*_DATABASE_URL` when the migrations connect with `*_MIGRATION_DATABASE_URL`."""
    if settings.database_app_role:
        return settings.database_app_role
    if not settings.migration_database_url:
        return ""
    return make_url(settings.database_url).username or ""


def run_migrations(
    target_metadata: MetaData, settings: BaseServiceSettings, grants: Grants, functions: Collection[str] = ()
) -> None:
    """Migrate with the migration URL (`*_MIGRATION_DATABASE_URL`, else `*_DATABASE_URL`),
    then grant the app role its privileges (`functions`: the signatures of the functions it
    may run). `-x url=...` and `-x app_role=...` on the alembic command line win over the
    settings."""
    check_grants(target_metadata, grants)
    x = context.get_x_argument(as_dictionary=True)
    url = x.get("url") or settings.migration_database_url or settings.database_url
    role = x.get("app_role") or app_role(settings)
    if context.is_offline_mode():  # an SQL script carries no grants: run online once after it
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER via table copy
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if role and connection.dialect.name == "postgresql":
            if connection.in_transaction():
                connection.commit()
            with connection.begin():
                apply_grants(connection, role, grants, functions)
    engine.dispose()


def _split(privilege: str) -> tuple[str, tuple[str, ...]]:
    """ "UPDATE" -> ("UPDATE", ()); "UPDATE (balance, status)" -> ("UPDATE", ("balance",
    "status")): a privilege on those columns only."""
    name, _, columns = privilege.partition("(")
    return name.strip().upper(), tuple(c.strip().lower() for c in columns.rstrip(") ").split(",") if c.strip())


def check_grants(target_metadata: MetaData, grants: Grants) -> None:
    """Every table of the service has a declaration (possibly empty), and only known privileges."""
    missing = sorted(set(target_metadata.tables) - set(grants))
    if missing:
        raise ValueError(f"tables without a GRANTS entry: {missing} (declare what the service needs, or ())")
    for table, privileges in grants.items():
        wrong = {p for p, columns in map(_split, privileges) if p not in PRIVILEGES or (columns and p == "DELETE")}
        if wrong:
            raise ValueError(f"{table}: privileges {sorted(wrong)} may not be granted (only {sorted(PRIVILEGES)})")


def apply_grants(conn: Connection, role: str, grants: Grants, functions: Collection[str] = ()) -> None:
    """Make `role`'s privileges on the tables (and their sequences) this role owns exactly
    `grants`, plus SELECT on `alembic_version`: everything else is revoked. Each of
    `functions` (a signature, `name(argument types)`) that exists may be run by `role` and
    by no one else (a function's default is to `PUBLIC`), whatever was changed by hand. Idempotent;
    runs in the caller's transaction, so the service sees the old privileges or the new
    ones, never none."""
    me, superuser = conn.execute(text("SELECT rolname, rolsuper FROM pg_roles WHERE rolname = current_user")).one()
    if superuser:
        log.warning("migrations connect as the superuser %s: use a role that owns the tables and nothing else", me)
    if role == me:
        log.warning("migrations connect as the app role %s: it owns the tables (see deploy/README.md)", role)
        return
    found = conn.execute(
        text(
            "SELECT rolsuper, pg_has_role(rolname, current_user, 'MEMBER') AS member FROM pg_roles WHERE rolname = :r"
        ),
        {"r": role},
    ).first()
    if found is None:
        raise RuntimeError(f"app role {role!r} does not exist: create it first (deploy/README.md)")
    if found.rolsuper:
        raise RuntimeError(f"app role {role!r} is a superuser: it could bypass every privilege")
    if found.member:
        raise RuntimeError(f"app role {role!r} is a member of the migration role {me!r}: it could ALTER the tables")
    # Relations of the current schema: tables (r, p) and sequences (S), and who owns them.
    rows = conn.execute(
        text(
            "SELECT c.oid, c.relname, c.relkind, pg_get_userbyid(c.relowner) AS owner FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'S')"
        )
    ).all()
    foreign = sorted(r.relname for r in rows if r.owner != me and (r.relname in grants or r.relname == VERSION_TABLE))
    if foreign:
        raise RuntimeError(
            f"tables {foreign} are not owned by the migration role {me!r}: "
            f"ALTER TABLE ... OWNER TO {me} first (deploy/README.md)"
        )
    quote = conn.dialect.identifier_preparer.quote
    grantee = quote(role)
    for r in rows:
        if r.owner == me:
            kind = "SEQUENCE" if r.relkind == "S" else "TABLE"
            conn.exec_driver_sql(f"REVOKE ALL ON {kind} {quote(r.relname)} FROM {grantee}")
    tables = {r.relname: r.oid for r in rows if r.relkind != "S"}
    for table, privileges in grants.items():
        if table not in tables or not privileges:
            continue  # not there (yet, or any more: a downgrade), or nothing to grant
        parsed = [_split(p) for p in privileges]
        wanted = {p for p, columns in parsed if not columns}
        if wanted:
            conn.exec_driver_sql(f"GRANT {', '.join(sorted(wanted))} ON TABLE {quote(table)} TO {grantee}")
        existing = set(conn.execute(_COLUMNS, {"table": tables[table]}).scalars())
        for privilege, columns in parsed:
            # Columns a later migration adds are granted once it has run.
            present = [quote(c) for c in columns if c in existing]
            if present:
                conn.exec_driver_sql(f"GRANT {privilege} ({', '.join(present)}) ON TABLE {quote(table)} TO {grantee}")
        if "INSERT" in wanted:  # the ids its inserts draw (serial or identity columns)
            for (sequence,) in conn.execute(_OWNED_SEQUENCES, {"table": tables[table]}):
                conn.exec_driver_sql(f"GRANT USAGE ON SEQUENCE {quote(sequence)} TO {grantee}")
    if VERSION_TABLE in tables:  # which revision the database is at, for `*-migrations wait`
        conn.exec_driver_sql(f"GRANT SELECT ON TABLE {quote(VERSION_TABLE)} TO {grantee}")
    for signature in functions:
        if conn.execute(text("SELECT to_regprocedure(:f)"), {"f": signature}).scalar() is None:
            continue  # not there (yet, or any more: a downgrade)
        conn.exec_driver_sql(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        conn.exec_driver_sql(f"GRANT EXECUTE ON FUNCTION {signature} TO {grantee}")
    log.info("granted %s its privileges on %d tables", role, len(grants))


_COLUMNS = text(
    "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:table AS oid) AND attnum > 0 AND NOT attisdropped"
)
_OWNED_SEQUENCES = text(
    "SELECT s.relname FROM pg_depend d "
    "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
    "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
    "AND d.deptype IN ('a', 'i') AND d.refobjid = CAST(:table AS oid)"
)


def create_outbox() -> None:
    """The `outbox` table every producing service has (see svckit.outbox)."""
    import sqlalchemy as sa
    from alembic import op

    from svckit.db import UTCDateTime

    op.create_table(
        "outbox",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("actor_name", sa.String(60), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("published_at", UTCDateTime(), nullable=True),
    )
    # The relay only ever scans unpublished rows.
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["created_at"],
        sqlite_where=sa.text("published_at IS NULL"),
        postgresql_where=sa.text("published_at IS NULL"),
    )


def drop_outbox() -> None:
    from alembic import op

    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")


def add_outbox_confirmation() -> None:
    """`confirmed_at`: the notifier's marker for the email was seen (see Relay.reconcile)."""
    import sqlalchemy as sa
    from alembic import op

    from svckit.db import UTCDateTime

    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("confirmed_at", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_outbox_unconfirmed",
        "outbox",
        ["published_at"],
        sqlite_where=sa.text("published_at IS NOT NULL AND confirmed_at IS NULL"),
        postgresql_where=sa.text("published_at IS NOT NULL AND confirmed_at IS NULL"),
    )


def drop_outbox_confirmation() -> None:
    from alembic import op

    op.drop_index("ix_outbox_unconfirmed", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("confirmed_at")


def add_outbox_outcome() -> None:
    """`outcome`: 'sent' or 'dead_lettered', recorded with `confirmed_at` from the notifier's
    markers (see Relay.reconcile), so a dead letter is kept in the database, not only in
    Redis. Rows confirmed before this migration keep a null outcome (the markers that told
    sent from dead-lettered were not recorded then)."""
    import sqlalchemy as sa
    from alembic import op

    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("outcome", sa.String(16), nullable=True))
        batch.create_check_constraint("ck_outbox_outcome", "outcome IN ('sent', 'dead_lettered')")
    # `<service>-relay dead-letters` and the relay's recheck only ever scan dead letters.
    op.create_index(
        "ix_outbox_dead_lettered",
        "outbox",
        ["id"],
        sqlite_where=sa.text("outcome = 'dead_lettered'"),
        postgresql_where=sa.text("outcome = 'dead_lettered'"),
    )


def drop_outbox_outcome() -> None:
    from alembic import op

    op.drop_index("ix_outbox_dead_lettered", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_constraint("ck_outbox_outcome", type_="check")
        batch.drop_column("outcome")
