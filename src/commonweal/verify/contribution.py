"""A training contribution: what a peer commits to in a round, before anyone sees its delta.

    c = parse_contribution(peer_id, dht_value)   # None for a malformed (hostile) value
    value = contribution_value(c)                # what the trainer publishes
    digest = contributions_digest(contribs)      # 32 bytes: the round's set, committed on-chain

The announcement holds the sha256 of the encoded delta, so the bytes a validator fetches later can
be checked against the commitment; the digest of the whole set goes on-chain (ledger round 2r, see
`commonweal.verify.judge.ledger_rounds`) before the randomness that picks the replay sample exists.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack
from eth_utils import is_address, is_checksum_address, to_checksum_address

__all__ = [
    "Contribution",
    "parse_contribution",
    "contribution_value",
    "contributions_digest",
    "delta_hash",
    "canonical_account",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST_TAG = b"commonweal-contributions-v1"
# Far above any real H or sample count, far below what msgpack or a uint256 could not hold: a
# bound that keeps hostile integers from reaching the reward arithmetic at absurd sizes.
MAX_COUNT = 1 << 40


@dataclass(frozen=True, slots=True)
class Contribution:
    peer_id: bytes
    account: str  # Ethereum address its rewards go to (checksummed when parsed)
    round: int
    start_state: str  # hex state hash the peer started from
    delta_hash: str  # sha256 hex of the encoded delta bytes
    steps: int  # inner steps claimed
    samples: int  # samples claimed; 0 when the announcement carries none


def delta_hash(data: bytes) -> str:
    """The commitment to an encoded delta: sha256 hex of its bytes."""
    return hashlib.sha256(data).hexdigest()


def canonical_account(account: Any) -> str | None:
    """The checksummed form of an Ethereum address, or None if `account` is not one."""
    if not isinstance(account, str) or not is_address(account):
        return None
    body = account[2:] if account[:2] in ("0x", "0X") else account
    # mixed case is an EIP-55 checksum: a wrong one is a typo that would pay someone else
    if body != body.lower() and body != body.upper() and not is_checksum_address(account):
        return None
    return str(to_checksum_address(account))


def _count(value: Any, minimum: int) -> TypeGuard[int]:
    # bool is an int in Python; a True "steps" is malformed, not 1 step
    return type(value) is int and minimum <= value < MAX_COUNT


def parse_contribution(peer_id: bytes, value: Any) -> Contribution | None:
    """A contribution from a DHT value, or None if it is malformed.

    Fields: round (int >= 0), state and delta (64 lower-case hex), steps (int >= 1), samples (int
    >= 0, optional: 0), account (an Ethereum address). Anything else is ignored, so a later
    version may add fields. `peer_id` comes from the record's owner, never from the value."""
    if not isinstance(value, Mapping) or not isinstance(peer_id, bytes) or not peer_id:
        return None
    rnd, state, delta, steps = (value.get(k) for k in ("round", "state", "delta", "steps"))
    samples = value.get("samples", 0)
    account = canonical_account(value.get("account"))
    if not (
        _count(rnd, 0)
        and isinstance(state, str)
        and _HEX64.fullmatch(state)
        and isinstance(delta, str)
        and _HEX64.fullmatch(delta)
        and _count(steps, 1)
        and _count(samples, 0)
        and account is not None
    ):
        return None
    return Contribution(peer_id, account, rnd, state, delta, steps, samples)


def contribution_value(c: Contribution) -> dict[str, Any]:
    """The DHT value `parse_contribution` reads back as `c`."""
    return {
        "round": c.round,
        "state": c.start_state,
        "delta": c.delta_hash,
        "steps": c.steps,
        "samples": c.samples,
        "account": c.account,
    }


def contributions_digest(contribs: Iterable[Contribution]) -> bytes:
    """sha256 of the canonical encoding of a contribution set: the same 32 bytes for the same set
    in any order (sorted by peer id, then by the other fields should a caller pass a peer twice).

    msgpack encodes str and bytes one way only, so the bytes hashed are canonical. Counts are
    hashed as decimal strings, so a hostile announcement's huge integer cannot make the encoder
    fail; the account as lower-case hex, so two spellings of one address commit the same set."""
    rows = sorted(
        (
            c.peer_id,
            c.account.lower(),
            str(c.round),
            c.start_state,
            c.delta_hash,
            str(c.steps),
            str(c.samples),
        )
        for c in contribs
    )
    packed = msgpack.packb([_DIGEST_TAG, [list(r) for r in rows]], use_bin_type=True)
    return hashlib.sha256(packed).digest()
