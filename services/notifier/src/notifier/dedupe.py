"""Duplicate suppression: a Redis "sent" marker per email id, and a short claim so two
workers never send the same email at once. Brevo's idempotencyKey is the backstop for the
window between Brevo accepting an email and the marker being written."""

from __future__ import annotations

import secrets
import threading
from typing import Any, NamedTuple

import redis

from svckit.messages import SENT_MARKER

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# One round trip before sending one email or a batch (KEYS: each email's sent marker and
# claim, in pairs): for each, already sent (-1), claimed for us (-2), or claimed by another
# worker for this many more milliseconds (>= 0). Atomic, so no worker can mark an email
# sent between the check and the claim. A claim already holding our token is ours: a run
# whose answer was lost, run again.
_BEGIN = """
local found = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then found[#found + 1] = -1
  elseif redis.call('GET', KEYS[i + 1]) == ARGV[1] then found[#found + 1] = -2
  elseif redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then found[#found + 1] = -2
  else found[#found + 1] = math.max(redis.call('PTTL', KEYS[i + 1]), 0) end
end
return found
"""
# One round trip after sending (the same pairs): each sent marker, then its claim released
# (if still ours).
_FINISH = """
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i], 1, 'EX', ARGV[2])
  if redis.call('GET', KEYS[i + 1]) == ARGV[1] then redis.call('DEL', KEYS[i + 1]) end
end
return 1
"""


class Begun(NamedTuple):
    """What `SentMarkers.begin` found: sent already, or ours to send (`token`), or another
    worker's for `busy_ms` more milliseconds."""

    sent: bool
    token: str | None
    busy_ms: int


def _begun(found: int, token: str) -> Begun:
    if found == -1:
        return Begun(sent=True, token=None, busy_ms=0)
    if found == -2:
        return Begun(sent=False, token=token, busy_ms=0)
    return Begun(sent=False, token=None, busy_ms=found)


def _claim_key(email_id: str) -> str:
    return f"notifier:sending:{email_id}"


def _keys(email_id: str) -> tuple[str, str]:
    return SENT_MARKER.format(email_id), _claim_key(email_id)


class SentMarkers:
    def __init__(self, client: redis.Redis, *, ttl_s: int, claim_ms: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.claim_ms = claim_ms
        self._release = client.register_script(_RELEASE)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._local = threading.local()

    def _connection(self) -> Any:
        """This thread's connection, taken from the shared pool once and kept: a worker
        thread's two scripts per email skip the pool's take and give back, and the client's
        command layers (retries, deprecation checks, observability hooks: a quarter of a
        call's CPU here) by writing EVALSHA on it and reading the answer."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.redis.connection_pool.get_connection()
        return conn

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script on this thread's connection. Once more on it if Redis dropped it (a
        restart, a failover, an idle timeout: it reconnects on the next write), and once
        more if Redis lacks the script (restarted or flushed: a restart does both). Both
        scripts are safe to run twice. Anything else that interrupts a call (a time limit
        raised into the thread) drops the connection: an answer left unread on it would
        be read as the next script's."""
        reconnected = loaded = False
        while True:
            conn = self._connection()
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                if loaded:
                    raise
                loaded = True
                self.redis.script_load(script.script)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()  # whatever it was in the middle of is gone with it
                if reconnected:
                    raise
                reconnected = True
            except BaseException:
                conn.disconnect()
                raise

    def begin(self, email_id: str) -> Begun:
        """Before sending, in one round trip: is_sent, then claim, then claimed_for_ms."""
        return self.begin_many([email_id])[0]

    def begin_many(self, email_ids: list[str]) -> list[Begun]:
        """`begin` for several emails in one round trip, all claimed with one token and for
        as long as sending them one after another may take."""
        token = secrets.token_hex(8)
        keys = [key for email_id in email_ids for key in _keys(email_id)]
        found = self._run(self._begin, keys, [token, self.claim_ms * len(email_ids)])
        return [_begun(int(f), token) for f in found]

    def finish(self, email_id: str, token: str) -> None:
        """After sending, in one round trip: the sent marker, and the claim released."""
        self.finish_many([email_id], token)

    def finish_many(self, email_ids: list[str], token: str) -> None:
        """`finish` for several emails claimed with one token, in one round trip."""
        if email_ids:
            keys = [key for email_id in email_ids for key in _keys(email_id)]
            self._run(self._finish, keys, [token, self.ttl_s])

    def is_sent(self, email_id: str) -> bool:
        return bool(self.redis.exists(SENT_MARKER.format(email_id)))

    def claim(self, email_id: str) -> str | None:
        token = secrets.token_hex(8)
        return token if self.redis.set(_claim_key(email_id), token, nx=True, px=self.claim_ms) else None

    def claimed_for_ms(self, email_id: str) -> int:
        """How long another worker's claim on this email still lasts (0 if none)."""
        return max(int(self.redis.pttl(_claim_key(email_id))), 0)  # type: ignore[arg-type]

    def mark_sent(self, email_id: str, token: str) -> None:
        self.finish(email_id, token)

    def release(self, email_id: str, token: str) -> None:
        self._release(keys=[_claim_key(email_id)], args=[token])
