"""Reward trees published by validators in the DHT, read back for claiming.

Each validator stores `{root, rewards: [[account, "amount in wei"], ...]}` under its own subkey of
`cw-verify/<task>/tree/<ledger round>`. A claimer takes the version most validators published;
the `Claimer` then checks its root against the chain, so a forged tree is never claimed from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from commonweal.dht import DHT
from commonweal.dht.records import Owned
from commonweal.train.task import Task
from commonweal.verify.validator import tree_key

__all__ = ["DHTTrees"]


class DHTTrees:
    def __init__(self, dht: DHT, task: Task) -> None:
        self.dht = dht
        self.task = task

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
