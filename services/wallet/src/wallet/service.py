"""Use cases of the wallet service, one function each, unit of work first. Each commits its
own transaction before it returns, so a failed commit can never follow a 200. A money
movement reads top to bottom: its plan checks the locked wallets and books (the receipts
go in the outbox with the booking), and wallet.movements runs it under its idempotency
key, in a transaction it may share with other movements, the outcome recorded with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError

from svckit.aiodb import Database, transaction
from svckit.db import utcnow
from wallet import repository
from wallet.domain import (
    EXTERNAL_DESTINATION,
    EXTERNAL_SOURCE,
    Booking,
    Locked,
    LockedWallet,
    Party,
    SystemWallets,
    book,
)
from wallet.errors import (
    CurrencyMismatch,
    InsufficientFunds,
    InvalidRange,
    OffsetWithAfter,
    RecipientNotFound,
    SelfTransfer,
    StatementTooLarge,
    TransactionNotFound,
    UnsupportedCurrency,
    WalletExists,
    WalletNotEmpty,
    WalletNotFound,
)
from wallet.idempotency import Answer, Once
from wallet.ledger import CREDIT
from wallet.models import OPEN, USER
from wallet.movements import Movement
from wallet.schemas import (
    History,
    HistoryItem,
    LedgerEntryRead,
    Message,
    MovementResult,
    Statement,
    StatementLine,
    TransferResult,
    WalletCreated,
    WalletRead,
)
from wallet.uow import UnitOfWork
from wallet.users import Owner


def check_currency(currency: str, allowed: frozenset[str]) -> None:
    if currency not in allowed:
        raise UnsupportedCurrency(f"{currency} is not a supported currency ({', '.join(sorted(allowed))}).")


async def ensure_system_wallets(db: Database, currencies: frozenset[str], *, shards: int) -> SystemWallets:
    """Create whichever system wallets are missing (race-safe: replicas start together)."""
    wanted = sorted((currency, shard) for currency in currencies for shard in range(shards))
    for _ in range(3):
        async with transaction(db, read_only=True) as conn:
            existing = await repository.system_wallet_ids(conn)
        missing = [pair for pair in wanted if pair not in existing]
        if not missing:
            return SystemWallets({c: [existing[(c, shard)] for shard in range(shards)] for c in currencies})
        try:
            async with transaction(db) as conn:
                for currency, shard in missing:
                    await repository.add_system_wallet(conn, currency, shard)
        except IntegrityError:
            continue  # another replica created them meanwhile
    raise RuntimeError("could not create the system wallets")


# --- wallets -------------------------------------------------------------------------


async def create_wallet(
    uow: UnitOfWork, *, user_id: int, currency: str, balance: int, owner: Callable[[], Awaitable[Owner]]
) -> WalletCreated:
    async with transaction(uow.db, read_only=True) as conn:
        if await repository.open_wallet_of(conn, user_id) is not None:
            raise WalletExists()
    who = await owner()  # over HTTP to the auth service: outside any database transaction
    system_wallet_id = uow.system_wallets.for_user(currency, user_id)
    try:
        async with transaction(uow.db) as conn:
            wallet = await repository.add_wallet(
                conn, user_id=user_id, currency=currency, owner_name=who.name, recipient=who.recipient
            )
            if balance:
                # The opening balance is an ordinary deposit: in the history and the ledger.
                locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=system_wallet_id)
                booking = book(
                    kind="deposit",
                    source=Party.external(system_wallet_id, EXTERNAL_SOURCE),
                    destination=Party(wallet.id, user_id, who.name, who.recipient),
                    amount=balance,
                    currency=currency,
                    locked=locked,
                    user_id=user_id,
                )
                await repository.write_booking(conn, booking)
    except IntegrityError as exc:  # a concurrent create won the one-open-wallet race
        raise WalletExists() from exc
    return WalletCreated(
        id=wallet.id, user_id=user_id, balance=balance, created_at=wallet.created_at, currency=wallet.currency
    )


async def get_wallet(uow: UnitOfWork, *, user_id: int) -> WalletRead:
    async with transaction(uow.db, read_only=True) as conn:
        wallet = await repository.open_wallet_of(conn, user_id)
    if wallet is None:
        raise WalletNotFound()
    return WalletRead(
        id=wallet.id,
        user_id=user_id,
        balance=wallet.balance,
        created_at=wallet.created_at,
        updated_at=wallet.updated_at,
        currency=wallet.currency,
        full_name=wallet.owner_name,
    )


async def close_wallet(uow: UnitOfWork, *, user_id: int) -> Message:
    async with transaction(uow.db) as conn:
        wallet = await repository.open_wallet_of(conn, user_id, lock=True)
        if wallet is None:
            raise WalletNotFound()
        if wallet.balance != 0:
            raise WalletNotEmpty()
        await repository.close_wallet(conn, wallet.id)
    return Message(message=f"wallet belonging to {wallet.owner_name} deleted successfully")


# --- money movement --------------------------------------------------------------------


def _own_wallet(locked: Locked, user_id: int, currency: str) -> LockedWallet:
    own = next((w for w in locked.wallets.values() if w.user_id == user_id and w.status == OPEN), None)
    if own is None:
        raise WalletNotFound()
    if own.currency != currency:
        raise CurrencyMismatch(f"Your wallet holds {own.currency}, not {currency}.")
    return own


def _recipient(locked: Locked, own: LockedWallet, to_wallet_id: int, currency: str) -> LockedWallet:
    """The other side of a transfer (or a hold's recipient): another user's open wallet of
    the same currency, locked with the caller's."""
    if to_wallet_id == own.id:
        raise SelfTransfer()
    recipient = locked.wallets.get(to_wallet_id)
    if recipient is None or recipient.kind != USER or recipient.status != OPEN:
        raise RecipientNotFound()
    if recipient.currency != currency:
        raise CurrencyMismatch(f"The recipient wallet holds {recipient.currency}, not {currency}.")
    return recipient


async def deposit(uow: UnitOfWork, *, user_id: int, key: str, amount: int, currency: str) -> Answer:
    """Money in from the outside world (the currency's system wallet, the user's shard)."""
    system_wallet_id = uow.system_wallets.for_user(currency, user_id)

    def plan(locked: Locked) -> tuple[MovementResult, Booking]:
        own = _own_wallet(locked, user_id, currency)
        booking = book(
            kind="deposit",
            source=Party.external(system_wallet_id, EXTERNAL_SOURCE),
            destination=Party.of(own),
            amount=amount,
            currency=currency,
            locked=locked,
            user_id=user_id,
        )
        return MovementResult(wallet_id=own.id, amount=amount, current_balance=booking.snapshots[own.id]), booking

    once = Once(uow, user_id=user_id, endpoint="deposit", key=key, payload={"amount": amount, "currency": currency})
    return await uow.movements.run(once, Movement(user_id, system_wallet_id, plan))


async def withdraw(uow: UnitOfWork, *, user_id: int, key: str, amount: int, currency: str) -> Answer:
    """Money out to the outside world (the currency's system wallet, the user's shard)."""
    system_wallet_id = uow.system_wallets.for_user(currency, user_id)

    def plan(locked: Locked) -> tuple[MovementResult, Booking]:
        own = _own_wallet(locked, user_id, currency)
        if own.available < amount:  # held money cannot be spent
            raise InsufficientFunds()
        booking = book(
            kind="withdrawal",
            source=Party.of(own),
            destination=Party.external(system_wallet_id, EXTERNAL_DESTINATION),
            amount=amount,
            currency=currency,
            locked=locked,
            user_id=user_id,
        )
        return MovementResult(wallet_id=own.id, amount=amount, current_balance=booking.snapshots[own.id]), booking

    once = Once(uow, user_id=user_id, endpoint="withdraw", key=key, payload={"amount": amount, "currency": currency})
    return await uow.movements.run(once, Movement(user_id, system_wallet_id, plan))


async def transfer(uow: UnitOfWork, *, user_id: int, key: str, to_wallet_id: int, amount: int, currency: str) -> Answer:
    """Money from the caller's wallet to another user's open wallet of the same currency."""

    def plan(locked: Locked) -> tuple[TransferResult, Booking]:
        own = _own_wallet(locked, user_id, currency)
        recipient = _recipient(locked, own, to_wallet_id, currency)
        if own.available < amount:
            raise InsufficientFunds()
        booking = book(
            kind="transfer",
            source=Party.of(own),
            destination=Party.of(recipient),
            amount=amount,
            currency=currency,
            locked=locked,
            user_id=user_id,
        )
        result = TransferResult(
            wallet_id=own.id, recipient_wallet_id=to_wallet_id, amount=amount, current_balance=booking.snapshots[own.id]
        )
        return result, booking

    payload = {"amount": amount, "currency": currency, "to_account_id": to_wallet_id}
    once = Once(uow, user_id=user_id, endpoint="transfer", key=key, payload=payload)
    return await uow.movements.run(once, Movement(user_id, to_wallet_id, plan))


# --- reads -------------------------------------------------------------------------------


async def history(
    uow: UnitOfWork,
    *,
    user_id: int,
    limit: int,
    offset: int | None = None,
    after: int | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> History:
    """A page of the user's history: by `offset`, or (extension) by keyset, the items older
    than transaction `after`; optionally only one `kind`, or a time range."""
    if after is not None and offset is not None:
        raise OffsetWithAfter()
    since, until = _range(since, until)
    async with transaction(uow.reads, read_only=True) as conn:
        wallet_ids = await repository.user_wallet_ids(conn, user_id)
        rows = await repository.history(
            conn,
            wallet_ids=wallet_ids,
            limit=limit,
            offset=offset or 0,
            after=after,
            kind=kind,
            since=since,
            until=until,
        )
    items = [
        HistoryItem(
            id=txn_id,
            amount=amount,
            currency=currency,
            type=kind,
            date=created_at,
            sender=EXTERNAL_SOURCE if src_kind != USER else src_name,
            receiver=EXTERNAL_DESTINATION if dst_kind != USER else dst_name,
        )
        for txn_id, amount, currency, kind, created_at, src_name, src_kind, dst_name, dst_kind in rows
    ]
    return History(transactions=items, limit=limit, offset=offset or 0)


STATEMENT_DEFAULT_DAYS = 30
STATEMENT_MAX_SPAN = timedelta(days=366)


def _utc(moment: datetime | None, name: str) -> datetime | None:
    """The instant in UTC; one that UTC cannot write (before year 1 or after 9999) is a 422."""
    try:
        return None if moment is None else moment.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidRange(f"`{name}` is out of range (years 1 to 9999 in UTC).") from exc


def _range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    since, until = _utc(since, "from"), _utc(until, "to")
    if since is not None and until is not None and since > until:
        raise InvalidRange("`from` is after `to`.")
    return since, until


async def statement(
    uow: UnitOfWork, *, user_id: int, since: datetime | None, until: datetime | None, max_lines: int
) -> Statement:
    """The open wallet's lines from `since` to `until` (default: the last 30 days), oldest
    first, with the running balance, between the opening and the closing balance.

    Bounded by `max_lines`: a range holding more is refused (422 statement_too_large, the
    detail saying where the first `max_lines` end), never answered truncated, since a
    statement's closing balance must be the balance at `to`."""
    since, until = _range(since, until)
    until = until or utcnow()
    if since is None:
        try:
            since = until - timedelta(days=STATEMENT_DEFAULT_DAYS)
        except OverflowError:  # a `to` in year 1
            since = datetime.min.replace(tzinfo=UTC)
    _range(since, until)
    if until - since > STATEMENT_MAX_SPAN:
        raise InvalidRange("A statement covers at most 366 days.")
    async with transaction(uow.db, read_only=True) as conn:
        wallet = await repository.open_wallet_of(conn, user_id)
        if wallet is None:
            raise WalletNotFound()
        opening = await repository.opening_balance(conn, wallet_id=wallet.id, since=since)
        rows = await repository.statement_lines(
            conn, wallet_id=wallet.id, since=since, until=until, limit=max_lines + 1
        )
    if len(rows) > max_lines:
        last = rows[max_lines - 1].created_at
        # `to` is inclusive: the next statement starts a microsecond later, so no line is in
        # both (a wallet's entries are never two at one time: repository.lock_for_movement).
        resume = (last + timedelta(microseconds=1)).isoformat()
        raise StatementTooLarge(
            f"The range holds more than {max_lines} lines; ask for a narrower one "
            f"(the first {max_lines} end at {last.isoformat()}: the next begin from={resume})."
        )
    lines = [
        StatementLine(
            transaction_id=txn_id,
            date=created_at,
            type=kind,
            counterparty=other_name if other_kind == USER else _OUTSIDE[kind],
            amount=amount if entry_type == CREDIT else -amount,
            balance=snapshot,
        )
        for txn_id, created_at, kind, entry_type, amount, snapshot, other_name, other_kind in rows
    ]
    closing = lines[-1].balance if lines else opening
    if opening + sum(line.amount for line in lines) != closing:  # the ledger's own rule; refuse to answer if not
        raise RuntimeError(f"statement of wallet {wallet.id} does not add up")
    return Statement(
        wallet_id=wallet.id,
        currency=wallet.currency,
        from_=since,
        to=until,
        opening_balance=opening,
        closing_balance=closing,
        lines=lines,
    )


_OUTSIDE = {"deposit": EXTERNAL_SOURCE, "withdrawal": EXTERNAL_DESTINATION, "transfer": "External"}


async def ledger_of(
    uow: UnitOfWork, *, user_id: int, transaction_id: int, show_counterparty: bool = True
) -> list[LedgerEntryRead]:
    """A transaction's entries, for a user whose wallet is part of it: both sides, or with
    `show_counterparty` off only the user's own (the other side's snapshot is the other
    wallet's balance)."""
    async with transaction(uow.reads, read_only=True) as conn:
        wallet_ids = await repository.user_wallet_ids(conn, user_id)
        entries = await repository.ledger_entries(
            conn, transaction_id=transaction_id, visible_to=wallet_ids, own_only=not show_counterparty
        )
    if not entries:
        raise TransactionNotFound()
    return [LedgerEntryRead.model_validate(e._mapping) for e in entries]
