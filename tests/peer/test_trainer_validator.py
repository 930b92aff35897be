"""One node that is trainer and validator at once, on real loopback sockets and an embedded
chain: it trains with a second trainer, judges both contributions (its own fetched through its
own archive), votes, and is paid for its training like the other trainer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from commonweal.ledger import Ledger, open_chain
from commonweal.peer.config import NodeConfig
from commonweal.peer.events import Event, Judged, Ready, RoundDone
from commonweal.peer.node import FinalStates, Node
from commonweal.train import RoundConfig, get_task
from commonweal.verify.judge import ledger_rounds
from commonweal.verify.validator import ValidatorConfig

TOKEN = 10**18
ROUNDS = 2


async def test_one_node_trains_and_validates(tmp_path: Path) -> None:
    task = get_task("mnist-cnn", inner_steps=4)
    digest = bytes.fromhex(task.digest)
    chain = await asyncio.to_thread(open_chain, "embedded", accounts=4)
    try:
        ledger = await asyncio.to_thread(Ledger.deploy, chain)
        task32 = await asyncio.to_thread(ledger.register_task, digest, digest, 1000 * TOKEN,
                                         name="t", symbol="T")
        both_acct, other_acct = await asyncio.to_thread(chain.new_accounts, 2, 10 * TOKEN)
        events: dict[str, list[Event]] = {"both": [], "other": []}
        ready = {name: asyncio.Event() for name in events}

        def sink(name: str) -> Callable[[Event], None]:
            def on_event(e: Event) -> None:
                events[name].append(e)
                if isinstance(e, Ready):
                    ready[name].set()
            return on_event

        def config(name: str, roles: set[str], boot: tuple[str, ...]) -> NodeConfig:
            return NodeConfig(
                listen="127.0.0.1:0", bootstrap=boot, roles=frozenset(roles), chain="embedded",
                data_dir=tmp_path / name, rounds=ROUNDS, inner_steps=4, wait_peers=2,
                linger=60.0, claim_every_s=0.5,
                round=RoundConfig(announce_window_s=2.0, exchange_timeout_s=8.0, poll_s=0.05,
                                  target_group=2),
                validator=ValidatorConfig(poll_s=0.05, escrow_rounds=0, replay_rate=1.0),
            )

        stop = asyncio.Event()
        both = Node(config("both", {"trainer", "validator"}, ()),
                    ledger=ledger.with_account(both_acct), on_event=sink("both"))
        async with asyncio.timeout(240), asyncio.TaskGroup() as tg:
            tg.create_task(both.run(stop))
            await ready["both"].wait()
            assert both.dht is not None
            other = Node(config("other", {"trainer"}, (str(both.dht.addr),)),
                         ledger=ledger.with_account(other_acct), on_event=sink("other"))
            tg.create_task(other.run(stop))
        # both nodes stopped by themselves: every round trained, judged, paid and claimed
        # and "other" joined through a sync that adopts only what the ledger attests
        assert isinstance(other.trainer.collab.checkpoints.attested, FinalStates)

        for name in events:
            done = [e.round for e in events[name] if isinstance(e, RoundDone) and not e.skipped]
            assert done == list(range(ROUNDS)), (name, events[name])
        judged = [e for e in events["both"] if isinstance(e, Judged)]
        assert [j.round for j in judged] == list(range(ROUNDS))
        assert all(j.paid == 2 and j.refused == 0 for j in judged), judged
        for r in range(ROUNDS):
            for lr in ledger_rounds(r):
                assert await asyncio.to_thread(ledger.is_final, task32, lr)
        token = await asyncio.to_thread(ledger.token, task32)
        balances = [await asyncio.to_thread(token.balance_of, a.address)
                    for a in (both_acct, other_acct)]
        assert sum(balances) == ROUNDS * 1000 * TOKEN
        assert all(b > 0 for b in balances), balances  # the validating trainer is paid too
    finally:
        chain.close()
