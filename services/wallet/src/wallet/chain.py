"""The ledger's hash chains: one canonical serialization for the writer and the verifier.

Every ledger entry carries `hash`, SHA-256 over its own fields and `prev_hash`, the hash of
the previous entry of the same wallet (None for a wallet's first entry), and each wallet
row carries `chain_head`, the hash of its newest entry. One chain per wallet, not one for
the whole ledger: a movement already holds its wallets' row locks, so it knows their heads
(the lock query reads them) and extends their chains without a lock of its own.

A wallet's chain is its entries in (transaction_id, id) order: a movement draws its
transaction id after it holds the locks, so that is the order they were booked in. The
entry id is not hashed: it is assigned by the INSERT, after the hash is worked out. The
place of an entry in its chain is fixed by `prev_hash` instead, and (wallet_id,
transaction_id) names it (a transaction has one entry per wallet).

Encoding, version 1 (`encode`): the ASCII text `wallet-ledger-chain/v1`, then each field as
`;<length>:<text>` (length in characters, so no field can run into the next whatever it
holds), in this order: wallet_id, transaction_id, entry_type, amount, currency,
balance_snapshot (integers in decimal, `-` for negatives), created_at (UTC,
`YYYY-MM-DDTHH:MM:SS.ffffffZ`: microseconds, what both databases keep), prev_hash (64
lowercase hex digits, empty for a wallet's first entry). The hash is the SHA-256 of its
UTF-8 bytes, in lowercase hex. A new encoding gets a new version tag; v1 stays verifiable.

The published digest (`head_digest`): SHA-256 over `wallet-chain-head/v1\\n` and then
`<wallet_id>:<chain_head>\\n` for every wallet that has a head, in wallet id order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, text, tuple_, update

from wallet.models import LedgerEntry, Wallet

VERSION = "wallet-ledger-chain/v1"
HEAD_VERSION = "wallet-chain-head/v1"

W: Table = Wallet.__table__  # type: ignore[attr-defined]
L: Table = LedgerEntry.__table__  # type: ignore[attr-defined]

# The order of a wallet's chain (the index on (wallet_id, transaction_id) serves it).
CHAIN_ORDER = (L.c.wallet_id, L.c.transaction_id, L.c.id)
CONTENT = (
    L.c.wallet_id,
    L.c.transaction_id,
    L.c.entry_type,
    L.c.amount,
    L.c.currency,
    L.c.balance_snapshot,
    L.c.created_at,
)


def timestamp(moment: datetime) -> str:
    """created_at as hashed: UTC, microseconds, a `Z`."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("naive datetime")
    if offset:
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def encode(
    *,
    wallet_id: int,
    transaction_id: int,
    entry_type: str,
    amount: int,
    currency: str,
    balance_snapshot: int,
    created_at: datetime,
    prev_hash: str | None,
) -> bytes:
    """The canonical v1 bytes of an entry (see the module docstring)."""
    fields = (
        str(int(wallet_id)),
        str(int(transaction_id)),
        entry_type,
        str(int(amount)),
        currency,
        str(int(balance_snapshot)),
        timestamp(created_at),
        prev_hash or "",
    )
    return (VERSION + "".join([f";{len(f)}:{f}" for f in fields])).encode()


def entry_hash(**fields: Any) -> str:
    """The hash of an entry: SHA-256 of `encode(**fields)`, in lowercase hex."""
    return hashlib.sha256(encode(**fields)).hexdigest()


def row_hash(row: Any, prev_hash: str | None) -> str:
    """The hash of a stored entry (a row with the CONTENT columns) after `prev_hash`."""
    m = row._mapping
    return entry_hash(**{c.key: m[c.key] for c in CONTENT}, prev_hash=prev_hash)


def head_digest(heads: Iterable[tuple[int, str]]) -> str:
    """One digest over every wallet's chain head, to publish (see the module docstring)."""
    digest = hashlib.sha256((HEAD_VERSION + "\n").encode())
    for wallet_id, head in sorted(heads):
        digest.update(f"{int(wallet_id)}:{head}\n".encode())
    return digest.hexdigest()


def current_heads(conn: Connection) -> list[tuple[int, str]]:
    query = select(W.c.id, W.c.chain_head).where(W.c.chain_head.is_not(None)).order_by(W.c.id)
    return [(int(wallet_id), head) for wallet_id, head in conn.execute(query)]


# --- chaining entries written without a hash (migration 0010, the bench's seeded ledger) ---

# The append-only trigger that refuses UPDATE (migration 0001), paused while hashes are
# filled in: only the tables' owner can do this, never the service's role.
_SQLITE_NO_UPDATE = (
    "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: UPDATE refused'); END"
)

_SET_HASH = (
    update(L).where(L.c.id == bindparam("entry_id")).values(prev_hash=bindparam("new_prev"), hash=bindparam("new_hash"))
)
_SET_HEAD = update(W).where(W.c.id == bindparam("wallet_id")).values(chain_head=bindparam("head"))


def chain_unchained(conn: Connection, *, batch: int = 10_000) -> int:
    """Hash, in chain order, every entry that has no hash yet (after its wallet's last
    hashed entry), and set those wallets' heads; returns how many entries it hashed.

    Reads in keyset batches of `batch` entries, so memory stays flat for any ledger (but
    for the new heads, one per wallet it hashed entries of).
    Run as the tables' owner, in the caller's transaction (it pauses the append-only
    trigger on UPDATE for its own updates and restores it).
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(text("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only"))
    else:
        conn.execute(text("DROP TRIGGER IF EXISTS ledger_entries_no_update"))
    # One keyset walk over every entry in chain order (each batch a range of the
    # (wallet_id, transaction_id) index): the hashed ones only give the next one its prev.
    query = select(L.c.id, *CONTENT, L.c.hash).order_by(*CHAIN_ORDER).limit(batch)
    after: tuple[int, int, int] | None = None
    current, prev, hashed = None, None, 0
    heads: dict[int, str] = {}
    while True:
        page = query if after is None else query.where(tuple_(*CHAIN_ORDER) > tuple_(*after))
        rows = conn.execute(page).all()
        if not rows:
            break
        updates = []
        for row in rows:
            if row.wallet_id != current:
                current, prev = row.wallet_id, None
            if row.hash is None:
                new = row_hash(row, prev)
                updates.append({"entry_id": row.id, "new_prev": prev, "new_hash": new})
                prev = new
            else:
                prev = row.hash
            if row.hash is None or row.wallet_id in heads:  # a wallet it rechained: its head moves on
                heads[row.wallet_id] = prev
        if updates:
            conn.execute(_SET_HASH, updates)
            hashed += len(updates)
        after = (rows[-1].wallet_id, rows[-1].transaction_id, rows[-1].id)
    if heads:
        conn.execute(_SET_HEAD, [{"wallet_id": w, "head": h} for w, h in heads.items()])
    if dialect == "postgresql":
        conn.execute(text("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only"))
    else:
        conn.execute(text(_SQLITE_NO_UPDATE))
    return hashed


# --- verifying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Break:
    entry_id: int | None
    wallet_id: int
    what: str  # content, link, unchained or head
    message: str


def verify(
    conn: Connection,
    *,
    entries_where: Iterable[Any] = (),
    wallets_where: Iterable[Any] = (),
    published: dict[int, str] | None = None,
) -> Iterator[Break]:
    """Walk every chain (of the wallets the filters select) in order and yield each break:
    an entry whose content no longer gives its hash, one that does not link to the entry
    before it (an entry was deleted, inserted or moved), one without a hash, and a wallet
    whose head is not its newest entry's hash (its newest entries deleted, or one added).
    With `published` (wallet id -> a head published earlier), also each of those wallets
    whose chain no longer holds that hash: the chain was rewritten up to it, hashes and
    all. The walk goes on from the stored hash after a break, so each tampered place is
    named once. Streams the entries; the wallets' heads are held in memory."""
    heads = dict(conn.execute(select(W.c.id, W.c.chain_head).where(*wallets_where)).all())
    expected = {w: h for w, h in (published or {}).items() if w in heads}
    query = select(L.c.id, *CONTENT, L.c.prev_hash, L.c.hash).where(*entries_where).order_by(*CHAIN_ORDER)
    current: int | None = None
    prev: str | None = None
    newest: int | None = None
    for row in conn.execution_options(yield_per=10_000).execute(query):
        if row.wallet_id != current:
            if current is not None:
                yield from _check_head(current, heads.pop(current, None), prev, newest)
            current, prev, newest = row.wallet_id, None, None
        yield from _check_entry(row, prev)
        if row.hash is not None:  # the chain goes on past an entry without a hash
            prev, newest = row.hash, row.id
            if expected.get(row.wallet_id) == row.hash:
                del expected[row.wallet_id]
    if current is not None:
        yield from _check_head(current, heads.pop(current, None), prev, newest)
    for wallet_id, head in sorted(heads.items()):
        if head is not None:
            yield Break(None, wallet_id, "head", f"wallet {wallet_id}: chain head {head[:12]}… but no entries")
    for wallet_id, head in sorted(expected.items()):
        yield Break(
            None,
            wallet_id,
            "published",
            f"wallet {wallet_id}: the published head {head[:12]}… is no longer in its chain"
            " (an entry up to it was rewritten or deleted, and the hashes after it recomputed)",
        )


def _check_entry(row: Any, prev: str | None) -> Iterator[Break]:
    where = f"ledger entry {row.id} (wallet {row.wallet_id}, transaction {row.transaction_id})"
    if row.hash is None:
        yield Break(row.id, row.wallet_id, "unchained", f"{where}: no hash (written behind the service's back)")
        return
    if row.prev_hash != prev:
        yield Break(
            row.id,
            row.wallet_id,
            "link",
            f"{where}: links to {_short(row.prev_hash)} but the entry before it in the chain is {_short(prev)}"
            " (an entry before it was deleted or inserted, or the order changed)",
        )
    if row_hash(row, row.prev_hash) != row.hash:
        yield Break(
            row.id, row.wallet_id, "content", f"{where}: its fields no longer give its hash (the entry was rewritten)"
        )


def _check_head(wallet_id: int, head: str | None, last: str | None, newest: int | None) -> Iterator[Break]:
    if head != last:
        yield Break(
            newest,
            wallet_id,
            "head",
            f"wallet {wallet_id}: chain head {_short(head)} is not its newest entry's hash {_short(last)}"
            f" (entry {newest}): entries after it were deleted, or the head was changed",
        )


def _short(value: str | None) -> str:
    return f"{value[:12]}…" if value else "nothing (the start of the chain)"
