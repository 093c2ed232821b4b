"""Many requests at once on the same wallets: no lost update, no overdraft, no deadlock,
and one idempotency key moves money once. Real threads, real database, real Redis."""

from __future__ import annotations

import uuid
from collections import Counter

from fastapi.testclient import TestClient

from wallet import service
from wallet.audit import audit

from .factories import AuthFake, Signer, call, new_user, open_wallet, run_all


def test_sixty_withdrawals_of_50_from_1000_exactly_twenty_succeed(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=1000)
    system = client.app.state.system_wallets["USD"]  # type: ignore[attr-defined]
    op = service.withdraw_op(user_id=user.id, amount=50, currency="USD", system_wallet_id=system)
    payload = {"amount": 50, "currency": "USD"}
    results = run_all([lambda: call(client, user, "withdraw", uuid.uuid4().hex, payload, op) for _ in range(60)])
    codes = Counter(status for status, _ in results)
    assert codes == {200: 20, 422: 40}
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 0
    assert audit(client.app.state.engine).violations == []  # type: ignore[attr-defined]


def test_crossed_transfers_conserve_the_total_without_errors(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    a, b = new_user(signer, auth_fake), new_user(signer, auth_fake)
    wa, wb = open_wallet(client, a, balance=500)["id"], open_wallet(client, b, balance=500)["id"]
    jobs = []
    for i in range(40):
        sender, to = (a, wb) if i % 2 else (b, wa)
        op = service.transfer_op(user_id=sender.id, to_wallet_id=to, amount=7, currency="USD")
        payload = {"amount": 7, "currency": "USD", "to_account_id": to}
        jobs.append(
            lambda sender=sender, op=op, payload=payload: call(
                client, sender, "transfer", uuid.uuid4().hex, payload, op
            )
        )
    results = run_all(jobs)
    assert {status for status, _ in results} == {200}
    balances = [client.get("/wallet", headers=u.headers).json()["balance"] for u in (a, b)]
    assert balances == [500, 500]  # 20 each way
    assert audit(client.app.state.engine).violations == []  # type: ignore[attr-defined]


def test_thirty_requests_with_one_key_move_money_once(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    system = client.app.state.system_wallets["USD"]  # type: ignore[attr-defined]
    op = service.deposit_op(user_id=user.id, amount=100, currency="USD", system_wallet_id=system)
    key = uuid.uuid4().hex
    results = run_all([lambda: call(client, user, "deposit", key, {"amount": 100, "currency": "USD"}, op)] * 30)
    successes = {body for status, body in results if status == 200}
    assert len(successes) == 1  # every 200 is the same bytes
    assert {status for status, _ in results} <= {200, 409}
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 100
