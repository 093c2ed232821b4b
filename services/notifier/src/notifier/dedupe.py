"""Duplicate suppression: a Redis "sent" marker per email id, and a short claim so two
workers never send the same email at once. Brevo's idempotencyKey is the backstop for the
window between Brevo accepting an email and the marker being written."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis

from notifier.scripts import ThreadScripts
from svckit.messages import SENT_MARKER

# One round trip per email, whatever the order: what became of the email done last (its
# sent marker; its claim released if still ours), then the next one checked and claimed:
# already sent (-1), claimed for us (-2), or claimed by another worker for this many more
# milliseconds (>= 0); -3 when there is no next one. Atomic, so no worker can mark an
# email sent between the check and the claim. A claim already holding our token is ours: a
# run whose answer was lost, run again.
# KEYS: the done email's sent marker and claim (if ARGV[4] says one was done), then the
# next one's (if any). ARGV: token, claim ms, sent marker seconds, "sent" / "failed" / "".
_STEP = """
local k = 1
if ARGV[4] ~= '' then
  if ARGV[4] == 'sent' then redis.call('SET', KEYS[1], 1, 'EX', ARGV[3]) end
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
  k = 3
end
if not KEYS[k] then return -3 end
if redis.call('EXISTS', KEYS[k]) == 1 then return -1 end
if redis.call('GET', KEYS[k + 1]) == ARGV[1] then return -2 end
if redis.call('SET', KEYS[k + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -2 end
return math.max(redis.call('PTTL', KEYS[k + 1]), 0)
"""


# How a script Redis does not answer (its connection dropped: a restart, a failover, an
# idle timeout; or a timeout) is tried again: the pauses before each further try
# (SentMarkers._run). Any script once more at once, on a new connection: a claim not
# made is the message's retry's to wait for.
AGAIN_AT_ONCE_S = (0.0,)
# A sent email's marker (SentMarkers.step and finish) is all that keeps the email from going out
# again (but for Brevo's idempotencyKey): it is tried over about a second more (a
# restart, a failover) before the send's retry would go to Brevo again.
MARKER_PAUSES_S = (0.0, 0.2, 0.8)


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
        self._step = client.register_script(_STEP)
        self._scripts = ThreadScripts(client)

    def _run(self, script: Any, keys: list[str], args: list[Any], *, pauses: Sequence[float] = AGAIN_AT_ONCE_S) -> Any:
        """A script on this thread's own connection (notifier.scripts): the one place that
        decides how a call Redis does not answer is tried again (`pauses`). The script is
        safe to run twice."""
        return self._scripts.run(script, keys, args, pauses=pauses)

    def step(self, token: str, *, done: str | None = None, sent: bool = False, then: str | None = None) -> Begun:
        """In one round trip: the email `done` marked sent (if `sent`) and its claim released,
        then the email `then` checked and claimed with `token` (what the Begun says; a
        Begun with neither `sent` nor `token` when there is no `then`). A step that marks
        an email sent is tried over about a second when Redis does not answer
        (MARKER_PAUSES_S), any other once more at once (_run)."""
        keys = [*(_keys(done) if done is not None else ()), *(_keys(then) if then is not None else ())]
        outcome = ("sent" if sent else "failed") if done is not None else ""
        pauses = MARKER_PAUSES_S if done is not None and sent else AGAIN_AT_ONCE_S
        found = int(self._run(self._step, keys, [token, self.claim_ms, self.ttl_s, outcome], pauses=pauses))
        return _begun(found, token) if then is not None else Begun(sent=False, token=None, busy_ms=0)

    def begin(self, email_id: str) -> Begun:
        """Before sending, in one round trip: sent already, claimed for us, or busy for how long."""
        return self.step(secrets.token_hex(8), then=email_id)

    def finish(self, email_id: str, token: str) -> None:
        """After sending, in one round trip: the sent marker, and the claim released (tried
        over about a second when Redis does not answer: MARKER_PAUSES_S)."""
        self.step(token, done=email_id, sent=True)

    def release(self, email_id: str, token: str) -> None:
        """The claim released (if still ours), the email not marked sent."""
        self.step(token, done=email_id)

    def is_sent(self, email_id: str) -> bool:
        return bool(self.redis.exists(SENT_MARKER.format(email_id)))

    def claim(self, email_id: str) -> str | None:
        token = secrets.token_hex(8)
        return token if self.redis.set(_claim_key(email_id), token, nx=True, px=self.claim_ms) else None
