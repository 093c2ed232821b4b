"""What an email costs the notifier, asserted against the real Redis and Brevo stand-in:
Redis round trips per message, keep-alive connections, no auth lookup when carried."""

from __future__ import annotations

import gc
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from notifier import actors, scripts
from notifier.brevo import BrevoTransport, Email, FolderTransport
from notifier.dedupe import SentMarkers
from svckit.messages import SENT_MARKER
from svckit.redis import redis_client

API_KEY = "unit-brevo-key"  # conftest.py starts the stand-in with it


class CountingConnection(redis.Connection):
    """A real connection that counts what it writes: one command or pipeline is one round
    trip (counted where it meets the socket, whatever layer of the client sent it)."""

    round_trips = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).round_trips += 1
        super().send_packed_command(command, check_health)


@pytest.fixture
def counted(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> type[CountingConnection]:
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection))
    markers = SentMarkers(client, ttl_s=60, claim_ms=2000)
    transport = FolderTransport(str(tmp_path), sender_email="s@example.com", sender_name="S")
    # auth at a port nobody listens on: any lookup would fail the send
    ctx = actors.Context(transport=transport, markers=markers, auth=httpx.Client(base_url="http://127.0.0.1:9"))
    monkeypatch.setattr(actors, "context", lambda: ctx)
    CountingConnection.round_trips = 0
    return CountingConnection


def welcome(**extra: Any) -> dict[str, Any]:
    return {"email_id": uuid.uuid4().hex, "user_id": 7, **extra}


RECIPIENT = {"email": "jane@example.com", "first_name": "Jane", "last_name": "Doe"}


def test_a_message_costs_two_redis_round_trips_and_a_redelivery_one(
    counted: type[CountingConnection], redis_url: str
) -> None:
    actors.send_welcome.fn(welcome(recipient=RECIPIENT))  # the first loads the scripts (once per Redis)
    counted.round_trips = 0
    message = welcome(recipient=RECIPIENT)
    actors.send_welcome.fn(message)
    assert counted.round_trips == 2  # check and claim; then the sent marker and the release
    assert redis_client(redis_url).exists(SENT_MARKER.format(message["email_id"]))
    assert not redis_client(redis_url).exists(f"notifier:sending:{message['email_id']}")
    actors.send_welcome.fn(message)  # redelivered: dropped after one
    assert counted.round_trips == 3


def test_a_message_carrying_its_recipient_is_sent_without_asking_auth(counted: type[CountingConnection]) -> None:
    sent: list[Email] = []
    ctx = actors.context()
    ctx.transport.send = lambda email: sent.append(email) or "ok"  # type: ignore[method-assign]
    actors.send_welcome.fn(welcome(recipient=RECIPIENT))  # auth is unreachable: a lookup would raise
    [email] = sent
    assert (email.to_email, email.to_name) == ("jane@example.com", "Jane Doe")


def test_a_message_of_the_old_shape_is_looked_up(
    counted: type[CountingConnection], monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[int] = []

    def lookup(user_id: int) -> dict[str, Any]:
        looked_up.append(user_id)
        return RECIPIENT

    monkeypatch.setattr(actors, "recipient", lookup)
    actors.send_welcome.fn(welcome())  # queued before the deploy: no recipient field
    assert looked_up == [7]


def email(email_id: str) -> Email:
    return Email(email_id=email_id, to_email="j@example.com", to_name="J", subject="s", html="h", text="t")


def test_the_brevo_transport_keeps_its_connections_alive_across_emails_and_threads(
    brevo_url: str, stub: httpx.Client
) -> None:
    transport = BrevoTransport(
        base_url=brevo_url, api_key=API_KEY, sender_email="s@example.com", sender_name="S", timeout_s=5
    )

    def send_ten() -> None:
        for _ in range(10):
            transport.send(email(uuid.uuid4().hex))

    threads = [threading.Thread(target=send_ten) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = stub.get("/_stub/received").json()
    assert state["calls"] == 40
    assert transport.connections.opened <= 4  # at most one per thread, not one per email
    assert state["connections"] <= 4 + 1  # the stub saw the same (plus this test's own client)
    transport.close()


def test_each_worker_thread_keeps_one_redis_connection_for_the_markers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sent markers' scripts go over the calling thread's own connection (taken from the
    pool once), not a take and give back per call: 3 threads, 20 emails each, 3 takes."""
    client = redis_client(redis_url)
    markers = SentMarkers(client, ttl_s=60, claim_ms=2000)
    pool = client.connection_pool
    takes = [0]
    original = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        takes[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counted)
    sent: list[str] = []

    def emails() -> None:
        for _ in range(20):
            email_id = uuid.uuid4().hex
            begun = markers.begin(email_id)
            assert begun.token is not None
            markers.finish(email_id, begun.token)
            sent.append(email_id)

    threads = [threading.Thread(target=emails) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert takes[0] == 3  # one per thread, not 120
    monkeypatch.undo()
    assert len(sent) == 60
    assert all(markers.is_sent(e) for e in sent)


def test_a_thread_connection_redis_dropped_is_replaced_and_the_marker_still_written(redis_url: str) -> None:
    """A restart, failover or idle timeout closes the thread's held connection: the next
    script runs again on a fresh one, so an email Brevo accepted is still marked sent."""
    client = redis_client(redis_url)
    markers = SentMarkers(client, ttl_s=60, claim_ms=2000)
    first = uuid.uuid4().hex
    begun = markers.begin(first)
    assert begun.token is not None
    admin = redis.Redis.from_url(redis_url)
    assert int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")) >= 1
    markers.finish(first, begun.token)  # over a dead connection: replaced, not raised
    assert admin.exists(SENT_MARKER.format(first)) == 1
    assert markers.begin(first).sent
    admin.close()


def test_a_script_redis_does_not_answer_is_tried_once_more_and_a_sent_marker_over_about_a_second(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One retry policy (SentMarkers._run): any script once more at once on a new
    connection; a sent email's marker (finish, or settle making a batch's good) over about
    a second more, then it gives up."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    pauses: list[float] = []
    monkeypatch.setattr(scripts.time, "sleep", pauses.append)
    conn = markers._scripts._connection()
    real = conn.send_command
    failures = [0]

    def away(*args: Any, **kwargs: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise redis.ConnectionError("Redis is restarting")
        real(*args, **kwargs)

    monkeypatch.setattr(conn, "send_command", away)
    email_id = uuid.uuid4().hex
    failures[0] = 1
    begun = markers.begin(email_id)  # one failure: claimed on the new connection
    assert begun.token is not None
    failures[0] = 2
    with pytest.raises(redis.ConnectionError):
        markers.begin(uuid.uuid4().hex)  # a claim is not waited for: the message's retry is
    assert pauses == []
    failures[0] = 3
    markers.finish(email_id, begun.token)  # three failures, then written
    assert markers.is_sent(email_id)
    assert not markers.redis.exists(f"notifier:sending:{email_id}")
    assert pauses == [0.2, 0.8]
    failures[0] = 4
    with pytest.raises(redis.ConnectionError):
        markers.finish(uuid.uuid4().hex, "tok")
    # A batch's marker is written without waiting (mark_sent); one Redis did not take is
    # written again when the message is done (settle), over the same second of tries.
    pauses.clear()
    second = uuid.uuid4().hex
    [begun] = markers.begin_all("tok2", [second])
    assert begun.token == "tok2"
    failures[0] = 4
    markers.mark_sent("tok2", second)  # not taken
    assert not markers.is_sent(second)
    markers.settle("tok2", held=[])
    assert markers.is_sent(second)
    assert not markers.redis.exists(f"notifier:sending:{second}")
    assert pauses == [0.2, 0.8]


def test_writes_a_replay_could_not_make_good_are_kept_for_the_next_try(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis still away when the batch stops (make_good raises): the failed writes, the
    one being replayed and those after it, are made good by the settle once it answers."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    monkeypatch.setattr(scripts.time, "sleep", lambda _: None)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    markers.begin_all("tok", [first, second])
    conn = markers._scripts._connection()
    real = conn.send_command
    away = [True]

    def maybe(*args: Any, **kwargs: Any) -> None:
        if away[0]:
            raise redis.ConnectionError("Redis is away")
        real(*args, **kwargs)

    monkeypatch.setattr(conn, "send_command", maybe)
    markers.mark_sent("tok", first, still=[second])
    markers.mark_sent("tok", second)
    with pytest.raises(redis.ConnectionError):
        markers.make_good()
    away[0] = False
    markers.settle("tok", held=[])
    assert markers.is_sent(first)
    assert markers.is_sent(second)


def test_a_redis_that_lost_the_scripts_gets_them_again(redis_url: str) -> None:
    """A restarted or flushed Redis has no scripts: the thread's connection loads them
    and runs the script once more, so the claim and the marker still happen."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    email_id = uuid.uuid4().hex
    admin = redis.Redis.from_url(redis_url)
    admin.script_flush()
    begun = markers.begin(email_id)
    assert begun.token is not None
    admin.script_flush()
    markers.finish(email_id, begun.token)
    assert admin.exists(SENT_MARKER.format(email_id)) == 1
    assert not admin.exists(f"notifier:sending:{email_id}")
    admin.close()


def test_a_redis_restart_drops_the_connection_and_the_scripts_and_the_marker_is_still_written(redis_url: str) -> None:
    """A Redis 7 restart does both at once: the held connection is dead and the scripts are
    gone. The thread reconnects and loads the script, each once, and the marker is written."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    admin = redis.Redis.from_url(redis_url)

    def restart() -> None:
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        admin.script_flush()

    email_id = uuid.uuid4().hex
    begun = markers.begin(email_id)
    assert begun.token is not None
    restart()
    markers.finish(email_id, begun.token)
    assert admin.exists(SENT_MARKER.format(email_id)) == 1
    assert not admin.exists(f"notifier:sending:{email_id}")
    restart()
    assert markers.begin(uuid.uuid4().hex).token is not None
    admin.close()


def test_a_begin_run_again_with_its_own_token_finds_the_claim_its_own(redis_url: str) -> None:
    """BEGIN ran but its answer was lost (a stall past the socket timeout): run again with
    the same token it is still ours, not another worker's for the claim's whole life."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=60_000)
    keys = [SENT_MARKER.format("e-again"), "notifier:sending:e-again"]
    assert markers._run(markers._begin, keys, ["tok", 60_000, 0]) == [-2]
    assert markers._run(markers._begin, keys, ["tok", 60_000, 0]) == [-2]  # ours still
    [busy] = markers._run(markers._begin, keys, ["other", 60_000, 0])  # another's: busy
    assert busy > 0


def test_markers_written_over_a_connection_redis_closed_are_written_again_when_the_message_is_done(
    redis_url: str,
) -> None:
    """mark_sent does not wait for its answer: when the connection was gone (a restart, a
    failover), settle finds the answers missing and marks the sent emails again."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    emails = [uuid.uuid4().hex for _ in range(3)]
    assert all(b.token == "tok" for b in markers.begin_all("tok", emails))
    admin = redis.Redis.from_url(redis_url)
    assert int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")) >= 1
    for email_id in emails:
        markers.mark_sent("tok", email_id)
    markers.settle("tok", held=[])
    assert all(admin.exists(SENT_MARKER.format(e)) for e in emails)
    assert not any(admin.exists(f"notifier:sending:{e}") for e in emails)
    assert markers.begin(uuid.uuid4().hex).token is not None  # the thread's connection works again
    admin.close()


def test_markers_written_after_redis_lost_the_scripts_are_written_again_when_the_message_is_done(
    redis_url: str,
) -> None:
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    emails = [uuid.uuid4().hex for _ in range(2)]
    markers.begin_all("tok", emails)
    admin = redis.Redis.from_url(redis_url)
    admin.script_flush()
    for email_id in emails:
        markers.mark_sent("tok", email_id)  # answered NOSCRIPT
    markers.settle("tok", held=[])
    assert all(admin.exists(SENT_MARKER.format(e)) for e in emails)
    assert not any(admin.exists(f"notifier:sending:{e}") for e in emails)
    admin.close()


def test_a_write_answered_noscript_loads_every_script_of_its_set_when_its_answer_is_read(redis_url: str) -> None:
    """The first write after a restart or a flush is answered NOSCRIPT: reading that answer
    loads the whole set, so the replay and the next message's claims find them in place."""
    client = redis_client(redis_url)
    first, second = client.register_script("return 1"), client.register_script("return 2")
    calls = scripts.ThreadScripts(client, together=(first, second))
    assert calls.run(first, [], []) == 1
    client.script_flush()
    calls.write(first, [], [])  # answered NOSCRIPT, unread
    failed = calls.answers()
    assert [script for script, _, _ in failed] == [first]  # for the caller to make again
    assert client.script_exists(first.sha, second.sha) == [True, True]


def test_a_call_made_while_answers_are_unread_reads_them_first_and_never_takes_one_for_its_own(
    redis_url: str,
) -> None:
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    markers.begin_all("tok", [first, second])
    markers.mark_sent("tok", first, still=[second])  # its answer unread
    assert markers.begin(first).sent  # this call's own answer, not the write's
    markers.release_soon("tok", second)
    markers.settle("tok", held=[])
    assert markers.is_sent(first)
    assert not markers.is_sent(second)
    assert not markers.redis.exists(f"notifier:sending:{second}")
    assert markers.begin(second).token is not None


def test_a_release_redis_lacked_the_script_for_is_made_again_when_the_message_is_done(redis_url: str) -> None:
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=60_000)
    email_id = uuid.uuid4().hex
    markers.begin_all("tok", [email_id])
    markers.redis.script_flush()
    markers.release_soon("tok", email_id)  # answered NOSCRIPT
    markers.settle("tok", held=[])
    assert not markers.redis.exists(f"notifier:sending:{email_id}")
    assert not markers.is_sent(email_id)


def test_a_write_due_a_health_check_sends_no_ping_to_read_an_earlier_answer_as_its_own(redis_url: str) -> None:
    """redis-py PINGs a connection idle past health_check_interval (30 s here) before its
    next command and reads the answer: with a write's answer unread, that would be it."""
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    markers.begin_all("tok", [first, second])
    conn = markers._scripts._connection()
    assert conn.health_check_interval > 0
    markers.mark_sent("tok", first, still=[second])
    conn.next_health_check = 0  # due
    markers.mark_sent("tok", second)
    assert markers._scripts.answers() == []  # both taken, neither to make again
    assert markers.is_sent(first)
    assert markers.is_sent(second)
    assert conn._sock is not None


class Interrupted(BaseException):
    """What Dramatiq's time limit raises into a worker thread, wherever it is."""


def test_a_call_interrupted_between_write_and_read_never_leaves_its_answer_for_the_next(redis_url: str) -> None:
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    sent = uuid.uuid4().hex
    first = markers.begin(sent)
    assert first.token is not None
    markers.finish(sent, first.token)
    conn = markers._scripts._connection()
    real = conn.send_command

    def then_interrupted(*args: Any, **kwargs: Any) -> None:
        conn.send_command = real  # type: ignore[method-assign]
        real(*args, **kwargs)
        raise Interrupted()

    conn.send_command = then_interrupted  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        markers.begin(uuid.uuid4().hex)  # its answer ("ours") is never read
    assert markers.begin(sent).sent  # not that stale answer
    assert markers.begin(uuid.uuid4().hex).token is not None


def test_the_auth_client_is_built_at_the_first_lookup_and_never_for_carried_recipients(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Users(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps({"users": [{"id": 7, **RECIPIENT}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Users)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(actors.settings, "auth_url", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(actors.settings, "redis_url", redis_url)
    ctx = actors._build_context()
    monkeypatch.setattr(actors, "context", lambda: ctx)
    monkeypatch.setattr(actors, "_RECIPIENTS", {})
    sent: list[Email] = []
    ctx.transport.send = lambda email: sent.append(email) or "ok"  # type: ignore[method-assign]
    assert isinstance(ctx.auth, actors._AuthOnFirstUse)
    actors.send_welcome.fn(welcome(recipient=RECIPIENT))
    assert ctx.auth.client is None  # carried: no client, no import of its transport
    actors.send_welcome.fn(welcome())  # the old shape: looked up
    client = ctx.auth.client
    assert client is not None
    assert [e.to_email for e in sent] == ["jane@example.com", "jane@example.com"]
    monkeypatch.setattr(actors, "_RECIPIENTS", {})
    actors.send_welcome.fn(welcome())
    assert ctx.auth.client is client  # built once
    server.shutdown()
    server.server_close()


def test_a_threads_connection_goes_back_to_the_pool_when_the_thread_ends(redis_url: str) -> None:
    """Threads that come and go (a pool of them, a tool) leave no connection held open."""
    client = redis_client(redis_url)
    markers = SentMarkers(client, ttl_s=60, claim_ms=2000)
    pool = client.connection_pool

    def once() -> None:
        assert markers.begin(uuid.uuid4().hex).token is not None

    for _ in range(30):
        thread = threading.Thread(target=once)
        thread.start()
        thread.join()
    gc.collect()
    assert len(pool._in_use_connections) == 0
    # The one each thread took in turn (and the one that loaded the script, if this Redis lacked it).
    assert 1 <= len(pool._available_connections) <= 2
    client.close()
