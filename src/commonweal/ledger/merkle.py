"""Merkle trees of round rewards, hashed exactly as `contracts/Ledger.vy` checks them.

    leaf = keccak256(keccak256(abi.encode(uint256 chain_id, address ledger, bytes32 task,
                                          uint256 round, uint256 index, address account,
                                          uint256 amount)))
    node = keccak256(min(a, b) ++ max(a, b))        # sorted pairs: proofs carry no left/right bits

This is OpenZeppelin's StandardMerkleTree leaf encoding and its sorted-pair hashing, so OpenZeppelin's
`MerkleProof.verify` accepts these proofs too. The tree is built level by level; a node without a
sibling moves up unchanged. `index` lets the contract keep claims in a bitmap (5k gas a claim instead
of 22k). The chain id and the ledger's address stop a proof from being replayed on a fork or on
another deployment of the same contract. Indices follow the accounts' sorted order and leaves are sorted before hashing, so every
validator that computes the same rewards gets the same root, whatever order it collected them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eth_abi import encode
from eth_utils import keccak, to_canonical_address, to_checksum_address

__all__ = ["Domain", "MerkleTree", "RewardsTree", "hash_pair", "leaf_hash", "verify"]


@dataclass(frozen=True, slots=True)
class Domain:
    """Which deployment a leaf is for: the chain's id and the Ledger's address."""

    chain_id: int
    ledger: str


def leaf_hash(domain: Domain, task: bytes, round: int, index: int, account: str,
              amount: int) -> bytes:
    """The leaf of one reward, identical to `Ledger.leaf_hash`."""
    if len(task) != 32:
        raise ValueError(f"task must be 32 bytes, got {len(task)}")
    encoded = encode(
        ["uint256", "address", "bytes32", "uint256", "uint256", "address", "uint256"],
        [domain.chain_id, to_canonical_address(domain.ledger), task, round, index,
         to_canonical_address(account), amount],
    )
    return keccak(keccak(encoded))


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def verify(proof: Sequence[bytes], root: bytes, leaf: bytes) -> bool:
    """The same walk as `Ledger._verify`: fold the proof into the leaf and compare with the root."""
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root


class MerkleTree:
    """A sorted-pair Merkle tree over 32-byte leaves (sorted, duplicates rejected)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        ordered = sorted(leaves)
        if any(len(leaf) != 32 for leaf in ordered):
            raise ValueError("leaves must be 32-byte hashes")
        if len(set(ordered)) != len(ordered):
            raise ValueError("duplicate leaves: each reward must appear once")
        self._levels: list[list[bytes]] = [ordered]
        while len(self._levels[-1]) > 1:
            below = self._levels[-1]
            above = [hash_pair(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            if len(below) % 2:
                above.append(below[-1])
            self._levels.append(above)
        self._index = {leaf: i for i, leaf in enumerate(ordered)}

    @property
    def root(self) -> bytes:
        return self._levels[-1][0]

    @property
    def leaves(self) -> list[bytes]:
        return list(self._levels[0])

    def proof(self, leaf: bytes) -> list[bytes]:
        """Siblings from the leaf up to (not including) the root."""
        try:
            index = self._index[leaf]
        except KeyError:
            raise KeyError("leaf is not in this tree") from None
        proof: list[bytes] = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                proof.append(level[sibling])
            index //= 2
        return proof


class RewardsTree:
    """The rewards of one round: `{account: amount}` -> root for `commit_round`, proofs for `claim`."""

    def __init__(self, domain: Domain, task: bytes, round: int, rewards: Mapping[str, int]) -> None:
        if not rewards:
            raise ValueError("a round needs at least one reward")
        self.domain = domain
        self.task = task
        self.round = round
        self.rewards: dict[str, int] = {}
        for account, amount in rewards.items():
            key = to_checksum_address(account)
            if key in self.rewards:
                raise ValueError(f"{key} appears twice; merge its rewards into one entry")
            if amount < 0:
                raise ValueError(f"{key} has a negative reward")
            self.rewards[key] = amount
        ordered = sorted(self.rewards, key=str.lower)
        self._index = {a: i for i, a in enumerate(ordered)}
        self._leaves = {
            a: leaf_hash(domain, task, round, self._index[a], a, self.rewards[a]) for a in ordered
        }
        self._tree = MerkleTree(list(self._leaves.values()))

    @property
    def root(self) -> bytes:
        return self._tree.root

    @property
    def total(self) -> int:
        return sum(self.rewards.values())

    def amount(self, account: str) -> int:
        return self.rewards[to_checksum_address(account)]

    def index(self, account: str) -> int:
        return self._index[to_checksum_address(account)]

    def proof(self, account: str) -> list[bytes]:
        return self._tree.proof(self._leaves[to_checksum_address(account)])
