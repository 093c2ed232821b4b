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

# An email's check and claim, in one round trip for all of a message's emails (a batch's),
# each: already sent (-1), claimed for us (-2), or claimed by another worker for this many
# more milliseconds (>= 0). Atomic per email, so no worker can mark one sent between its
# check and its claim. Each claim lasts ARGV[2] ms, renewed after every send of the
# message for the emails still to send (_AFTER). A claim already holding our token is ours:
# a run whose answer was lost, run again.
# KEYS: each email's sent marker and claim, in turn. ARGV: token, claim ms.
_BEGIN = """
local found = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    found[#found + 1] = -1
  elseif redis.call('GET', KEYS[i + 1]) == ARGV[1] then
    found[#found + 1] = -2
  elseif redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    found[#found + 1] = -2
  else
    found[#found + 1] = math.max(redis.call('PTTL', KEYS[i + 1]), 0)
  end
end
return found
"""

# After one email's send (or its failure, or for its claim alone to be released): its sent
# marker written if ARGV[3] is 1, its claim released if still ours, and the claims of the
# emails still to send (KEYS[3] on) renewed for ARGV[4] ms if still ours, so each lasts one
# send from here, not the batch. Safe to run twice.
# KEYS: the email's sent marker and claim, then the claims still held. ARGV: token, sent
# marker seconds, 1 (sent) or 0, claim ms.
_AFTER = """
if ARGV[3] == '1' then redis.call('SET', KEYS[1], 1, 'EX', ARGV[2]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
end
return 1
"""

# How a script Redis does not answer (its connection dropped: a restart, a failover, an
# idle timeout; or a timeout) is tried again: the pauses before each further try
# (SentMarkers._run). Any script once more at once, on a new connection: a claim not
# made is the message's retry's to wait for.
AGAIN_AT_ONCE_S = (0.0,)
# A sent email's marker (SentMarkers.finish, and `settle` making a batch's good) is all
# that keeps the email from going out again (but for Brevo's idempotencyKey): it is tried over about a second more (a
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
    """Each worker thread's claims and sent markers, on its own Redis connection.

    A message's emails are checked and claimed together before the first send (`begin_all`:
    one round trip), each marked sent right after its send by a write nothing waits for
    (`mark_sent`: the marker leaves at once, its answer read with the others at the end; the
    same write renews the claims of the emails still to send, so each claim lasts one send),
    and the answers read once the message is done (`settle`, which writes again what Redis
    may not have taken and releases the claims still held)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, claim_ms: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.claim_ms = claim_ms
        self._begin = client.register_script(_BEGIN)
        self._after = client.register_script(_AFTER)
        self._scripts = ThreadScripts(client, together=(self._begin, self._after))

    def _run(self, script: Any, keys: list[str], args: list[Any], *, pauses: Sequence[float] = AGAIN_AT_ONCE_S) -> Any:
        """A script on this thread's own connection (notifier.scripts): the one place that
        decides how a call Redis does not answer is tried again (`pauses`). The script is
        safe to run twice."""
        return self._scripts.run(script, keys, args, pauses=pauses)

    def begin_all(self, token: str, email_ids: Sequence[str]) -> list[Begun]:
        """Before the first send, in one round trip: each email sent already, claimed for us
        with `token`, or busy for how long."""
        keys = [key for email_id in email_ids for key in _keys(email_id)]
        found = self._run(self._begin, keys, [token, self.claim_ms])
        return [_begun(int(f), token) for f in found]

    def mark_sent(self, token: str, email_id: str, *, still: Sequence[str] = ()) -> None:
        """Right after its send: the email's sent marker and its claim released, and the
        claims of the emails `still` to send renewed, written without waiting for the answer
        (`settle` reads it)."""
        self._after_send(token, email_id, 1, still)

    def release_soon(self, token: str, email_id: str, *, still: Sequence[str] = ()) -> None:
        """After a failed send: the email's claim released (if still ours), not marked sent,
        and the claims `still` held renewed; the answer left to `settle`."""
        self._after_send(token, email_id, 0, still)

    def _after_send(self, token: str, email_id: str, sent: int, still: Sequence[str]) -> None:
        self._scripts.write(self._after, *self._after_call(token, email_id, sent, still))

    def _after_call(self, token: str, email_id: str, sent: int, still: Sequence[str] = ()) -> tuple[list[Any], ...]:
        return [*_keys(email_id), *map(_claim_key, still)], [token, self.ttl_s, sent, self.claim_ms]

    def make_good(self) -> None:
        """Before the next send: the writes of this thread known to have failed (Redis went
        away) made again now, raising if Redis still does not answer, so a batch stops
        rather than sending on with its markers unwritten."""
        if self._scripts.lagging():
            self._replay()

    def _replay(self) -> None:
        calls = self._scripts.answers()
        for n, (script, keys, args) in enumerate(calls):
            try:
                self._run(script, list(keys), list(args), pauses=MARKER_PAUSES_S if args[2] == 1 else AGAIN_AT_ONCE_S)
            except BaseException:
                self._scripts.keep_failed(calls[n:])  # for the settle, or this thread's next message
                raise

    def settle(self, token: str, *, held: Sequence[str]) -> None:
        """Once a message is done: the answers of its writes read, any that Redis did not
        take or failed made again (a sent marker among them tried over about a second:
        MARKER_PAUSES_S), and the claims still `held` (emails not sent: an interruption)
        released."""
        try:
            self._replay()
        finally:
            for email_id in held:  # an interruption's: rare
                self._run(self._after, *self._after_call(token, email_id, 0))

    def begin(self, email_id: str) -> Begun:
        """One email checked and claimed, in one round trip: sent already, claimed for us, or
        busy for how long."""
        return self.begin_all(secrets.token_hex(8), [email_id])[0]

    def finish(self, email_id: str, token: str) -> None:
        """In one round trip: the sent marker, and the claim released (tried over about a
        second when Redis does not answer: MARKER_PAUSES_S)."""
        self._run(self._after, *self._after_call(token, email_id, 1), pauses=MARKER_PAUSES_S)

    def release(self, email_id: str, token: str) -> None:
        """The claim released (if still ours), the email not marked sent."""
        self._run(self._after, *self._after_call(token, email_id, 0))

    def is_sent(self, email_id: str) -> bool:
        return bool(self.redis.exists(SENT_MARKER.format(email_id)))

    def claim(self, email_id: str) -> str | None:
        token = secrets.token_hex(8)
        return token if self.redis.set(_claim_key(email_id), token, nx=True, px=self.claim_ms) else None
