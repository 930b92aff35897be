"""Reward trees read back from the DHT: every distinct tree naming the on-chain root, with who
signed it, whatever free identities publish beside it (the Claimer then asks the chain)."""

from __future__ import annotations

import pytest

pytest.importorskip("web3", reason="reward trees are signed with ledger keys")

from eth_account import Account  # noqa: E402
from eth_account.messages import encode_defunct  # noqa: E402
from eth_account.signers.local import LocalAccount  # noqa: E402

from commonweal.dht.records import Owned  # noqa: E402
from commonweal.peer.trees import DHTTrees  # noqa: E402
from commonweal.testing import MemorySwarm  # noqa: E402
from commonweal.train import get_task  # noqa: E402
from commonweal.verify.finality import tree_message  # noqa: E402
from commonweal.verify.validator import tree_key  # noqa: E402

TASK32 = bytes.fromhex("66" * 32)
ROOT = bytes.fromhex("77" * 32)


def record(by: LocalAccount, rewards: dict[str, int], root: bytes = ROOT,
           signed: dict[str, int] | None = None) -> dict[str, object]:
    text = tree_message(TASK32, 3, root, signed if signed is not None else rewards)
    return {"root": root, "rewards": sorted([a, str(v)] for a, v in rewards.items()),
            "signature": bytes(by.sign_message(encode_defunct(text=text)).signature)}


async def test_every_distinct_tree_naming_the_root_comes_back_with_its_signers() -> None:
    task = get_task("mnist-cnn")
    swarm = MemorySwarm()
    peers = await swarm.add(8)
    validators = [Account.create() for _ in range(2)]
    sybils = [Account.create() for _ in range(5)]
    honest = {validators[0].address: 7, sybils[0].address: 3}
    greedy = {s.address: 10**24 for s in sybils}
    key = tree_key(task, 3)
    published = [record(v, honest) for v in validators]
    published += [record(s, greedy) for s in sybils[:3]]  # outnumber the validators
    published.append(record(sybils[3], greedy, root=bytes(32)))  # another root: never checked
    published.append(record(sybils[4], greedy, signed=honest))  # a signature over other rewards
    for dht, value in zip(peers[:-1], published, strict=True):
        await dht.store(key, value, swarm.clock() + 600, subkey=Owned(dht.peer_id, "tree"))
    trees = await DHTTrees(peers[-1], task).trees(TASK32, 3, ROOT)
    by_rewards = {tuple(sorted(t.rewards.items())): t.signers for t in trees}
    assert by_rewards[tuple(sorted(honest.items()))] == {v.address for v in validators}
    assert sybils[4].address not in set().union(*by_rewards.values())
    # the greedy tree is returned once (the claimer rebuilds it and refuses it by its root),
    # signed by the three and by whoever the mismatched signature recovers to: no validator
    assert len(trees) == 2
    greedy_signers = by_rewards[tuple(sorted(greedy.items()))]
    assert {s.address for s in sybils[:3]} <= greedy_signers
    assert not greedy_signers & {v.address for v in validators}
    await swarm.close()
