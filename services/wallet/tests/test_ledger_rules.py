"""The pure double-entry rules, checked with hypothesis against a simple model."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from wallet import ledger

SYSTEM = 0
USERS = [1, 2, 3]
amounts = st.integers(min_value=1, max_value=10**12)


@given(source=st.integers(0, 5), destination=st.integers(0, 5), amount=amounts)
def test_every_posting_pair_balances(source: int, destination: int, amount: int) -> None:
    if source == destination:
        return
    pair = ledger.postings(source=source, destination=destination, amount=amount)
    assert ledger.is_balanced(pair)
    assert ledger.balance_of(pair, source) == -amount
    assert ledger.balance_of(pair, destination) == amount


def test_refuses_empty_or_circular_movements() -> None:
    for kwargs in ({"source": 1, "destination": 2, "amount": 0}, {"source": 1, "destination": 1, "amount": 5}):
        try:
            ledger.postings(**kwargs)
        except ValueError:
            continue
        raise AssertionError(f"accepted {kwargs}")


class LedgerMachine(RuleBasedStateMachine):
    """Deposits, withdrawals and transfers applied through the ledger rules, compared with
    a plain dict of balances; snapshots must always be the running balance."""

    def __init__(self) -> None:
        super().__init__()
        self.model = {w: 0 for w in [SYSTEM, *USERS]}
        self.balances = {w: 0 for w in [SYSTEM, *USERS]}
        self.journal: list[ledger.Posting] = []
        self.snapshots: dict[int, list[int]] = {w: [] for w in self.balances}

    def _book(self, source: int, destination: int, amount: int) -> None:
        pair = ledger.postings(source=source, destination=destination, amount=amount)
        assert ledger.is_balanced(pair)
        for posting in pair:
            self.balances[posting.wallet_id] = ledger.apply(self.balances[posting.wallet_id], posting)
            self.snapshots[posting.wallet_id].append(self.balances[posting.wallet_id])
        self.journal.extend(pair)

    @rule(user=st.sampled_from(USERS), amount=amounts)
    def deposit(self, user: int, amount: int) -> None:
        self._book(SYSTEM, user, amount)
        self.model[user] += amount
        self.model[SYSTEM] -= amount

    @rule(user=st.sampled_from(USERS), data=st.data())
    @precondition(lambda self: any(self.model[u] > 0 for u in USERS))
    def withdraw(self, user: int, data: st.DataObject) -> None:
        if self.model[user] == 0:
            return
        amount = data.draw(st.integers(1, self.model[user]))
        self._book(user, SYSTEM, amount)
        self.model[user] -= amount
        self.model[SYSTEM] += amount

    @rule(source=st.sampled_from(USERS), destination=st.sampled_from(USERS), data=st.data())
    def transfer(self, source: int, destination: int, data: st.DataObject) -> None:
        if source == destination or self.model[source] == 0:
            return
        amount = data.draw(st.integers(1, self.model[source]))
        self._book(source, destination, amount)
        self.model[source] -= amount
        self.model[destination] += amount

    @invariant()
    def balances_match_the_model(self) -> None:
        assert self.balances == self.model

    @invariant()
    def balance_is_credits_minus_debits_and_the_newest_snapshot(self) -> None:
        for wallet, value in self.balances.items():
            assert ledger.balance_of(self.journal, wallet) == value
            assert (self.snapshots[wallet] or [0])[-1] == value

    @invariant()
    def money_is_conserved_and_users_never_negative(self) -> None:
        assert sum(self.balances.values()) == 0
        assert all(self.balances[u] >= 0 for u in USERS)
        assert ledger.is_balanced(self.journal) or not self.journal


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
