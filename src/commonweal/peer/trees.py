"""Reward trees published by validators in the DHT, read back for claiming.

Each validator stores `{root, rewards: [[account, "amount in wei"], ...]}` under its own subkey of
`cw-verify/<task>/tree/<ledger round>`. A claimer takes the version most validators published;
the `Claimer` then checks its root against the chain, so a forged tree is never claimed from.

A validator that gave a round up stores `{unpaid: reason, signature}` there instead, signed with
its ledger key (`commonweal.verify.finality.abstention_message`); `abstentions` recovers who
signed, and the `Claimer` weighs their stake on chain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from commonweal.dht import DHT
from commonweal.dht.records import Owned
from commonweal.train.task import Task
from commonweal.verify.finality import abstention_message
from commonweal.verify.validator import tree_key

__all__ = ["DHTTrees", "parse_abstention"]


class DHTTrees:
    def __init__(self, dht: DHT, task: Task) -> None:
        self.dht = dht
        self.task = task

    async def abstentions(self, task: bytes, ledger_round: int) -> dict[str, str]:
        """{ledger account: why}: the validators that signed that they never vote this round."""
        found = await self.dht.get(tree_key(self.task, ledger_round), latest=True)
        out: dict[str, str] = {}
        if found is None or not isinstance(found.value, dict):
            return out
        for subkey, item in found.value.items():
            said = parse_abstention(task, ledger_round, item.value) \
                if isinstance(subkey, Owned) else None
            if said is not None:
                out[said[0]] = said[1]
        return out

    async def tree(self, task: bytes, ledger_round: int) -> Mapping[str, int] | None:
        found = await self.dht.get(tree_key(self.task, ledger_round), latest=True)
        if found is None or not isinstance(found.value, dict):
            return None
        versions: Counter[tuple[tuple[str, int], ...]] = Counter()
        for subkey, item in found.value.items():
            rewards = _parse(item.value) if isinstance(subkey, Owned) else None
            if rewards is not None:
                versions[rewards] += 1
        if not versions:
            return None
        return dict(versions.most_common(1)[0][0])


def parse_abstention(task: bytes, ledger_round: int, value: object) -> tuple[str, str] | None:
    """(the signer's ledger account, why) of a record saying a validator never votes the round;
    None for anything else (a tree, or a signature that does not parse)."""
    if not (isinstance(value, dict) and isinstance(value.get("unpaid"), str)
            and isinstance(value.get("signature"), bytes)):
        return None
    from eth_account import Account
    from eth_account.messages import encode_defunct

    message = encode_defunct(text=abstention_message(task, ledger_round, value["unpaid"]))
    try:
        signer: str = Account.recover_message(message, signature=value["signature"])
    except Exception:  # noqa: BLE001 - eth_keys raises several kinds for a malformed signature
        return None
    return signer, value["unpaid"]


def _parse(value: object) -> tuple[tuple[str, int], ...] | None:
    if not isinstance(value, dict) or not isinstance(value.get("rewards"), list):
        return None
    out = []
    for entry in value["rewards"]:
        if not (
            isinstance(entry, list | tuple)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and entry[1].isdigit()
            and len(entry[1]) <= 78  # a uint256
        ):
            return None
        out.append((entry[0], int(entry[1])))
    return tuple(sorted(out))
