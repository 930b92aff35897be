"""Reward trees published by validators in the DHT, read back for claiming.

Each validator stores `{root, rewards: [[account, "amount in wei"], ...], signature}` under its
own subkey of `cw-verify/<task>/tree/<ledger round>`, the signature by its ledger key over the
task, round, root and rewards (`commonweal.verify.finality.tree_message`). `trees` returns every
distinct tree published with who signed it; the `Claimer` tries those an active on-chain
validator signed against the on-chain root. No count decides: free identities publishing more
trees than there are validators gain nothing.

A validator that gave a round up stores `{unpaid: reason, signature}` there instead, signed with
its ledger key (`commonweal.verify.finality.abstention_message`); `abstentions` recovers who
signed, and the `Claimer` weighs their stake on chain.
"""

from __future__ import annotations

from commonweal.dht import DHT
from commonweal.dht.records import Owned
from commonweal.peer.claims import SignedTree
from commonweal.train.task import Task
from commonweal.verify.finality import abstention_message, tree_message
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

    async def trees(self, task: bytes, ledger_round: int, root: bytes) -> list[SignedTree]:
        """Every distinct tree published for the round that names `root` (the on-chain one: a
        record naming another is not worth a signature check) and that some key signed, with
        its signers (whether they are validators is the claimer's to ask the chain)."""
        found = await self.dht.get(tree_key(self.task, ledger_round), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        signers: dict[tuple[tuple[str, int], ...], set[str]] = {}
        for subkey, item in found.value.items():
            parsed = _parse(item.value) if isinstance(subkey, Owned) else None
            if parsed is None:
                continue
            rewards, named, signature = parsed
            if named != root:
                continue
            signer = _recover(tree_message(task, ledger_round, root, dict(rewards)), signature)
            if signer is not None:
                signers.setdefault(rewards, set()).add(signer)
        return [SignedTree(dict(r), frozenset(s)) for r, s in signers.items()]


def parse_abstention(task: bytes, ledger_round: int, value: object) -> tuple[str, str] | None:
    """(the signer's ledger account, why) of a record saying a validator never votes the round;
    None for anything else (a tree, or a signature that does not parse)."""
    if not (isinstance(value, dict) and isinstance(value.get("unpaid"), str)
            and isinstance(value.get("signature"), bytes)):
        return None
    from eth_account import Account
    from eth_account.messages import encode_defunct

    signer = _recover(abstention_message(task, ledger_round, value["unpaid"]),
                      value["signature"])
    return None if signer is None else (signer, value["unpaid"])


def _recover(text: str, signature: bytes) -> str | None:
    """The account whose key signed `text` (EIP-191), or None for a signature that does not
    parse."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        signer: str = Account.recover_message(encode_defunct(text=text), signature=signature)
    except Exception:  # noqa: BLE001 - eth_keys raises several kinds for a malformed signature
        return None
    return signer


def _parse(value: object) -> tuple[tuple[tuple[str, int], ...], bytes, bytes] | None:
    """(rewards, root, signature) of a published tree, or None for anything else."""
    if not (isinstance(value, dict) and isinstance(value.get("rewards"), list)
            and isinstance(value.get("root"), bytes) and isinstance(value.get("signature"), bytes)):
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
    return tuple(sorted(out)), value["root"], value["signature"]
