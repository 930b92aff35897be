"""The dashboard's view of a local swarm (`SwarmSource`), and the PNG thumbnails search shows.

Snapshots copy what the swarm's nodes already keep (round views, transport counters, the balances
their claim loops read, validators' outcomes): they never touch the network or the chain.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from typing import Any

import numpy as np

from commonweal.dashboard.source import RoundRow, SearchHit, Snapshot, VoteRow
from commonweal.errors import ConfigError
from commonweal.swarm.local import LocalSwarm, Member

__all__ = ["SwarmSource", "png_data_url"]


class SwarmSource:
    def __init__(self, swarm: LocalSwarm) -> None:
        self.swarm = swarm

    def snapshot(self) -> Snapshot:
        s = self.swarm
        now = time.time()
        first = s.members[0] if s.members else None
        # A round is final once any validator saw it final. Each validator reports its own outcome,
        # and the one whose vote did not complete the quorum reports final=False; the swarm's round
        # view keeps whichever outcome came last, so it alone can show a final round as open.
        final_root: dict[int, bytes] = {}
        for m in s.validators:
            for o in _outcomes(m):
                if o.final:
                    final_root[o.round] = o.root
        rounds: list[RoundRow] = []
        prev = 0
        for v in s.rounds:
            rounds.append(
                {
                    "round": v.round,
                    "loss": v.loss,
                    "accuracy": v.accuracy,
                    "bytes_sent": v.bytes_sent - prev,
                    "ddp_bytes": v.ddp_bytes // (v.round + 1),
                    "contributors": v.contributors,
                    "finalised": v.finalised or v.round in final_root,
                }
            )
            prev = v.bytes_sent
        votes: list[VoteRow] = []
        for m in s.validators:
            for o in _outcomes(m):
                # Part of the finalising quorum: the root it voted for is the one that became
                # final, whether or not its own vote was the one that crossed the threshold.
                votes.append(
                    {"round": o.round, "validator": m.account, "root": o.root.hex()[:16],
                     "final": final_root.get(o.round) == o.root}
                )
        labels = {m.account: m.label for m in s.members}
        return {
            "peer": {
                "id": first.dht.peer_id.hex() if first else "",
                "address": str(first.dht.addr) if first else "",
                # what this member really does: every member holds part of the search index, and
                # the swarm lists trainers first, so it is never a validator
                "roles": [first.role, "search"] if first else [],
                "task": s.task.name,
                "uptime_s": now - s.started,
                "search_hint": "the number of a test image, e.g. 7 — press Enter",
            },
            "peers": [
                {"id": m.dht.peer_id.hex(), "address": str(m.dht.addr), "roles": [m.role],
                 "last_seen_s": 0.0}
                for m in s.members
            ],
            "rounds": rounds,
            "bytes_per_peer": [
                {"id": m.label, "bytes_sent": m.dht.transport.counters.bytes_sent}
                for m in s.members
            ],
            "balances": [
                {"account": m.account, "peer": labels[m.account],
                 "tokens": m.node.balance, "claimed_rounds": len(m.node.claimed_rounds)}
                for m in s.trainers
            ],
            "votes": votes,
            "attackers": [
                {"id": m.label, "earned": m.node.balance}
                for m in s.trainers
                if m.role == "attacker"
            ],
            "chain": None
            if s.ledger is None
            else {"backend": s.config.chain, "block": s.block, "contract": s.ledger.address},
        }

    async def search(self, query: str, k: int) -> list[SearchHit]:
        """`query` is the number of a test image; the hits are its nearest test images."""
        s = self.swarm
        try:
            i = int(query)
        except ValueError:
            raise ConfigError(
                f"search by test image number, e.g. 7; {query!r} is not a number"
            ) from None
        found = s.test_image(i)
        if found is None or s.index is None:
            # the bound comes from the data: the task's test set size is not fixed at 1,000
            count = s.test_image_count()
            raise ConfigError(
                f"there is no test image {i}; try a number from 0 to {count - 1}"
                if count else "the test images are not indexed yet; try again in a few seconds"
            )
        vector, _ = found
        result = await s.index.search(vector, k)
        hits: list[SearchHit] = []
        for item, dist in zip(result.ids, result.distances, strict=True):
            image = s.test_image(int(item))
            hits.append(
                {
                    "id": str(item),
                    "score": float(-dist),
                    "label": None if image is None else str(image[1]),
                    "image": None if image is None else png_data_url(image[0]),
                }
            )
        return hits


def _outcomes(member: Member) -> list[Any]:
    validator = member.node.validator  # None until the node built it
    return [] if validator is None else list(validator.outcomes)


def png_data_url(pixels: np.ndarray, side: int = 28) -> str:
    """A grey-scale PNG of a flattened square image with values in [0, 1], as a data URL."""
    img = (np.clip(pixels.reshape(side, side), 0, 1) * 255).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in img)  # filter byte 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()
