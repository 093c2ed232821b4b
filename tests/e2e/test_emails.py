"""Emails through real Dramatiq workers and the Brevo stand-in: none lost, none twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from .client import move, new_user, open_wallet, signup, unique_email
from .conftest import BrevoStub, Stack


def receipts(brevo: BrevoStub, address: str, count: int) -> list[dict[str, object]]:
    return [e for e in brevo.wait_for(address, count) if "receipt" in e["tags"]]  # type: ignore[operator]


def quiet(brevo: BrevoStub, seconds: float = 1.0) -> None:
    """Wait until no email has arrived for a while, so failure injection hits our email."""
    last = -1
    while (calls := brevo.state()["calls"]) != last:
        last = calls  # type: ignore[assignment]
        time.sleep(seconds)


def processes(stack: Stack, comm: str) -> list[int]:
    """Live processes of the stack whose command name is `comm`."""
    assert stack.process is not None
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == comm and f"STACK_ID={stack.stack_id}".encode() in (
                    proc / "environ"
                ).read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def dead_letters_on_record(stack: Stack, needle: str, *, present: bool = True, timeout: float = 30) -> str:
    """`auth-relay dead-letters` (the database's record) once `needle` is (or is no longer) in it."""
    deadline = time.monotonic() + timeout
    while True:
        listed = stack.command("auth-relay", "dead-letters")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        if (needle in listed.stdout) == present or time.monotonic() > deadline:
            return listed.stdout
        time.sleep(0.5)


def outcome_on_record(stack: Stack, email_id: str, wanted: str, timeout: float = 30) -> str | None:
    """The auth outbox row's recorded outcome, once it is `wanted` (or the timeout)."""
    assert stack.env is not None
    engine = create_engine(stack.env["AUTH_DATABASE_URL"])
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                found = conn.execute(text("SELECT outcome FROM outbox WHERE id = :id"), {"id": email_id}).scalar()
            if found == wanted or time.monotonic() > deadline:
                return str(found) if found is not None else None
            time.sleep(0.5)
    finally:
        engine.dispose()


class TestWhatIsSent:
    def test_signup_sends_exactly_one_welcome_email(self, api: httpx.Client, brevo: BrevoStub) -> None:
        email = unique_email("welcome")
        signup(api, email=email, first_name="Ada", last_name="Lovelace")
        [welcome] = brevo.wait_for(email, 1)
        assert welcome["subject"] == "Welcome to Wallet"
        assert welcome["to"] == [{"email": email, "name": "Ada Lovelace"}]
        assert welcome["headers"]["idempotencyKey"]  # type: ignore[index]

    def test_each_movement_sends_one_receipt_to_each_side(self, api: httpx.Client, brevo: BrevoStub) -> None:
        jane = new_user(api, first_name="Jane", last_name="Doe")
        john = new_user(api, first_name="John", last_name="Smith")
        open_wallet(api, jane, balance=10_000)  # a deposit: one receipt
        to = open_wallet(api, john)["id"]
        move(api, jane, "deposit", amount=250)
        move(api, jane, "withdraw", amount=199)
        move(api, jane, "transfer", amount=1234, to_account_id=to)
        jane_receipts = receipts(brevo, jane.email, 5)
        john_receipts = receipts(brevo, john.email, 1)
        subjects = sorted(str(r["subject"]) for r in jane_receipts)
        assert subjects == sorted(
            [
                "You received a deposit of 100.00 USD",
                "You received a deposit of 2.50 USD",
                "You withdrew 1.99 USD",
                "You sent 12.34 USD",
            ]
        )
        assert [r["subject"] for r in john_receipts] == ["You received 12.34 USD"]
        assert "Jane Doe sent you 12.34 USD." in str(john_receipts[0]["textContent"])
        assert "Balance after: 12.34 USD" in str(john_receipts[0]["textContent"])
        ids = [r["headers"]["idempotencyKey"] for r in jane_receipts + john_receipts]  # type: ignore[index]
        assert len(set(ids)) == len(ids)


class TestFailures:
    def test_500s_then_a_429_still_deliver_exactly_once(self, api: httpx.Client, brevo: BrevoStub) -> None:
        quiet(brevo)
        before = brevo.state()["calls"]
        brevo.fail("500", count=3)
        brevo.fail("429", count=1, reset=1)
        email = unique_email("flaky")
        signup(api, email=email)
        assert len(brevo.wait_for(email, 1, timeout=60)) == 1
        assert brevo.state()["calls"] >= before + 5  # 3 x 500, 1 x 429, then the one that worked  # type: ignore[operator]

    def test_a_worker_killed_mid_send_delivers_exactly_once(
        self, api: httpx.Client, brevo: BrevoStub, stack: Stack
    ) -> None:
        if stack.process is None:
            pytest.skip("needs the stack this suite starts (it kills one of its workers)")
        quiet(brevo)
        duplicates = brevo.state()["duplicates"]
        brevo.fail("slow", count=1, delay_s=5)  # Brevo takes the email, the answer is slow
        email = unique_email("killed")
        signup(api, email=email)
        deadline = time.monotonic() + 20
        while not brevo.emails_to(email) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = processes(stack, "dramatiq")
        assert workers, "no notifier worker found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # mid-send: Brevo has it, the worker never heard back
        # The restart loop brings the worker back; the message is redelivered after the
        # heartbeat timeout; Brevo refuses the repeated idempotencyKey; nothing is sent twice.
        deadline = time.monotonic() + 60
        while brevo.state()["duplicates"] == duplicates and time.monotonic() < deadline:
            time.sleep(0.3)
        assert brevo.state()["duplicates"] > duplicates, "the killed worker's message was never redelivered"
        assert len(brevo.wait_for(email, 1)) == 1

    def test_relay_down_during_50_transfers_then_back_delivers_all_100_receipts_once(
        self, api: httpx.Client, brevo: BrevoStub, stack: Stack
    ) -> None:
        if stack.process is None:
            pytest.skip("needs the stack this suite starts (it stops its relay)")
        payer, payee = new_user(api), new_user(api)
        open_wallet(api, payer, balance=100_000)
        to = open_wallet(api, payee)["id"]
        receipts(brevo, payer.email, 1)  # the opening deposit's receipt
        hold = stack.var / "run" / "hold-wallet-relay"
        hold.touch()
        try:
            for pid in processes(stack, "wallet-relay"):
                os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                assert move(api, payer, "transfer", amount=10, to_account_id=to).status_code == 200
            time.sleep(1.5)
            # Nothing relayed while it was down (the payee's welcome email came from auth's relay).
            assert [e for e in brevo.emails_to(payee.email) if "receipt" in e["tags"]] == []  # type: ignore[operator]
        finally:
            hold.unlink()
        sent = [r for r in receipts(brevo, payer.email, 51) if "transfer_sent" in r["tags"]]  # type: ignore[operator]
        got = receipts(brevo, payee.email, 50)
        assert (len(sent), len(got)) == (50, 50)
        keys = {r["headers"]["idempotencyKey"] for r in sent + got}  # type: ignore[index]
        assert len(keys) == 100

    def test_a_permanent_400_is_dead_lettered_and_replayed_by_command(
        self, api: httpx.Client, brevo: BrevoStub, stack: Stack
    ) -> None:
        if stack.env is None:
            pytest.skip("needs the stack this suite starts (runs its dead-letter command)")
        quiet(brevo)
        brevo.fail("400", count=1)
        email = unique_email("dead")
        signup(api, email=email)
        deadline = time.monotonic() + 20
        listed = ""
        while time.monotonic() < deadline:
            listed = stack.command("notifier-dlq", "list").stdout
            if "notifier.send_welcome" in listed:
                break
            time.sleep(0.3)
        assert "notifier.send_welcome" in listed
        assert brevo.emails_to(email) == []  # a 4xx is not retried
        email_id = listed.splitlines()[0].split("\t")[0]
        assert email_id in dead_letters_on_record(stack, email_id)  # auth's database has it too
        replayed = stack.command("notifier-dlq", "replay", email_id)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert len(brevo.wait_for(email, 1)) == 1
        assert "0 dead-lettered" in stack.command("notifier-dlq", "list").stdout
        # Sent after all: the database's record turns from dead-lettered to sent.
        if "AUTH_DATABASE_URL" in stack.env:  # the stack this suite starts: read the row itself
            assert outcome_on_record(stack, email_id, "sent") == "sent"
        assert email_id not in dead_letters_on_record(stack, email_id, present=False)

    def test_a_dead_letter_outlives_a_redis_flush_and_is_replayed_once_from_the_database(
        self, api: httpx.Client, brevo: BrevoStub, stack: Stack
    ) -> None:
        if stack.env is None or not stack.redis_url or "AUTH_DATABASE_URL" not in stack.env:
            pytest.skip("needs the stack this suite starts (flushes its Redis, reads its database)")
        quiet(brevo)
        brevo.fail("400", count=1)
        email = unique_email("flushed")
        user = signup(api, email=email)
        needle = f"\tuser={user['id']}\t"
        listed = dead_letters_on_record(stack, needle)
        [line] = [row for row in listed.splitlines() if needle in row]
        email_id = line.split("\t")[0]
        redis.Redis.from_url(stack.redis_url).flushall()  # the queue, the dead letters, the markers: gone
        assert "0 dead-lettered" in stack.command("notifier-dlq", "list").stdout
        assert email_id in dead_letters_on_record(stack, needle)  # the database still has it
        assert brevo.emails_to(email) == []
        duplicates = brevo.state()["duplicates"]
        replayed = stack.command("auth-relay", "dead-letters", "--replay", email_id)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "replayed 1 message(s)" in replayed.stdout
        assert outcome_on_record(stack, email_id, "sent") == "sent"
        assert email_id not in dead_letters_on_record(stack, email_id, present=False)
        # Once: the replay was published once, and nothing asks the notifier again.
        again = stack.command("auth-relay", "dead-letters", "--replay", email_id)
        assert again.returncode == 1, again.stdout + again.stderr
        assert len(brevo.wait_for(email, 1)) == 1
        assert brevo.state()["duplicates"] == duplicates
