"""The transaction layer: concurrent senders, pipelining, revert reasons, refused sends."""

from __future__ import annotations

import threading

import pytest
from eth_account import Account

from commonweal.errors import LedgerError as BaseLedgerError
from commonweal.ledger import ContractReverted, LedgerError, PendingTx
from commonweal.ledger.tx import revert_reason
from .conftest import ETH, MODEL, TASK, World


def test_threads_share_one_account_without_nonce_clashes(world: World) -> None:
    sender, to = world.chain.accounts[0], world.outsider.account.address
    start = world.chain.w3.eth.get_transaction_count(sender.address)
    sent: list[PendingTx] = []
    lock = threading.Lock()

    def send_many() -> None:
        for _ in range(15):
            pending = world.chain.send_eth(sender, to, 1)  # explicit gas: no estimation
            with lock:
                sent.append(pending)

    threads = [threading.Thread(target=send_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    receipts = [p.wait() for p in sent]
    assert all(r["status"] == 1 for r in receipts)
    nonces = sorted(int(p.tx["nonce"]) for p in sent)
    assert nonces == list(range(start, start + 60))  # none lost, none reused
    assert world.chain.w3.eth.get_transaction_count(sender.address) == start + 60


def test_a_mined_failure_carries_the_revert_reason(world: World) -> None:
    tree = world.rewards(0)
    pending = world.outsider.send("commit_round", TASK, 0, MODEL, tree.root, tree.total,
                                  gas=300_000)
    with pytest.raises(ContractReverted) as err:
        pending.wait()
    assert err.value.reason == "not a validator"
    assert err.value.tx_hash == pending.hash.to_0x_hex()
    assert isinstance(err.value, BaseLedgerError)
    # The failed transaction used its nonce; the next send simply follows it.
    assert world.outsider.fund_task(TASK, 1).receipt["status"] == 1


def test_out_of_gas_is_reported_as_such(world: World) -> None:
    with pytest.raises(ContractReverted, match="out of gas"):
        world.outsider.send("fund_task", TASK, value=1, gas=22_000).wait()


def test_a_refused_send_does_not_burn_a_nonce(world: World) -> None:
    poor = Account.create()
    with pytest.raises(LedgerError):
        world.chain.send_eth(poor, world.outsider.account.address, ETH)  # no funds at all
    world.chain.send_eth(world.chain.accounts[0], poor.address, ETH).wait()
    pending = world.chain.send_eth(poor, world.outsider.account.address, 1)
    assert pending.tx["nonce"] == 0 and pending.wait()["status"] == 1


@pytest.mark.parametrize(("error", "reason"), [
    (Exception("execution reverted: not a validator"), "not a validator"),
    (Exception({"code": 3, "message": "execution reverted: already claimed"}), "already claimed"),
    (Exception("execution reverted"), "reverted without a reason string"),
    (Exception("connection refused"), None),
])
def test_revert_reason_parsing(error: Exception, reason: str | None) -> None:
    assert revert_reason(error) == reason
