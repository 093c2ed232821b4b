"""Idempotency keys: parsing, request fingerprints, the Redis fast path, and running a
money movement at most once under its key.

Redis holds a lock per (user, endpoint, key), taken with a random token and released only
by its holder (compare-and-delete in Lua), plus the stored response for replays. It is an
optimisation: the database's unique constraint on (user, endpoint, key) is the last word,
so a flushed or dead Redis, or a lock that expires mid-request, can never move money
twice. Every Redis failure degrades to "ask the database".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
from fastapi import Response
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError, OperationalError

from svckit.aiodb import Connection, transaction
from svckit.db import utcnow
from svckit.problems import ProblemError
from svckit.redis import AutoPipeline
from wallet import repository
from wallet.domain import Booking
from wallet.errors import (
    IdempotencyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    WalletBusy,
)
from wallet.metrics import IDEMPOTENCY

if TYPE_CHECKING:
    from wallet.uow import UnitOfWork

log = logging.getLogger("wallet.idempotency")

_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]{1,255}$")
REPLAYED_HEADER = "Idempotent-Replayed"

# Returns the stored response if there is one; else takes the lock (NX) and returns
# "locked"; else "busy". One round trip on the hot path.
_BEGIN = """
local stored = redis.call('GET', KEYS[1])
if stored then return {'stored', stored} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked', ''} end
return {'busy', ''}
"""
# Store the response and release our lock (only if it is still ours).
_FINISH = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def parse_key(idempotency_key: str | None, x_idempotency_key: str | None) -> str:
    if idempotency_key is None and x_idempotency_key is None:
        raise IdempotencyKeyMissing()
    if idempotency_key is not None and x_idempotency_key is not None and idempotency_key != x_idempotency_key:
        raise IdempotencyKeyInvalid("Idempotency-Key and X-Idempotency-Key differ.")
    key = idempotency_key if idempotency_key is not None else x_idempotency_key
    if key is None or not _VISIBLE_ASCII.match(key):
        raise IdempotencyKeyInvalid()
    return key


def fingerprint(payload: dict[str, Any]) -> str:
    """Same meaning, same fingerprint: the validated body, canonically encoded."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """A response as first sent, kept byte for byte for replays."""

    status_code: int
    body: str
    fingerprint: str

    def response(self, *, replayed: bool) -> Response:
        media = "application/json" if self.status_code < 400 else "application/problem+json"
        headers = {REPLAYED_HEADER: "true"} if replayed else None
        return Response(content=self.body, status_code=self.status_code, media_type=media, headers=headers)

    def dumps(self) -> str:
        return json.dumps({"s": self.status_code, "b": self.body, "f": self.fingerprint})

    @classmethod
    def loads(cls, raw: str | bytes) -> Outcome:
        data = json.loads(raw)
        return cls(status_code=int(data["s"]), body=str(data["b"]), fingerprint=str(data["f"]))


LOCKED = "locked"
BUSY = "busy"
UNAVAILABLE = "unavailable"


class IdempotencyCache:
    """The Redis fast path (redis.asyncio): a stored outcome or the key's lock, in one round trip."""

    # After a Redis failure, go straight to the database for a while instead of paying a
    # connection timeout on every request (a minimal circuit breaker).
    PAUSE_AFTER_FAILURE_S = 2.0

    def __init__(self, client: redis.asyncio.Redis, *, ttl_s: int, lock_ttl_ms: int) -> None:
        self.redis = client
        # The movements of one batch finish in the same turn: their answers go in one pipeline.
        self._commands = AutoPipeline(client)
        self._paused_until = 0.0
        self.ttl_s = ttl_s
        self.lock_ttl_ms = lock_ttl_ms
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _keys(scope: str) -> list[str]:
        return [f"idem:resp:{scope}", f"idem:lock:{scope}"]

    async def _eval(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script when this Redis lacks it (restarted, or another
        node), pipelined with the other requests' commands of the same turn (svckit.redis)."""
        try:
            return await self._commands.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await script(keys=keys, args=args)

    async def begin(self, scope: str) -> tuple[str, Outcome | None, str]:
        """(state, stored outcome, lock token): state is stored, locked, busy or unavailable."""
        if time.monotonic() < self._paused_until:
            return UNAVAILABLE, None, ""
        token = secrets.token_hex(16)
        try:
            state, stored = await self._eval(self._begin, self._keys(scope), [token, self.lock_ttl_ms])
        except (redis.RedisError, OSError) as exc:
            log.warning("idempotency cache unavailable, using the database only: %s", type(exc).__name__)
            self._paused_until = time.monotonic() + self.PAUSE_AFTER_FAILURE_S
            return UNAVAILABLE, None, ""
        state = state.decode() if isinstance(state, bytes) else state
        if state == "stored":
            return state, Outcome.loads(stored), ""
        return state, None, token

    async def finish(self, scope: str, token: str, outcome: Outcome) -> None:
        try:
            await self._eval(self._finish, self._keys(scope), [token, outcome.dumps(), self.ttl_s])
        except (redis.RedisError, OSError) as exc:
            log.warning("could not cache idempotent outcome: %s", type(exc).__name__)

    async def release(self, scope: str, token: str) -> None:
        try:
            await self._eval(self._release, self._keys(scope)[1:], [token])
        except (redis.RedisError, OSError) as exc:
            log.warning("could not release idempotency lock: %s", type(exc).__name__)


# --- at most once, in the database ----------------------------------------------------

# Postgres: serialization failure, deadlock; both mean "run the transaction again".
_RETRYABLE_PGCODES = {"40001", "40P01"}
# Postgres: lock_timeout (lock_not_available), statement_timeout (query_canceled), too many
# connections, the server starting or stopping: each a retryable 503, nothing kept.
_TIMEOUT_PGCODES = {"55P03", "57014", "53300", "57P03"}


def _problem_json(refusal: ProblemError) -> str:
    return json.dumps(refusal.body(), ensure_ascii=False, separators=(",", ":"))


def _sqlstate(exc: OperationalError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def timed_out(exc: OperationalError) -> bool:
    """A lock wait past lock_timeout, a statement past statement_timeout, or a server that
    takes no connection now (Postgres; svckit.aiodb gives its own waits the same codes)."""
    return _sqlstate(exc) in _TIMEOUT_PGCODES


def _retryable(exc: OperationalError) -> bool:
    # A dead connection (the server restarted, or dropped us) is retried on a fresh one:
    # whatever the lost attempt did either never committed or committed its idempotency
    # record, which the retry then finds (and knows for its own by the request token).
    if exc.connection_invalidated:
        return True
    return _sqlstate(exc) in _RETRYABLE_PGCODES or "database is locked" in str(exc.orig)


def _busy(endpoint: str, failure: OperationalError) -> WalletBusy:
    # A wallet stayed locked past lock_timeout, a statement ran past statement_timeout, or no
    # pooled connection came free: the wallet or the service is swamped. Waiting again would
    # hold on for another timeout, so answer a retryable 503 at once. Nothing was recorded
    # under the key: the client's retry runs afresh.
    log.warning("%s timed out in the database (%s)", endpoint, _sqlstate(failure))
    return WalletBusy()


@dataclass(frozen=True)
class Answer:
    """What a request under a key is answered: the outcome, first sent or replayed."""

    outcome: Outcome
    replayed: bool

    def response(self) -> Response:
        return self.outcome.response(replayed=self.replayed)


class Once:
    """A money movement at most once per (user, endpoint, key), the same answer byte for byte
    ever after. Iterate it for attempts, and run the movement in each attempt's transaction:

        once = Once(uow, user_id=..., endpoint="transfer", key=key, payload=body)
        async for attempt in once:
            async with attempt as conn:
                ...  # lock, check (raise a ProblemError to refuse), then:
                attempt.booked(result, booking)
        return once.answer

    There is no attempt when Redis or the database already knows the key's outcome (a
    replay), and another one only when the last was lost to a dead connection, a deadlock or
    a busy SQLite: before it runs, the key's record is looked up, since the lost attempt may
    have committed. An attempt commits the booking with the key's record, or a refusal's
    record alone (the movement checks everything before it books anything, so nothing
    moved). If the key's unique constraint fires, another request with this key won: its
    outcome is the answer. Unless the record carries this request's token: then an earlier
    attempt of this very request committed before its connection died (at COMMIT, say), and
    the outcome is this request's first answer. A lock or statement timeout is a retryable
    503 at once (WalletBusy): nothing was recorded, so the client's retry runs afresh.
    """

    def __init__(self, uow: UnitOfWork, *, user_id: int, endpoint: str, key: str, payload: dict[str, Any]) -> None:
        self.uow = uow
        self.user_id, self.endpoint, self.key = user_id, endpoint, key
        self.fingerprint = fingerprint(payload)
        self.scope = f"{user_id}:{endpoint}:{key}"
        self.token = secrets.token_hex(16)  # the same for every attempt of this request
        self.attempts = 0
        self._answer: Answer | None = None
        self._cache_state = ""
        self._lock_id = ""

    @property
    def record_key(self) -> tuple[int, str, str]:
        """The unique key of the record that answers for this key."""
        return self.user_id, self.endpoint, self.key

    @property
    def answer(self) -> Answer:
        if self._answer is None:
            raise RuntimeError("the movement ran no attempt to its end")
        return self._answer

    def __aiter__(self) -> Once:
        return self

    async def __anext__(self) -> Attempt:
        if self._answer is not None:
            raise StopAsyncIteration
        try:
            if self.attempts == 0:
                await self._start()
            else:
                await asyncio.sleep(0.01 * 2 ** (self.attempts - 1))
                # The last attempt may have committed before its connection died: look for
                # the key's record first (no row lock), so a retry never queues behind the
                # wallet's lock, times out and answers "nothing was done" for money that moved.
                await self._answer_from_record(own_is_first=True)
        except BaseException:
            await self.abandon()
            raise
        if self._answer is not None:
            raise StopAsyncIteration
        self.attempts += 1
        return Attempt(self)

    async def _start(self) -> None:
        cache = self.uow.idempotency
        state, stored, self._lock_id = await cache.begin(self.scope)
        self._cache_state = state
        if stored is not None:
            self._replay(stored)
        # Another request holds the lock. The database may know its outcome already (the
        # lock can outlive the cached response only briefly); else tell the client to wait.
        elif state == BUSY and not await self._answer_from_record(own_is_first=False):
            IDEMPOTENCY.labels("in_progress").inc()
            raise IdempotencyInProgress()

    async def _answer_from_record(self, *, own_is_first: bool) -> bool:
        async with transaction(self.uow.db, read_only=True) as conn:
            record = await repository.get_idempotency_record(
                conn, user_id=self.user_id, endpoint=self.endpoint, key=self.key
            )
        if record is None:
            return False
        outcome = Outcome(record.status_code, record.response_body, record.fingerprint)
        await self.done(outcome)
        if not (own_is_first and record.request_token == self.token):
            self._replay(outcome)  # another request's outcome (or a reused key's refusal)
        return True

    def _replay(self, outcome: Outcome) -> None:
        if outcome.fingerprint != self.fingerprint:
            IDEMPOTENCY.labels("reused").inc()
            raise IdempotencyKeyReused()
        IDEMPOTENCY.labels("replay").inc()
        self._answer = Answer(outcome, replayed=True)

    async def done(self, outcome: Outcome) -> None:
        """The key's outcome is known: answer it, and leave it in Redis for replays."""
        self._answer = Answer(outcome, replayed=False)
        if self._cache_state == LOCKED:
            self._cache_state = ""
            await self.uow.idempotency.finish(self.scope, self._lock_id, outcome)

    async def abandon(self) -> None:
        """No outcome (a failure escapes): free the key's lock for the client's retry."""
        if self._cache_state == LOCKED:
            self._cache_state = ""
            await self.uow.idempotency.release(self.scope, self._lock_id)

    async def failed(self, failure: BaseException) -> bool:
        """An attempt failed: True when the loop goes on (the key's record answers, or another
        attempt runs); else the failure, or a timeout's WalletBusy, is raised."""
        if isinstance(failure, IntegrityError):
            if await self._answer_from_record(own_is_first=True):
                return True
            raise failure  # not the key's constraint: a real bug, answered as a 500
        if isinstance(failure, OperationalError):
            if timed_out(failure):
                raise _busy(self.endpoint, failure) from failure
            if self.attempts <= self.uow.retries and _retryable(failure):
                log.warning(
                    "retrying %s after %s (attempt %d)", self.endpoint, type(failure.orig).__name__, self.attempts
                )
                return True
        raise failure

    def outcome(self, result: BaseModel, *, status_code: int = 200) -> Outcome:
        return Outcome(status_code, result.model_dump_json(by_alias=True), self.fingerprint)

    def refused(self, refusal: ProblemError) -> Outcome:
        return Outcome(refusal.status, _problem_json(refusal), self.fingerprint)

    def record(self, outcome: Outcome, booking: Booking | None) -> dict[str, Any]:
        """The key's row, answering with `outcome` (for `booking`, if money moved)."""
        return repository.idempotency_record(
            user_id=self.user_id,
            endpoint=self.endpoint,
            key=self.key,
            fingerprint=self.fingerprint,
            status_code=outcome.status_code,
            response_body=outcome.body,
            transaction_id=booking.transaction_id if booking else None,
            now=booking.now if booking else utcnow(),
            request_token=self.token,
        )


# Rows a movement writes after its booking, in the same transaction (they name the
# booking's transaction row, which must exist first): a capture's hold, a refund's link.
Then = Callable[[Connection], Awaitable[None]]


class Attempt:
    """One run of the movement in one database transaction (see Once)."""

    def __init__(self, once: Once) -> None:
        self.once = once
        self._conn: Connection | None = None
        self._booked: tuple[BaseModel, Booking | None, int, Then | None] | None = None

    def booked(self, result: BaseModel, booking: Booking, *, then: Then | None = None) -> None:
        """The movement's response body and its rows: written with the key's record on exit
        (and `then`, after the booking)."""
        self._booked = result, booking, 200, then

    def answered(self, result: BaseModel, *, status_code: int = 200) -> None:
        """A success that books nothing in the ledger (a hold placed or voided: the attempt
        wrote its rows on the connection already): only the key's record is added on exit."""
        self._booked = result, None, status_code, None

    async def __aenter__(self) -> Connection:
        try:
            self._conn = await self.once.uow.db.connect()
        except BaseException as failure:
            await self.once.abandon()
            if isinstance(failure, OperationalError) and timed_out(failure):
                raise _busy(self.once.endpoint, failure) from failure  # every pooled connection stayed taken
            raise
        return self._conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Settle the attempt; whatever escapes frees the key's Redis lock for the client's retry."""
        try:
            return await self._settle(exc)
        except BaseException:
            await self.once.abandon()
            raise

    async def _settle(self, exc: BaseException | None) -> bool:
        """True when the loop goes on: answered (committed, or the key's record found) or retried."""
        try:
            try:
                outcome = await self._commit(exc)
            finally:
                if self._conn is not None:
                    await self._conn.close()  # rolls back whatever did not commit, frees the locks
        except (IntegrityError, OperationalError) as failure:
            return await self.once.failed(failure)
        await self.once.done(outcome)
        return True

    async def _commit(self, exc: BaseException | None) -> Outcome:
        """Record the outcome under the key (with the booking, if it moved money) and commit."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("attempt not entered")
        once = self.once
        if exc is None:
            if self._booked is None:
                raise RuntimeError(f"{once.endpoint}: the attempt ended without a booking or a refusal")
            result, booking, status_code, then = self._booked
            outcome = once.outcome(result, status_code=status_code)
            if booking is None:
                await repository.add_idempotency_record(conn, once.record(outcome, None))
            else:
                await repository.write_booking(conn, booking, once.record(outcome, booking))
            if then is not None:
                await then(conn)
        elif isinstance(exc, ProblemError):
            outcome = once.refused(exc)
            await repository.add_idempotency_record(conn, once.record(outcome, None))
        else:
            raise exc
        await conn.commit()
        return outcome
