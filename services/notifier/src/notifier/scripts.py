"""Redis scripts run on the calling thread's own connection: the notifier's workers are
threads, and each makes a few script calls per email (its sent marker and claim, and
Dramatiq's fetches and acknowledgements), some written without waiting for the answer
(`ThreadScripts.write`, read later by `answers`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis

# Every ThreadScripts of this process: a forked child takes connections of its own.
_ALL: weakref.WeakSet[ThreadScripts] = weakref.WeakSet()


class _Held:
    """A thread's connection, back in its pool once the thread is gone (its locals freed)."""

    def __init__(self, pool: Any) -> None:
        self.conn = pool.get_connection()
        weakref.finalize(self, pool.release, self.conn)


class ThreadScripts:
    """A thread's scripts on a connection of its own, taken from the client's pool at its
    first call and given back when the thread ends: not redis-py's take and give back of a
    pooled connection and its command layers (retries, deprecation checks, observability
    hooks) around every call, more than half of a call's CPU here.

    Before each call, a connection with something to read (Redis closed it, or an answer
    left unread) is replaced, as the pool does before it hands one out, so a restarted
    Redis costs no failed call. When Redis lacks the script (restarted or flushed), it is
    loaded and the call made once more. When Redis does not answer, the connection is
    dropped and the call made again after each of `pauses` in turn (none: raised at once).
    Anything else that interrupts a call (a time limit raised into the thread) drops the
    connection: an answer left unread on it would be read as the next call's."""

    def __init__(self, client: redis.Redis, *, together: Sequence[Any] = ()) -> None:
        self.client = client
        # Scripts loaded together whenever Redis lacks one of them: a script only ever
        # written (`write`) is then in place before its first write, not after it.
        self.together = tuple(together)
        self._local = threading.local()
        _ALL.add(self)

    def _load(self, script: Any) -> None:
        for each in {id(s): s for s in (script, *self.together)}.values():
            each.sha = self.client.script_load(each.script)

    def lagging(self) -> bool:
        """Whether a write of this thread is known to have failed, not yet made good."""
        return bool(getattr(self._local, "failed", None))

    def _connection(self) -> Any:
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _Held(self.client.connection_pool)
            return held.conn
        conn = held.conn
        if conn._sock is None:  # dropped after a failure: the next write connects afresh
            return conn
        if getattr(self._local, "unread", None):  # the answers of `write`s: not stale data
            return conn
        try:
            if conn.can_read():
                raise redis.ConnectionError("Connection has data")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            conn.disconnect()
        return conn

    def write(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """The call written and its answer left unread, for `answers` (or the next `run`) to
        read: a call nothing waits for, in the same order on the wire as the calls around
        it. The call is kept until its answer is read, so one Redis did not take, or that
        failed, can be made again (`answers`)."""
        conn = self._connection()
        # Counted before the write: an interruption after it leaves it accounted for.
        self._local.__dict__.setdefault("unread", []).append((script, tuple(keys), tuple(args)))
        try:
            # No health check: its PING would read an answer of an earlier write as its own.
            conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args, check_health=False)
        except BaseException as exc:
            self._drop(conn)
            if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise

    def answers(self) -> list[tuple[Any, tuple[Any, ...], tuple[Any, ...]]]:
        """Every answer of this thread's `write`s since the last call read: the calls whose
        answer did not come (their connection dropped on the way) or was an error (a script
        Redis lacked after a restart or a flush: loaded here for the next write), for the
        caller to make again with `run`. None when all went through."""
        self._read_unread()
        failed, self._local.failed = getattr(self._local, "failed", []), []
        return failed

    def keep_failed(self, calls: Sequence[tuple[Any, tuple[Any, ...], tuple[Any, ...]]]) -> None:
        """Calls taken from `answers` and not made good after all: kept for the next `answers`."""
        self._local.__dict__.setdefault("failed", [])[:0] = calls

    def _drop(self, conn: Any) -> None:
        """The connection closed: the answers not yet read are gone with it, their calls failed."""
        conn.disconnect()
        self._local.__dict__.setdefault("failed", []).extend(getattr(self._local, "unread", ()))
        self._local.unread = []

    def _read_unread(self) -> None:
        unread = getattr(self._local, "unread", None)
        if not unread:
            return
        conn = self._local.held.conn
        failed = self._local.__dict__.setdefault("failed", [])
        loaded = False
        while unread:
            try:
                conn.read_response()
            except redis.exceptions.NoScriptError:
                failed.append(unread[0])
                if not loaded:
                    loaded = True
                    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):  # else its `run` loads it
                        self._load(unread[0][0])
            except redis.exceptions.ResponseError:
                failed.append(unread[0])
            except BaseException as exc:
                self._drop(conn)
                if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                    raise
                return
            unread.pop(0)

    def run(self, script: Any, keys: Sequence[Any], args: Sequence[Any], *, pauses: Sequence[float] = ()) -> Any:
        self._read_unread()  # first the answers of what was written before (`answers` keeps the failed)
        waits = iter(pauses)
        loaded = False
        while True:
            conn = self._connection()
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                if loaded:
                    raise
                loaded = True
                self._load(script)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()  # whatever it was in the middle of is gone with it
                pause = next(waits, None)
                if pause is None:
                    raise
                if pause:
                    time.sleep(pause)
            except BaseException:
                conn.disconnect()
                raise


def _forget_all() -> None:
    for scripts in list(_ALL):
        scripts._local = threading.local()


os.register_at_fork(after_in_child=_forget_all)
