"""Idempotency keys: parsing, request fingerprints, the Redis fast path, and running a
money movement at most once under its key.

Redis holds a lock per (user, endpoint, key), taken with a random token and released only
by its holder (compare-and-delete in Lua), plus the stored response for replays. It is an
optimisation: the database's unique constraint on (user, endpoint, key) is the last word,
so a flushed or dead Redis, or a lock that expires mid-request, can never move money
twice. Every Redis failure degrades to "ask the database".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import Response
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from svckit.db import utcnow
from svckit.problems import ProblemError
from wallet import repository
from wallet.domain import Booking
from wallet.errors import (
    IdempotencyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    WalletBusy,
)
from wallet.metrics import IDEMPOTENCY, MONEY_MOVED, MOVEMENTS

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

    def replay_for(self, request_fingerprint: str) -> Response:
        if request_fingerprint != self.fingerprint:
            raise IdempotencyKeyReused()
        return self.response(replayed=True)

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
    # After a Redis failure, go straight to the database for a while instead of paying a
    # connection timeout on every request (a minimal circuit breaker).
    PAUSE_AFTER_FAILURE_S = 2.0

    def __init__(self, client: redis.Redis, *, ttl_s: int, lock_ttl_ms: int) -> None:
        self.redis = client
        self._paused_until = 0.0
        self.ttl_s = ttl_s
        self.lock_ttl_ms = lock_ttl_ms
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _keys(scope: str) -> list[str]:
        return [f"idem:resp:{scope}", f"idem:lock:{scope}"]

    def begin(self, scope: str) -> tuple[str, Outcome | None, str]:
        """(state, stored outcome, lock token): state is stored, locked, busy or unavailable."""
        if time.monotonic() < self._paused_until:
            return UNAVAILABLE, None, ""
        token = secrets.token_hex(16)
        try:
            state, stored = self._begin(keys=self._keys(scope), args=[token, self.lock_ttl_ms])
        except redis.RedisError as exc:
            log.warning("idempotency cache unavailable, using the database only: %s", type(exc).__name__)
            self._paused_until = time.monotonic() + self.PAUSE_AFTER_FAILURE_S
            return UNAVAILABLE, None, ""
        state = state.decode() if isinstance(state, bytes) else state
        if state == "stored":
            return state, Outcome.loads(stored), ""
        return state, None, token

    def finish(self, scope: str, token: str, outcome: Outcome) -> None:
        try:
            self._finish(keys=self._keys(scope), args=[token, outcome.dumps(), self.ttl_s])
        except redis.RedisError as exc:
            log.warning("could not cache idempotent outcome: %s", type(exc).__name__)

    def release(self, scope: str, token: str) -> None:
        try:
            self._release(keys=self._keys(scope)[1:], args=[token])
        except redis.RedisError as exc:
            log.warning("could not release idempotency lock: %s", type(exc).__name__)


# --- at most once, in the database ----------------------------------------------------

# A movement: locks and checks in the caller's transaction, and returns (response body, the
# booking to write); the booking is written together with the idempotency record. Its time
# is the booking's, read once the wallets were locked (see repository.lock_for_movement).
Operation = Callable[[Session], tuple[BaseModel, Booking]]
# Postgres: serialization failure, deadlock; both mean "run the transaction again".
_RETRYABLE_PGCODES = {"40001", "40P01"}
# Postgres: lock_timeout (lock_not_available), statement_timeout (query_canceled).
_TIMEOUT_PGCODES = {"55P03", "57014"}


def _problem_json(refusal: ProblemError) -> str:
    return json.dumps(refusal.body(), ensure_ascii=False, separators=(",", ":"))


def _sqlstate(exc: OperationalError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def timed_out(exc: OperationalError) -> bool:
    """A lock wait past lock_timeout, or a statement past statement_timeout (Postgres)."""
    return _sqlstate(exc) in _TIMEOUT_PGCODES


def _retryable(exc: OperationalError) -> bool:
    # A dead connection (the server restarted, or dropped us) is retried on a fresh one:
    # whatever the lost attempt did either never committed or committed its idempotency
    # record, which the retry then finds (and knows for its own by the request token).
    if exc.connection_invalidated:
        return True
    return _sqlstate(exc) in _RETRYABLE_PGCODES or "database is locked" in str(exc.orig)


def _execute(
    session: Session, *, user_id: int, endpoint: str, key: str, request_fp: str, operation: Operation, retries: int
) -> tuple[Outcome, bool]:
    """Run the operation and record its outcome under the key, in one database transaction.

    Returns (outcome, replayed). A business refusal is recorded too (nothing moved). If the
    key's unique constraint fires, another request with this key won: its outcome is the
    answer, and everything this attempt did is rolled back. Unless the record carries this
    request's token: then an earlier attempt of this very request committed before its
    connection died (at COMMIT, say), and the outcome is this request's first answer.
    """
    request_token = secrets.token_hex(16)  # the same for every attempt of this request
    for attempt in range(retries + 1):
        try:
            if attempt:
                # The last attempt may have committed before its connection died: look for
                # the key's record first (no row lock), so a retry never queues behind the
                # wallet's lock, times out and answers "nothing was done" for money that moved.
                with session.begin():
                    found = repository.get_idempotency_record(session, user_id=user_id, endpoint=endpoint, key=key)
                if found is not None:
                    outcome = Outcome(found.status_code, found.response_body, found.fingerprint)
                    return outcome, found.request_token != request_token
            with session.begin():
                booking: Booking | None
                try:
                    result, booking = operation(session)
                    outcome = Outcome(200, result.model_dump_json(by_alias=True), request_fp)
                except ProblemError as refusal:
                    # Operations check everything before they book anything, so nothing moved.
                    outcome, booking = Outcome(refusal.status, _problem_json(refusal), request_fp), None
                record = repository.idempotency_record(
                    user_id=user_id,
                    endpoint=endpoint,
                    key=key,
                    fingerprint=request_fp,
                    status_code=outcome.status_code,
                    response_body=outcome.body,
                    transaction_id=booking.transaction_id if booking else None,
                    now=booking.now if booking else utcnow(),
                    request_token=request_token,
                )
                if booking is None:
                    repository.add_idempotency_record(session, record)
                else:
                    repository.write_booking(session, booking, record)
            return outcome, False
        except IntegrityError:
            with session.begin():
                record = repository.get_idempotency_record(session, user_id=user_id, endpoint=endpoint, key=key)
            if record is None:
                raise  # not the key's constraint: a real bug, answered as a 500
            outcome = Outcome(record.status_code, record.response_body, record.fingerprint)
            return outcome, record.request_token != request_token
        except OperationalError as exc:
            if timed_out(exc):
                # A wallet stayed locked past lock_timeout (or a statement ran past
                # statement_timeout): its holder is stuck or the wallet is swamped. Waiting
                # again here would hold one of the few worker threads for another timeout,
                # so answer a retryable 503 at once. The transaction rolled back and recorded
                # nothing under the key, so the client's retry with the same key runs afresh.
                log.warning("%s timed out in the database (%s)", endpoint, _sqlstate(exc))
                MOVEMENTS.labels(_kind(endpoint), WalletBusy.code).inc()
                raise WalletBusy() from exc
            if attempt == retries or not _retryable(exc):
                raise
            log.warning("retrying %s after %s (attempt %d)", endpoint, type(exc.orig).__name__, attempt + 1)
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


def run_idempotent(
    session: Session,
    *,
    cache: IdempotencyCache,
    user_id: int,
    endpoint: str,
    key: str,
    payload: dict[str, object],
    operation: Operation,
    retries: int,
) -> Response:
    """At most once per (user, endpoint, key); the same answer, byte for byte, ever after."""
    request_fp = fingerprint(payload)
    scope = f"{user_id}:{endpoint}:{key}"
    state, stored, token = cache.begin(scope)
    if stored is not None:
        return _replay(stored, request_fp)
    if state == BUSY:
        # Another request holds the lock. The database may know its outcome already
        # (the lock can outlive the cached response only briefly); else tell the client to wait.
        with session.begin():
            record = repository.get_idempotency_record(session, user_id=user_id, endpoint=endpoint, key=key)
        if record is None:
            IDEMPOTENCY.labels("in_progress").inc()
            raise IdempotencyInProgress()
        return _replay(Outcome(record.status_code, record.response_body, record.fingerprint), request_fp)
    try:
        outcome, replayed = _execute(
            session,
            user_id=user_id,
            endpoint=endpoint,
            key=key,
            request_fp=request_fp,
            operation=operation,
            retries=retries,
        )
    except BaseException:
        if state == LOCKED:
            cache.release(scope, token)
        raise
    if state == LOCKED:
        cache.finish(scope, token, outcome)
    if replayed:
        return _replay(outcome, request_fp)
    _count(endpoint, payload, outcome)
    return outcome.response(replayed=False)


def _replay(outcome: Outcome, request_fp: str) -> Response:
    try:
        response = outcome.replay_for(request_fp)
    except IdempotencyKeyReused:
        IDEMPOTENCY.labels("reused").inc()
        raise
    IDEMPOTENCY.labels("replay").inc()
    return response


def _kind(endpoint: str) -> str:
    return {"withdraw": "withdrawal"}.get(endpoint, endpoint)


def _count(endpoint: str, payload: dict[str, object], outcome: Outcome) -> None:
    kind = _kind(endpoint)
    if outcome.status_code == 200:
        MOVEMENTS.labels(kind, "ok").inc()
        MONEY_MOVED.labels(kind, str(payload["currency"])).inc(int(payload["amount"]))  # type: ignore[call-overload]
    else:
        MOVEMENTS.labels(kind, json.loads(outcome.body).get("code", "refused")).inc()
