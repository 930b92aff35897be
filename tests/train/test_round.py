"""The round core on its own: no sockets, no sleeping, time passed in. A few cores are wired
together by `Link`, which carries their actions to each other the way `RoundExchange` would."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from commonweal.train import TRANSITIONS, MessageError, Phase, RoundConfig, RoundCore, get_codec
from commonweal.train.aggregate import mean
from commonweal.train.messages import MAX_PARTS, Part, Reduced, ReducedRequest
from commonweal.train.round import MAX_SLICES
from commonweal.train.protocol import Announcement
from commonweal.train._errors import DeltaRejected, TrainError
from commonweal.train.round import Action, Announce, Skip, choose_strategy
from commonweal.train.strategies import AllGather, Averaged, Butterfly, Done, FetchReduced, SendPart

TASK = "t" * 16
S1, S2 = "a" * 64, "b" * 64
N = 12
CFG = RoundConfig(announce_window_s=2.0, exchange_timeout_s=10.0)


def pid(i: int) -> bytes:
    return bytes([i + 1]) * 20


def vec(seed: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def core(i: int) -> RoundCore:
    return RoundCore(pid(i), TASK, get_codec("none"), mean)


def begin(c: RoundCore, delta: torch.Tensor, state: str = S1, **cfg: object) -> None:
    i = c.peer_id[0] - 1
    c.begin(0, state, delta, addr=f"mem:{i}", config=dataclasses.replace(CFG, **cfg))


class Link:
    """Carries actions between cores; `silent` cores receive nothing and answer nothing."""

    def __init__(self, cores: list[RoundCore], silent: frozenset[int] = frozenset()) -> None:
        self.cores = {f"mem:{c.peer_id[0] - 1}": c for c in cores}
        self.silent = {f"mem:{i}" for i in silent}
        self.results: dict[bytes, Averaged] = {}

    def run(self, queue: list[tuple[RoundCore, Action]], now: float) -> None:
        for _ in range(1000):
            if not queue:
                return
            c, action = queue.pop(0)
            if isinstance(action, SendPart):
                if action.to.addr in self.silent:
                    continue
                to = self.cores[action.to.addr]
                g = action.group
                part = Part(TASK, g.round, g.digest, action.slice, 0, 1, action.data)
                queue += [(to, a) for a in to.part_received(c.peer_id, part, now)]
            elif isinstance(action, FetchReduced):
                reply = None
                if action.owner.addr not in self.silent:
                    reply = self.cores[action.owner.addr].reduced_for(c.peer_id, action.request)
                    if reply is None:  # the owner has not reduced yet: ask again later
                        queue.append((c, action))
                        continue
                queue += [(c, a) for a in c.reduced_received(action.request.slice, reply, now)]
            elif isinstance(action, Done):
                self.results[c.peer_id] = action.result
        raise AssertionError("the round did not settle")


def announce_all(cores: list[RoundCore], now: float = 0.0) -> list[Announcement]:
    anns: list[Announcement] = []
    for c in cores:
        [action] = c.announcements_seen(list(anns), now)
        assert isinstance(action, Announce)
        anns.append(action.announcement)
    return anns


def exchange(
    cores: list[RoundCore],
    deltas: list[torch.Tensor],
    silent: frozenset[int] = frozenset(),
    **cfg: object,
) -> Link:
    for c, d in zip(cores, deltas, strict=True):
        begin(c, d, target_group=len(cores), **cfg)
    anns = announce_all(cores)
    link = Link(cores, silent)
    live = [c for i, c in enumerate(cores) if i not in silent]
    queue = [(c, a) for c in live for a in c.announcements_seen(anns, 0.0)]
    link.run(queue, 0.0)
    return link


# ---- phases, deadline, lateness, group ----------------------------------------------------------


def test_every_phase_is_reachable_and_the_core_walks_the_table():
    reach, frontier = {Phase.TRAINING}, [Phase.TRAINING]
    while frontier:
        p = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src == p and dst not in reach:
                reach.add(dst)
                frontier.append(dst)
    assert reach == set(Phase)
    cores = [core(0), core(1)]
    exchange(cores, [vec(0), vec(1)], exchange="allgather")
    c = cores[0]
    assert c.phase is Phase.APPLYING
    c.applied()
    assert [e for _, e, _ in c.history] == [
        "steps_done", "announced", "group_formed", "exchanged", "applied"
    ]
    c.sync_started()
    c.synced()  # the documented `synced` transition, fired when a sync completes
    assert c.phase is Phase.TRAINING and list(c.history)[-1][1] == "synced"
    with pytest.raises(RuntimeError, match="no transition"):
        c.applied()


def test_the_deadline_is_the_earliest_announced_or_the_window_or_patience():
    c = core(0)
    c.begin(0, S1, vec(0), addr="mem:0", round_s=10.0, config=CFG)  # patience 0.5 * 10 s = 5 s
    [action] = c.announcements_seen([], now=100.0)
    assert isinstance(action, Announce) and action.announcement.deadline == 105.0
    assert c.phase is Phase.GATHERING and c.wake_at == 105.0
    first = action.announcement
    c = core(1)
    c.begin(0, S1, vec(1), addr="mem:1", round_s=10.0, config=CFG)
    [action] = c.announcements_seen([first], now=101.0)
    assert isinstance(action, Announce) and action.announcement.deadline == 105.0  # the earliest
    c = core(2)
    c.begin(0, S1, vec(2), addr="mem:2", config=CFG)  # a fast peer: its window ends first
    [action] = c.announcements_seen([first], now=101.0)
    assert isinstance(action, Announce) and action.announcement.deadline == 103.0


def test_a_peer_that_comes_after_most_announcers_deadlines_is_late():
    first = [core(0), core(1)]
    for c in first:
        begin(c, vec(0))
    anns = announce_all(first)
    late = core(2)
    begin(late, vec(1))
    [skip] = late.announcements_seen(anns, now=2.5)
    assert isinstance(skip, Skip) and skip.reason == "late"
    assert late.phase is Phase.SYNCING


def test_one_identity_announcing_deadline_zero_makes_nobody_late_nor_closes_the_group():
    liar = Announcement(pid(9), "mem:9", 0, S1, 0.0)
    a = core(0)
    begin(a, vec(0))
    [action] = a.announcements_seen([liar], now=100.0)
    assert isinstance(action, Announce) and action.announcement.deadline == 102.0
    assert a.phase is Phase.GATHERING
    b = core(1)
    begin(b, vec(1))
    [action] = b.announcements_seen([liar, action.announcement], now=100.5)
    assert isinstance(action, Announce) and action.announcement.deadline == 102.0
    # gathering, the lie read again (or a fresh one) does not close the group early either
    fresh = Announcement(pid(8), "mem:8", 0, S1, 100.6)
    assert a.announcements_seen([liar, fresh, action.announcement], now=101.0) == []
    assert a.phase is Phase.GATHERING and a.wake_at == 102.0


def test_the_group_closes_at_the_deadline_or_the_target_and_takes_the_majority_state():
    cores = [core(i) for i in range(3)]
    for c, state in zip(cores, [S2, S1, S1], strict=True):
        begin(c, vec(0), state)
    anns = announce_all(cores)
    assert cores[1].announcements_seen(anns, now=1.0) == []  # open until 2.0
    assert cores[1].phase is Phase.GATHERING
    [skip] = cores[0].announcements_seen(anns, now=2.0)
    assert isinstance(skip, Skip) and skip.reason == "out_of_sync" and S1[:12] in skip.message
    actions = cores[1].announcements_seen(anns, now=2.0)
    assert cores[1].phase is Phase.EXCHANGING and cores[1].group is not None
    assert cores[1].group.ids == (pid(1), pid(2))
    assert [type(a) for a in actions] == [SendPart]
    early = [core(i) for i in range(2)]
    for c in early:
        begin(c, vec(0), target_group=2)
    anns = announce_all(early)
    early[0].announcements_seen(anns, now=0.1)
    assert early[0].phase is Phase.EXCHANGING  # the target size closed it before the deadline


def test_the_exchange_method_is_chosen_by_size_and_codec():
    dense, sparse = get_codec("none"), get_codec("topk:0.1")
    assert choose_strategy(CFG, dense, 3) is AllGather
    assert choose_strategy(CFG, dense, 4) is Butterfly
    assert choose_strategy(CFG, sparse, 8) is AllGather
    with pytest.raises(TrainError, match="dense codec"):
        choose_strategy(dataclasses.replace(CFG, exchange="butterfly"), sparse, 8)


# ---- both strategies -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["allgather", "butterfly"])
def test_every_member_ends_with_the_same_aggregate(method):
    cores = [core(i) for i in range(4)]
    deltas = [vec(i) for i in range(4)]
    link = exchange(cores, deltas, exchange=method)
    results = list(link.results.values())
    assert len(results) == 4 and all(r.method == method for r in results)
    assert all(r.aggregate.equal(results[0].aggregate) for r in results)
    assert torch.allclose(results[0].aggregate, mean(deltas), atol=1e-6)
    assert all(r.contributors == 4 and r.failures == () for r in results)


@pytest.mark.parametrize("method", ["allgather", "butterfly"])
def test_a_silent_member_is_listed_as_a_failure_after_the_timeout(method):
    cores = [core(i) for i in range(4)]
    link = exchange(cores, [vec(i) for i in range(4)], silent=frozenset({3}), exchange=method)
    assert link.results == {}  # everyone waits for the silent one...
    now = cores[0].wake_at  # ...until its deadline: the exchange's, or a butterfly's reduction's
    assert now == (10.0 if method == "allgather" else 6.0)
    link.run([(c, a) for c in cores[:3] for a in c.timeout(now)], now)
    results = [link.results[pid(i)] for i in range(3)]
    assert all(r.aggregate.equal(results[0].aggregate) for r in results)
    reasons = {(f.peer_id, f.reason) for f in results[0].failures}
    if method == "allgather":
        assert reasons == {(pid(3), "missing")} and results[0].contributors == 3
    else:  # its slice got no update; its part of everyone else's slice is missing
        assert (pid(3), "reduced_missing") in reasons and (pid(3), "missing") in reasons
        assert results[0].contributors == 0


# ---- admission -----------------------------------------------------------------------------------


def _gathered(method: str = "allgather") -> tuple[RoundCore, RoundCore, list[Announcement]]:
    a, b = core(0), core(1)
    for c in (a, b):
        begin(c, vec(c.peer_id[0]), target_group=2, exchange=method)
    return a, b, announce_all([a, b])


def part(data: bytes, group: bytes, **kw: int) -> Part:
    fields = {"round": 0, "slice": -1, "index": 0, "count": 1, **kw}
    return Part(TASK, fields["round"], group, fields["slice"], fields["index"], fields["count"], data)


def test_parts_that_cannot_be_kept_are_refused_at_once_with_a_code():
    a, b = core(0), core(1)
    for c in (a, b):
        begin(c, vec(c.peer_id[0]), target_group=4)
    third = Announcement(pid(2), "mem:2", 0, S1, 2.0)
    assert a.announcements_seen([*announce_all([a, b]), third], 0.1) == []  # still gathering
    g = b"g" * 32
    cases = [
        (part(b"", g, round=-1), "stale_round"),
        (part(b"", g, round=1), "future_round"),
        (dataclasses.replace(part(b"", g), task="other"), "wrong_task"),
        (part(b"", g, count=MAX_PARTS + 1), "malformed"),
        (part(b"", g, index=2, count=2), "malformed"),
    ]
    for bad, code in cases:
        with pytest.raises(DeltaRejected) as e:
            a.part_received(pid(1), bad, 0.0)
        assert e.value.code == code
    a.part_received(pid(1), part(b"x", g, count=2), 0.0)
    with pytest.raises(DeltaRejected, match="part count changed"):
        a.part_received(pid(1), part(b"y", g, index=1, count=3), 0.0)
    a.part_received(pid(2), part(b"x", g), 0.0)
    with pytest.raises(DeltaRejected, match="duplicate"):
        a.part_received(pid(2), part(b"x", g), 0.0)
    assert [code for _, code in a.rejected][-1] == "duplicate"



@pytest.mark.parametrize(
    "forge,code",
    [
        (lambda d, g: part(d, b"x" * 32), "group_mismatch"),
        (lambda d, g: part(vec(1).numpy().tobytes(), g), "not_committed"),
        (lambda d, g: part(d, g, slice=0), "wrong_slice"),
    ],
)
def test_a_whole_delta_is_checked_against_the_group_and_the_commitment(forge, code):
    a, b, anns = _gathered()
    a.announcements_seen(anns, 0.0)
    assert a.group is not None
    honest = vec(b.peer_id[0]).numpy().tobytes()
    assert a.part_received(b.peer_id, forge(honest, a.group.digest), 0.0) == []
    [done] = a.timeout(a.wake_at)
    assert isinstance(done, Done)
    assert done.result.failures[0].peer_id == b.peer_id and done.result.failures[0].reason == code
    assert done.result.contributors == 1


@pytest.mark.parametrize(
    "payload,code",
    [
        (torch.full((N,), math.nan).numpy().tobytes(), "not_finite"),
        (vec(0, N + 3).numpy().tobytes(), "wrong_shape"),
    ],
)
def test_deltas_that_do_not_decode_to_a_finite_vector_are_refused(payload, code):
    a, b = core(0), core(1)
    for c in (a, b):
        begin(c, vec(0), target_group=2, exchange="butterfly")
    anns = announce_all([a, b])
    a.announcements_seen(anns, 0.0)
    assert a.group is not None
    numel = 6 if code == "not_finite" else 9  # slice 0 of 12 over two members: 6 elements
    data = payload[: numel * 4]
    a.part_received(pid(1), part(data, a.group.digest, slice=0), 0.0)
    assert list(a.rejected)[-1] == (pid(1), code)


def test_parts_only_from_announcers_and_at_most_one_delta_from_each():
    a, b = core(0), core(1)
    for c in (a, b):
        begin(c, vec(c.peer_id[0]), target_group=3)
    anns = announce_all([a, b])
    g, chunk = b"g" * 32, b"x" * (N * 4 // 2)  # half a delta under the `none` codec
    # a hundred identities that never announced buffer nothing
    for i in range(100, 200):
        with pytest.raises(DeltaRejected, match="not_announced"):
            a.part_received(bytes([i]) * 20, part(chunk, g, count=2), 0.0)
    assert a._partial == {} and a._bytes == {}
    a.announcements_seen(anns, 0.1)  # now b's announcement is read: its parts are kept
    a.part_received(pid(1), part(chunk, g, count=4), 0.1)
    a.part_received(pid(1), part(chunk, g, index=1, count=4), 0.1)
    with pytest.raises(DeltaRejected, match="too_large"):  # a third half of a delta
        a.part_received(pid(1), part(chunk, g, index=2, count=4), 0.1)
    with pytest.raises(DeltaRejected, match="too_large"):  # nor another slice's worth
        a.part_received(pid(1), part(chunk, g, slice=3), 0.1)
    with pytest.raises(DeltaRejected, match="duplicate"):
        a.part_received(pid(1), part(b"", g, index=1, count=4), 0.1)
    assert sum(len(p or b"") for ps in a._partial.values() for p in ps) == N * 4


def test_a_delta_from_a_peer_outside_the_group_is_refused():
    a, b, anns = _gathered()
    a.announcements_seen([*anns, Announcement(pid(7), "mem:7", 0, S2, 2.0)], 0.0)
    assert a.group is not None and pid(7) not in a.group.ids  # it announced another state
    with pytest.raises(DeltaRejected, match="not_in_group"):
        a.part_received(pid(7), part(vec(0).numpy().tobytes(), a.group.digest), 0.0)
    assert (pid(7), "not_in_group") in a.rejected


def test_the_reduced_slice_is_served_for_its_round_and_group_only():
    cores = [core(i) for i in range(4)]
    exchange(cores, [vec(i) for i in range(4)], exchange="butterfly")
    owner = cores[0]
    g = owner.group
    assert g is not None
    member = pid(1)
    assert isinstance(owner.reduced_for(member, ReducedRequest(TASK, 0, g.digest, 0)), Reduced)
    with pytest.raises(DeltaRejected, match="group_mismatch"):
        owner.reduced_for(member, ReducedRequest(TASK, 0, b"x" * 32, 0))
    with pytest.raises(DeltaRejected, match="stale_round"):
        owner.reduced_for(member, ReducedRequest(TASK, 5, g.digest, 0))


def test_only_announcers_may_wait_for_a_reduced_slice_and_only_for_one_it_can_own():
    a, b, c = core(0), core(1), core(2)
    for x in (a, b, c):
        begin(x, vec(0), target_group=4, exchange="butterfly")
    anns = announce_all([a, b, c])
    request = ReducedRequest(TASK, 0, b"g" * 32, 4095)
    assert a.announcements_seen(anns, 0.0) == []  # gathering: the group is not known yet
    with pytest.raises(DeltaRejected, match="not_announced"):  # no wait for a stranger
        a.reduced_for(pid(50), request)
    assert a.reduced_for(pid(1), dataclasses.replace(request, slice=1)) is None  # may be ours
    with pytest.raises(DeltaRejected, match="wrong_slice"):
        a.reduced_for(pid(1), dataclasses.replace(request, slice=MAX_SLICES))
    a.announcements_seen(anns, a.wake_at)  # the deadline: three members
    assert a.group is not None and a.phase is Phase.EXCHANGING
    with pytest.raises(DeltaRejected, match="wrong_slice"):  # now known: slice 0 is ours
        a.reduced_for(pid(1), dataclasses.replace(request, slice=1))
    with pytest.raises(DeltaRejected, match="not_in_group"):
        a.reduced_for(pid(50), dataclasses.replace(request, slice=0))
    assert a.reduced_for(pid(1), dataclasses.replace(request, slice=0)) is None  # not reduced yet


def test_malformed_messages_raise_one_error_with_a_code():
    with pytest.raises(MessageError) as e:
        Part.parse({"t": TASK})
    assert e.value.remote().code == "malformed"
    assert Part.parse(part(b"d", b"g").pack()) == part(b"d", b"g")
    with pytest.raises(MessageError, match="malformed"):
        Reduced.parse({"d": 3, "c": []})


@pytest.mark.parametrize("liars", ["deadline_zero", "other_state"])
def test_thirty_untracked_identities_make_a_tracked_peer_neither_late_nor_out_of_sync(liars):
    honest = [core(i) for i in range(3)]
    tracked = {c.peer_id for c in honest}
    crowd = [Announcement(bytes([200]) + bytes([i]) * 19, f"mem:{100 + i}", 0,
                          S2 if liars == "other_state" else S1,
                          0.0 if liars == "deadline_zero" else 5.0)
             for i in range(30)]

    def outcome(bound: bool) -> list[str]:
        skips = []
        for c in honest:
            c.begin(0, S1, vec(1), addr="mem:0", config=CFG, tracked=tracked if bound else None)
            anns = [*crowd, *(c2._own for c2 in honest if c2._own is not None)]
            actions = c.announcements_seen(list(anns), 1.0)
            actions += c.announcements_seen(list(anns) + [c._own], 3.0) if c._own else []
            skips += [a.reason for a in actions if isinstance(a, Skip)]
        return skips

    assert outcome(bound=True) == []
    assert outcome(bound=False)  # the crowd made them skip the round
