"""A message's own email (notifier.send_receipt) with real Redis markers: duplicates are
dropped, a failed send leaves no claim behind, a claimed email is retried after the claim."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from notifier import actors
from notifier.brevo import TransientError
from notifier.dedupe import SentMarkers
from svckit.messages import Recipient
from svckit.redis import redis_client

from .conftest import Recording, make_receipt

RECIPIENT = Recipient(email="j@example.com", first_name="J", last_name="D")


def test_a_redelivered_message_is_not_sent_again(transport: Recording) -> None:
    message = make_receipt(recipient=RECIPIENT).model_dump(mode="json")
    actors.send_receipt.fn(message)
    actors.send_receipt.fn(message)
    assert transport.sent == [message["email_id"]]


def test_a_transient_failure_releases_the_claim_for_the_retry(transport: Recording) -> None:
    message = make_receipt(recipient=RECIPIENT).model_dump(mode="json")
    transport.fail_next = 1
    with pytest.raises(TransientError):
        actors.send_receipt.fn(message)
    actors.send_receipt.fn(message)  # the retry is not blocked by a stale claim
    assert transport.sent == [message["email_id"]]


def test_a_claimed_email_is_retried_after_the_claim(transport: Recording, redis_url: str) -> None:
    import dramatiq

    message = make_receipt(recipient=RECIPIENT).model_dump(mode="json")
    other = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=1500)
    assert other.claim(message["email_id"])  # another worker is sending it right now
    with pytest.raises(dramatiq.Retry) as info:
        actors.send_receipt.fn(message)
    assert info.value.delay is not None
    assert 1000 <= info.value.delay <= 2600
    assert transport.sent == []


def test_a_rate_limited_email_is_retried_after_brevos_reset_and_its_claim_released(
    transport: Recording, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dramatiq

    message = make_receipt(recipient=RECIPIENT).model_dump(mode="json")

    def limited(email: object) -> str:
        raise TransientError("Brevo answered 429", retry_after_ms=7_000)

    monkeypatch.setattr(transport, "send", limited)
    with pytest.raises(dramatiq.Retry) as info:
        actors.send_receipt.fn(message)
    assert info.value.delay is not None
    assert 7_000 <= info.value.delay <= 8_000
    assert not redis_client(redis_url).exists(f"notifier:sending:{message['email_id']}")


def test_should_retry_never_retries_permanent_errors() -> None:
    from notifier.brevo import PermanentError

    assert actors.should_retry(0, TransientError("x"))
    assert not actors.should_retry(0, PermanentError("x"))
    assert not actors.should_retry(actors.settings.max_retries, TransientError("x"))


def test_a_delivered_receipt_records_its_lag_from_the_movement_once(
    transport: Recording, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actors, "recipient", lambda _: {"email": "j@example.com", "first_name": "J", "last_name": "D"})
    receipt = make_receipt(occurred_at=datetime.now(UTC) - timedelta(seconds=45))

    def lag() -> tuple[float, float, float]:
        return tuple(  # type: ignore[return-value]
            REGISTRY.get_sample_value(name, labels) or 0.0
            for name, labels in (
                ("notifier_receipt_lag_seconds_count", {}),
                ("notifier_receipt_lag_seconds_bucket", {"le": "30.0"}),
                ("notifier_receipt_lag_seconds_bucket", {"le": "60.0"}),
            )
        )

    before = lag()
    message = receipt.model_dump(mode="json")
    actors.send_receipt.fn(message)
    actors.send_receipt.fn(message)  # a redelivery: dropped, not measured again
    assert transport.sent == [receipt.email_id]
    count, under_30, under_60 = (after - b for after, b in zip(lag(), before, strict=True))
    assert (count, under_30, under_60) == (1, 0, 1)
