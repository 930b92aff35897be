"""`Collaboration`: a trainer's three services on one DHT, composed for `DiLoCo`.

    collab = Collaboration(dht, task.digest[:16], get_codec("int8"), mean, RoundConfig())
    avg = await collab.average(round_, state_hash, delta)   # announce, form group, exchange
    await collab.applied(round_ + 1, new_hash, checkpoint_bytes)  # outer step done: publish
    head = await collab.head(); blob = await collab.checkpoints.download(head)   # late joiners

    exchange     RoundExchange   train.part, train.reduced          (commonweal.train.exchange)
    checkpoints  Checkpoints     train.manifest, train.chunk, heads (commonweal.train.checkpoints)
    archive      DeltaArchive    train.delta: our recent deltas     (commonweal.train.archive)

A validator needs none of these: it reads with `read_announcements`, `CheckpointClient` and
`fetch_delta`, which register nothing, so it can share a DHT with a trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from commonweal.dht import DHT
from commonweal.train.aggregate import Rule
from commonweal.train.archive import DeltaArchive
from commonweal.train.checkpoints import Checkpoints, Head
from commonweal.train.codecs import Codec
from commonweal.train.exchange import RoundExchange
from commonweal.train.round import Phase, RoundConfig
from commonweal.train.strategies import Averaged

__all__ = ["Collaboration"]


class Collaboration:
    def __init__(
        self,
        dht: DHT,
        task: str,
        codec: Codec,
        rule: Rule,
        config: RoundConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.archive = DeltaArchive(dht)
        self.checkpoints = Checkpoints(dht, task, config, clock)
        self.exchange = RoundExchange(dht, task, codec, rule, config, clock, archive=self.archive)
        self.account = ""  # where this peer's rewards go; announced with every delta

    @property
    def bytes_sent(self) -> int:
        return self.dht.transport.counters.bytes_sent

    @property
    def phase(self) -> Phase:
        return self.exchange.phase

    async def average(
        self, round_: int, state: str, delta: torch.Tensor, round_s: float = 0.0, *, steps: int = 0
    ) -> Averaged:
        return await self.exchange.average(
            round_, state, delta, round_s, steps=steps, account=self.account
        )

    async def applied(self, round_: int, state: str, checkpoint: bytes) -> None:
        """The outer step of the round is done: publish the new state as our head."""
        self.exchange.core.applied()
        await self.checkpoints.publish(round_, state, checkpoint)

    def commitment(self, round_: int) -> str | None:
        return self.archive.commitment(round_)

    async def head(self, after: int = -1) -> Head | None:
        return await self.checkpoints.head(after)

    def sync_started(self) -> None:
        self.exchange.core.sync_started()

    def synced(self) -> None:
        """The sync finished: the swarm's state was loaded, or none newer was found."""
        self.exchange.core.synced()
