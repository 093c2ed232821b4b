"""After some traffic, every process's Prometheus counters have moved.

Metrics are an operator's view: they are scraped on each process's own port (the
gateway never routes /metrics; test_gateway.py checks that).
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .client import move, new_user, open_wallet
from .conftest import BrevoStub, Stack


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_counters_move_with_traffic(api: httpx.Client, stack: Stack, brevo: BrevoStub) -> None:
    if stack.ports is None:
        pytest.skip("needs the stack this suite starts (it knows its metrics ports)")
    ports = stack.ports
    wallets = [
        p
        for name, p in ports.items()
        if name.startswith("wallet") and name.endswith("_metrics") and name != "wallet_relay_metrics"
    ]

    def wallet_total(name: str, **labels: str) -> float:
        return sum(total(scrape(p), name, **labels) for p in wallets)

    before_moved = wallet_total("wallet_money_moved_minor_units_total", type="transfer", currency="USD")
    before_replays = wallet_total("wallet_idempotency_events_total", event="replay")

    jane, john = new_user(api), new_user(api)
    open_wallet(api, jane, balance=1000)
    to = open_wallet(api, john)["id"]
    key = uuid.uuid4().hex
    move(api, jane, "transfer", key=key, amount=321, to_account_id=to)
    move(api, jane, "transfer", key=key, amount=321, to_account_id=to)  # a replay
    brevo.wait_for(john.email, 2)  # welcome + receipt: the relay and the workers ran

    assert wallet_total("wallet_money_moved_minor_units_total", type="transfer", currency="USD") == before_moved + 321
    assert wallet_total("wallet_idempotency_events_total", event="replay") == before_replays + 1
    assert wallet_total("http_requests_total", route="/transaction/transfer", status="200") >= 2
    assert wallet_total("http_request_duration_seconds_count", route="/transaction/transfer") >= 2

    auth = scrape(ports["auth_metrics"])
    assert total(auth, "http_requests_total", route="/signup", status="201") >= 2

    deadline = time.monotonic() + 5
    while (relay := scrape(ports["wallet_relay_metrics"])) and total(relay, "outbox_published_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert total(relay, "outbox_backlog", service="wallet") >= 0
    assert ("outbox_oldest_age_seconds", (("service", "wallet"),)) in relay

    notifier = scrape(ports["notifier_metrics"])
    assert total(notifier, "notifier_brevo_calls_total", outcome="201") >= 2
    assert total(notifier, "notifier_emails_delivered_total", kind="transfer_received") >= 1
    assert ("notifier_dead_letters", (("queue", "notifications"),)) in notifier

    gateway = scrape(ports["gateway_metrics"])
    assert total(gateway, "traefik_entrypoint_requests_total", entrypoint="web") > 0
