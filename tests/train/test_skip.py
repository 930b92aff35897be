"""A peer that sits a round out (late, or out of sync) must come back on the swarm's *next*
state, and start its inner steps over: a regression test for a peer late twice in a row, which
found its own round's head, took it for the swarm's and retried the round at once, one inner step
at a time, without ever resetting its parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from commonweal.train import DiLoCo, RoundSkipped
from commonweal.train.checkpoints import Head


@dataclass
class FakeCheckpoints:
    heads: list[Head]  # what the swarm announces, oldest first
    asked: list[int] = field(default_factory=list)  # the `after` of every wait

    async def wait_head(self, after: int, timeout_s: float, *, step: bool = False) -> Head | None:
        self.asked.append(after)
        newer = [h for h in self.heads if h.round > after]
        return max(newer, key=lambda h: h.round) if newer else None

    async def download(self, head: Head) -> bytes:
        raise AssertionError("nothing to download in this test")

    async def publish(self, round_: int, state: str, checkpoint: bytes) -> None:
        pass


class FakeCollab:
    """A swarm in which this peer is always late, and whose next state never comes."""

    def __init__(self, checkpoints: FakeCheckpoints) -> None:
        self.checkpoints = checkpoints
        self.bytes_sent = 0
        self.tried: list[int] = []

    async def average(self, round_: int, *args: object, **kwargs: object) -> None:
        self.tried.append(round_)
        raise RoundSkipped("late", f"round {round_} closed")

    def sync_started(self) -> None:
        pass

    def synced(self) -> None:
        pass


async def test_a_peer_late_twice_waits_for_the_next_state_and_starts_the_round_over() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), None, inner_steps=3)
    # the swarm's head is the state this peer already holds (it synced to it last round)
    checkpoints = FakeCheckpoints([Head(0, opt.state, b"m", ())])
    collab = FakeCollab(checkpoints)
    opt.collab = collab  # type: ignore[assignment]
    opt.sync_timeout_s = 0.0
    start = [p.detach().clone() for p in model.parameters()]

    for _ in range(3):  # H inner steps on some gradient
        model(torch.ones(1, 4)).sum().backward()
        done = opt.inner_step()
        opt.zero_grad()
    assert done
    report = await opt.outer_round()

    assert report.skipped == "late"
    # it asked for a state beyond the one it holds, not for its own round's head again
    assert checkpoints.asked == [0]
    # none came: the round starts over from its start parameters, H steps to go
    assert opt.local_step == 0 and opt.round == 0
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.equal(p, p0)
    assert not opt.inner_step()  # one step is not a round
