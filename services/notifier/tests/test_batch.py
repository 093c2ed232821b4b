"""A batch of emails in one Dramatiq message (notifier.send_batch), with real Redis markers
and a real RedisBroker for the emails it hands on: each email is sent once, and one it
cannot send goes on as a message of its own, with its own id."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from notifier import actors
from notifier.brevo import Email, PermanentError, TransientError
from notifier.dedupe import SentMarkers
from svckit.messages import QUEUE, SENT_MARKER, Receipt, Recipient, batch_payload
from svckit.outbox import outbox_row
from svckit.redis import redis_client

from .conftest import Recording, make_receipt


class Failing(Recording):
    """Fails the send of chosen emails, each with its own exception, and runs chosen
    callables during the send of others (what another worker does meanwhile)."""

    def __init__(self, recording: Recording) -> None:
        self.__dict__.update(recording.__dict__)
        self.failures: dict[str, BaseException] = {}
        self.meanwhile: dict[str, Callable[[], None]] = {}

    def send(self, email: Email) -> str:
        failure = self.failures.get(email.email_id)
        if failure is not None:
            raise failure
        if email.email_id in self.meanwhile:
            self.meanwhile[email.email_id]()
        return super().send(email)


@pytest.fixture
def failing(transport: Recording, monkeypatch: pytest.MonkeyPatch) -> Failing:
    wrapped = Failing(transport)
    monkeypatch.setattr(actors.context(), "transport", wrapped)
    return wrapped


@pytest.fixture
def broker(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisBroker]:
    """Where handed-on emails go: a RedisBroker of its own namespace."""
    broker = RedisBroker(client=redis_client(redis_url), namespace=f"batch-{uuid.uuid4().hex}")
    monkeypatch.setattr(dramatiq, "get_broker", lambda: broker)
    yield broker
    broker.close()


def handed_on(broker: RedisBroker) -> dict[str, tuple[bool, dramatiq.Message[Any]]]:
    """The messages enqueued on the broker, by id: (delayed, message)."""
    found = {}
    for delayed, name in ((False, QUEUE), (True, f"{QUEUE}.DQ")):
        for raw in broker.client.hvals(f"{broker.namespace}:{name}.msgs"):
            message = dramatiq.Message.decode(raw)
            found[message.message_id] = (delayed, message)
    return found


def receipt_item() -> dict[str, Any]:
    receipt = make_receipt(recipient=Recipient(email="j@example.com", first_name="J", last_name="D"))
    return json.loads(outbox_row(receipt)["payload"])


def run(items: list[dict[str, Any]]) -> None:
    """The batch as a worker runs it (the actor's function, from the relay's message)."""
    actors.send_batch.fn(**batch_payload(items)["kwargs"])


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["message_id"] for item in items]


def test_each_email_is_sent_once_and_a_redelivered_batch_sends_nothing(
    transport: Recording, broker: RedisBroker, redis_url: str
) -> None:
    items = [receipt_item() for _ in range(5)]
    run(items)
    run(items)  # the same batch again (a redelivery, or the relay republishing)
    assert transport.sent == ids(items)
    client = redis_client(redis_url)
    assert all(client.exists(SENT_MARKER.format(i)) for i in ids(items))
    assert not any(client.exists(f"notifier:sending:{i}") for i in ids(items))  # claims released
    assert handed_on(broker) == {}


def test_an_email_twice_in_one_batch_is_sent_once(transport: Recording, broker: RedisBroker) -> None:
    item = receipt_item()
    run([item, receipt_item(), item])
    assert transport.sent.count(item["message_id"]) == 1
    assert len(transport.sent) == 2


def test_a_failed_email_goes_on_alone_with_its_id_and_the_rest_are_sent(
    failing: Failing, broker: RedisBroker, redis_url: str
) -> None:
    items = [receipt_item() for _ in range(4)]
    transient, permanent = ids(items)[1], ids(items)[2]
    failing.failures = {transient: TransientError("Brevo answered 503"), permanent: PermanentError("400")}
    run(items)
    assert failing.sent == [ids(items)[0], ids(items)[3]]
    queued = handed_on(broker)
    assert set(queued) == {transient, permanent}
    assert queued[transient][0]  # after a backoff (the delay queue)
    assert not queued[permanent][0]  # at once: its own message dead-letters it
    assert queued[transient][1].actor_name == "notifier.send_receipt"
    assert queued[transient][1].kwargs == items[1]["kwargs"]  # the message the relay made for it
    # Its claim was released: the handed-on message sends it.
    del failing.failures[transient]
    actors.send_receipt.fn(**queued[transient][1].kwargs)
    assert failing.sent[-1] == transient
    assert redis_client(redis_url).exists(SENT_MARKER.format(transient))


def test_a_malformed_email_goes_on_alone_at_once_and_the_rest_are_sent(
    transport: Recording, broker: RedisBroker
) -> None:
    items = [receipt_item() for _ in range(3)]
    del items[1]["kwargs"]["message"]["amount"]
    run(items)
    assert transport.sent == [ids(items)[0], ids(items)[2]]
    delayed, message = handed_on(broker)[ids(items)[1]]
    assert not delayed  # its own message dead-letters it
    assert message.kwargs == items[1]["kwargs"]


def test_an_email_another_worker_is_sending_goes_on_after_its_claim(
    transport: Recording, broker: RedisBroker, redis_url: str
) -> None:
    items = [receipt_item() for _ in range(2)]
    other = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=5_000)
    assert other.claim(ids(items)[0])
    run(items)
    assert transport.sent == [ids(items)[1]]
    delayed, message = handed_on(broker)[ids(items)[0]]
    assert delayed
    assert message.options["eta"] >= int(datetime.now(UTC).timestamp() * 1000) + 3_000  # not before the claim ends


class Interrupted(BaseException):
    """What Dramatiq's time limit raises into a worker thread."""


def test_an_interrupted_batch_marks_what_it_sent_and_releases_the_rest(
    failing: Failing, broker: RedisBroker, redis_url: str
) -> None:
    items = [receipt_item() for _ in range(3)]
    failing.failures = {ids(items)[1]: Interrupted()}
    with pytest.raises(Interrupted):
        run(items)
    client = redis_client(redis_url)
    assert client.exists(SENT_MARKER.format(ids(items)[0]))
    assert not any(client.exists(f"notifier:sending:{i}") for i in ids(items))  # the retry need not wait
    del failing.failures[ids(items)[1]]
    run(items)  # Dramatiq's retry of the batch
    assert failing.sent == ids(items)  # the first not twice
    assert handed_on(broker) == {}


def markers_seen_during_the_third_send(failing: Failing, client: Any, items: list[dict[str, Any]]) -> list[list[bool]]:
    """Which of the three emails' markers another connection sees while the third is being
    sent (waiting up to 2 s for the first two: the writes are not waited for)."""
    marked: list[list[bool]] = []

    def during_the_third() -> None:
        deadline = time.monotonic() + 2
        while True:
            now = [bool(client.exists(SENT_MARKER.format(i))) for i in ids(items)]
            if now[:2] == [True, True] or time.monotonic() > deadline:
                marked.append(now)
                return
            time.sleep(0.01)

    failing.meanwhile = {ids(items)[2]: during_the_third}
    return marked


def test_each_email_is_marked_sent_right_after_its_send(failing: Failing, redis_url: str) -> None:
    """Not at the batch's end: the marker is written as the send returns (its answer read
    later), so a worker killed mid-batch leaves unmarked at most the email it was sending,
    as a message of its own would. Seen from another connection while the third send is
    still going on."""
    items = [receipt_item() for _ in range(3)]
    client = redis_client(redis_url)
    marked = markers_seen_during_the_third_send(failing, client, items)
    run(items)
    assert marked == [[True, True, False]]


def test_no_other_worker_can_claim_an_email_the_batch_holds(
    failing: Failing, broker: RedisBroker, redis_url: str
) -> None:
    """The batch claims all its emails before its first send: a copy handed on or
    republished meanwhile finds each busy (and waits out its claim), then sent."""
    items = [receipt_item() for _ in range(3)]
    other = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=5_000)
    found: list[Any] = []
    failing.meanwhile = {ids(items)[0]: lambda: found.append(other.begin(ids(items)[2]))}
    run(items)
    [begun] = found
    assert (begun.sent, begun.token) == (False, None)
    assert begun.busy_ms > 0
    assert failing.sent == ids(items)
    assert other.begin(ids(items)[2]).sent
    assert handed_on(broker) == {}


def test_the_claims_still_held_are_renewed_after_each_send_so_each_lasts_one_send(
    failing: Failing, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claimed together at the batch's start, each claim is renewed by the write that marks
    the email before it sent (or released it): the last is still held when its turn comes
    after sends longer in all than one claim, and a killed worker's claims run out one
    claim after its last send, not the batch's."""
    markers = actors.context().markers
    monkeypatch.setattr(markers, "claim_ms", 600)
    items = [receipt_item() for _ in range(4)]
    client = redis_client(redis_url)
    ttls: list[int] = []

    def slow(i: int) -> None:
        if i == 3:
            ttls.append(client.pttl(f"notifier:sending:{ids(items)[i]}"))
        time.sleep(0.3)

    failing.meanwhile = {ids(items)[i]: (lambda i=i: slow(i)) for i in range(4)}
    failing.failures = {}
    run(items)
    [ttl] = ttls  # 0.9 s after the claims were made: 1.5 claims
    assert 0 < ttl <= 600
    assert failing.sent == ids(items)


def test_a_failure_after_the_send_never_sends_it_again(
    transport: Recording, broker: RedisBroker, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What fails once Brevo has the email (the lag metric, say) marks it sent, not handed on."""
    items = [receipt_item() for _ in range(2)]

    def broken(receipt: Receipt) -> None:
        raise TypeError("metrics broke")

    working = actors._lag
    monkeypatch.setattr(actors, "_lag", broken)
    with pytest.raises(TypeError):
        run(items)
    assert transport.sent == [ids(items)[0]]
    assert redis_client(redis_url).exists(SENT_MARKER.format(ids(items)[0]))
    assert handed_on(broker) == {}
    monkeypatch.setattr(actors, "_lag", working)
    run(items)  # the batch's retry
    assert transport.sent == ids(items)


def test_a_dead_batch_marks_no_email_dead(redis_url: str) -> None:
    from notifier.broker import DeadLetterMarker
    from svckit.messages import DEAD_MARKER

    client = redis_client(redis_url)
    marker = DeadLetterMarker(client, ttl_ms=60_000)
    batch = dramatiq.Message(**batch_payload([receipt_item()]))
    single = dramatiq.Message(**receipt_item())
    marker.after_nack(None, batch)
    marker.after_nack(None, single)
    assert not client.exists(DEAD_MARKER.format(batch.message_id))
    assert client.exists(DEAD_MARKER.format(single.message_id))


def test_each_email_of_a_batch_is_sent_with_its_own_messages_request_id(failing: Failing) -> None:
    from svckit.requestid import request_id_var

    items = [receipt_item() for _ in range(2)]
    for n, item in enumerate(items):
        item.setdefault("options", {})["request_id"] = f"req-{n}"
    seen: list[str | None] = []
    failing.meanwhile = {i: (lambda: seen.append(request_id_var.get())) for i in ids(items)}
    run(items)
    assert seen == ["req-0", "req-1"]


def redis_gone_after(failing: Failing, email_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the send of `email_id` on, the markers' connection takes nothing (Redis away)."""
    from notifier import scripts

    monkeypatch.setattr(scripts.time, "sleep", lambda _: None)
    conn = actors.context().markers._scripts._connection()

    def away(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Redis is away")

    failing.meanwhile = {email_id: lambda: monkeypatch.setattr(conn, "send_command", away)}


def test_a_batch_stops_when_redis_goes_away_rather_than_send_on_unmarked(
    failing: Failing, broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its first marker could not be written: the next email's send waits for it to be made
    good, which raises while Redis is away, so one email is left unmarked, not the batch."""
    items = [receipt_item() for _ in range(4)]
    redis_gone_after(failing, ids(items)[0], monkeypatch)
    with pytest.raises(redis.ConnectionError):
        run(items)
    assert failing.sent == [ids(items)[0]]


def test_a_message_whose_markers_cannot_be_settled_still_fails_with_its_own_error(
    failing: Failing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permanent failure must reach Dramatiq as itself (dead letter, not retried), not as
    the Redis error met while settling its claim."""
    message = receipt_item()["kwargs"]["message"]
    redis_gone_after(failing, message["email_id"], monkeypatch)
    real = failing.meanwhile[message["email_id"]]

    def then_refused() -> None:
        real()
        raise PermanentError("400 invalid_parameter")

    failing.meanwhile = {message["email_id"]: then_refused}
    with pytest.raises(PermanentError):
        actors.send_receipt.fn(message)


def test_the_first_batch_after_redis_lost_its_scripts_marks_each_email_right_after_its_send(
    failing: Failing, redis_url: str
) -> None:
    """The scripts are loaded together when one is missing, so the marker written after the
    first send is not refused for a script only ever written."""
    items = [receipt_item() for _ in range(3)]
    client = redis_client(redis_url)
    client.script_flush()
    marked = markers_seen_during_the_third_send(failing, client, items)
    run(items)
    assert marked == [[True, True, False]]
