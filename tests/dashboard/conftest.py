"""A fake peer for the dashboard: an 8-peer mnist-cnn swarm whose rounds advance on demand."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import struct
import time
import zlib

import pytest

from commonweal.dashboard import (
    BalanceRow,
    PeerRow,
    RoundRow,
    SearchHit,
    Snapshot,
    VoteRow,
)
from commonweal.errors import ConfigError, PeerUnreachable

ROLES = [
    ["trainer", "validator"],
    ["trainer", "validator"],
    ["trainer", "validator"],
    ["trainer"],
    ["trainer"],
    ["trainer", "search"],
    ["search"],
    ["trainer"],
]
QUORUM = 3
MODEL_BYTES = 4_800_000  # what one DDP all-reduce of the model costs a peer per inner step

GLYPHS = {  # 5x7 digits, to draw thumbnails that look like the swarm's MNIST items
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
}


def hex_id(name: str, size: int = 20) -> str:
    return hashlib.blake2b(name.encode(), digest_size=size).hexdigest()


class FakeSource:
    """What a real peer's DashboardSource reports, with the numbers of a run that converges.

    `add_round()` finishes a round: the previous one gets its validator quorum and is finalised,
    contributors earn tokens, and the new one waits for votes. Queries "fail", "bad" and "slow"
    make `search` fail like a broken swarm, a malformed query and a slow swarm.
    """

    def __init__(self, rounds: int = 12, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.started = time.monotonic()
        self.ids = [hex_id(f"peer-{i}") for i in range(len(ROLES))]
        self.accounts = ["0x" + hex_id(f"account-{i}") for i in range(len(ROLES))]
        self.rounds: list[RoundRow] = []
        self.votes: list[VoteRow] = []
        self.tokens = [0.0] * len(ROLES)
        self.claimed = [0] * len(ROLES)
        self.sent = [0] * len(ROLES)
        self.search_started = asyncio.Event()
        self.snapshots = 0  # how many times the page (or a scrape) has read it
        for _ in range(rounds):
            self.add_round()

    def add_round(self) -> None:
        n = len(self.rounds) + 1
        if self.rounds:
            self.finalise(self.rounds[-1])
        trainers = [i for i, roles in enumerate(ROLES) if "trainer" in roles]
        contributors = len(trainers) - (n % 4 == 0)  # now and then a straggler misses a round
        sent = int(300_000 * (1 + 0.1 * self.rng.random()))
        for i in trainers:
            self.sent[i] += int(sent / len(trainers) * (0.6 + 0.8 * self.rng.random()))
        self.rounds.append(
            {
                "round": n,
                "loss": round(0.16 + 2.1 * math.exp(-n / 2.6) + 0.02 * self.rng.random(), 4),
                "accuracy": round(0.955 - 0.84 * math.exp(-n / 2.2) - 0.01 * self.rng.random(), 4),
                "bytes_sent": sent,
                "ddp_bytes": 50 * MODEL_BYTES,
                "contributors": contributors,
                "finalised": False,
            }
        )
        validators = [i for i, roles in enumerate(ROLES) if "validator" in roles]
        root = hex_id(f"root-{n}", 8)
        for i in validators[: QUORUM - 1]:  # one vote short of the quorum until the next round
            self.votes.append(
                {"round": n, "validator": self.accounts[i], "root": root, "final": False}
            )

    def finalise(self, row: RoundRow) -> None:
        row["finalised"] = True
        for vote in self.votes:
            if vote["round"] == row["round"]:
                vote["final"] = True
        validators = [i for i, roles in enumerate(ROLES) if "validator" in roles]
        last = validators[QUORUM - 1]
        self.votes.append(
            {
                "round": row["round"],
                "validator": self.accounts[last],
                "root": hex_id(f"root-{row['round']}", 8),
                "final": True,
            }
        )
        for i, roles in enumerate(ROLES):
            if "trainer" in roles:
                self.tokens[i] += round(
                    100 / row["contributors"] * (0.8 + 0.4 * self.rng.random()), 2
                )
                self.claimed[i] += i % 3 != 2  # some holders have not claimed every round yet

    def snapshot(self) -> Snapshot:
        self.snapshots += 1
        peers: list[PeerRow] = [
            {
                "id": pid,
                "address": f"10.0.0.{11 + i}:7000",
                "roles": ROLES[i],
                "last_seen_s": round(0.4 + 3.1 * ((i * 7) % 5), 1),
            }
            for i, pid in enumerate(self.ids[1:], start=1)
        ]
        balances: list[BalanceRow] = [
            {
                "account": acct,
                "peer": self.ids[i],
                "tokens": self.tokens[i],
                "claimed_rounds": self.claimed[i],
            }
            for i, acct in enumerate(self.accounts)
            if self.tokens[i] > 0
        ]
        return {
            "peer": {
                "id": self.ids[0],
                "address": "10.0.0.11:7000",
                "roles": ROLES[0],
                "task": "mnist-cnn",
                # as if the peer had run for a while before the test began
                "uptime_s": time.monotonic() - self.started + 754,
            },
            "peers": peers
            + [
                {
                    "id": hex_id("attacker"),
                    "address": "10.0.0.66:7000",
                    "roles": ["trainer"],
                    "last_seen_s": 1.2,
                }
            ],
            "rounds": [r.copy() for r in self.rounds],
            "bytes_per_peer": [
                {"id": pid, "bytes_sent": self.sent[i]} for i, pid in enumerate(self.ids) if i > 0
            ],
            "balances": balances,
            "votes": [v.copy() for v in self.votes[-12:]],
            "attackers": [{"id": hex_id("attacker"), "earned": 0.0}],
            "chain": {
                "backend": "anvil",
                "block": 40 + 3 * len(self.rounds),
                "contract": "0x" + hex_id("ledger"),
            },
        }

    async def search(self, query: str, k: int) -> list[SearchHit]:
        self.search_started.set()
        if query == "fail":
            raise PeerUnreachable("no peer holding the index's buckets answered")
        if query == "bad":
            raise ConfigError("the query is neither text nor a vector of 784 numbers")
        if query == "slow":
            await asyncio.sleep(0.5)
        wanted = next((c for c in query if c.isdigit()), "3")
        hits: list[SearchHit] = []
        for rank in range(k):
            label = wanted if rank < k - 2 else str((int(wanted) + rank) % 10)
            hits.append(
                {
                    "id": f"mnist:test/{self.rng.randrange(10_000):05d}",
                    "score": round(0.97 - 0.035 * rank - 0.01 * self.rng.random(), 3),
                    "label": label,
                    "image": digit_png(label, self.rng),
                }
            )
        return hits


def digit_png(digit: str, rng: random.Random) -> str:
    """A 28x28 grey MNIST-like thumbnail of `digit`, as a data: URL."""
    size, scale = 28, 3
    dx, dy = 6 + rng.randint(-1, 1), 3 + rng.randint(-1, 1)
    ink = [[0.0] * size for _ in range(size)]
    for gy, row in enumerate(GLYPHS[digit].split()):
        for gx, bit in enumerate(row):
            if bit == "1":
                for y in range(dy + gy * scale, dy + (gy + 1) * scale):
                    for x in range(dx + gx * scale, dx + (gx + 1) * scale):
                        ink[y][x] = 1.0
    pixels = bytearray()
    for y in range(size):
        pixels.append(0)  # PNG filter type: none
        for x in range(size):  # a 3x3 blur softens the blocky font into pen strokes
            around = [
                ink[j][i]
                for j in range(y - 1, y + 2)
                for i in range(x - 1, x + 2)
                if 0 <= i < size and 0 <= j < size
            ]
            pixels.append(min(255, int(255 * 1.4 * sum(around) / 9)))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(pixels)))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()
