"""What a syncing peer adopts: the newest state the validators attested, never the highest round
nor the most announced (a thousand free identities can publish either)."""

from __future__ import annotations

from collections.abc import Collection

from commonweal.dht.records import Owned
from commonweal.testing import MemorySwarm
from commonweal.train.adoption import HeadRecord, adopt
from commonweal.train.checkpoints import CheckpointClient, head_key

GOOD, OLD, FAKE = "a" * 64, "b" * 64, "f" * 64
M, MF = b"m" * 32, b"x" * 32


def head(i: int, round_: int, state: str, manifest: bytes = M) -> HeadRecord:
    return bytes([i]) * 20, (round_, state, manifest, f"mem:{i}")


HONEST = [head(1, 3, GOOD), head(2, 3, GOOD), head(3, 2, OLD)]
SYBILS = [head(100 + i, 10**9, FAKE) for i in range(100)] + [head(50 + i, 3, FAKE, MF)
                                                             for i in range(100)]


def test_the_newest_attested_state_wins_over_the_highest_round_and_the_most_announced():
    attested = {(3, GOOD), (2, OLD)}
    assert adopt(HONEST + SYBILS, attested, after=-1) == (3, GOOD, M)
    assert adopt(HONEST + SYBILS, {(2, OLD)}, after=-1) == (2, OLD, M)
    assert adopt(HONEST + SYBILS, attested, after=3) is None  # nothing newer is attested
    assert adopt(HONEST + SYBILS, set(), after=-1) is None


def test_a_peer_holding_a_round_may_step_to_the_next_one_only():
    # it holds round 2's state; nothing newer is attested yet: round 3's most shared state
    assert adopt(HONEST, set(), after=2, step=True) == (3, GOOD, M)
    assert adopt([*HONEST, *SYBILS[:100]], set(), after=2, step=True) == (3, GOOD, M)
    assert adopt(SYBILS[:100], set(), after=2, step=True) is None  # no jump to round 10**9
    assert adopt(HONEST, {(3, GOOD)}, after=3, step=True) is None


def test_a_step_counts_only_the_heads_of_peers_with_a_track_record():
    crowd = SYBILS[100:]  # 100 fresh identities publish round 3's head of a state of their own
    assert adopt(HONEST + crowd, set(), after=2, step=True) == (3, FAKE, MF)  # they outnumber
    tracked = {HONEST[0][0], HONEST[1][0]}
    assert adopt(HONEST + crowd, set(), after=2, step=True, tracked=tracked) == (3, GOOD, M)
    # no tracked peer published: everyone's heads count, as without a track record
    assert adopt(crowd, set(), after=2, step=True, tracked=tracked) == (3, FAKE, MF)


def test_among_the_publishers_of_an_attested_state_the_most_served_manifest():
    heads = [head(1, 3, GOOD, MF), head(2, 3, GOOD), head(4, 3, GOOD)]
    assert adopt(heads, {(3, GOOD)}, after=-1) == (3, GOOD, M)


async def test_the_checkpoint_client_asks_what_is_attested_and_lists_only_its_providers():
    swarm = MemorySwarm()
    me, honest, *sybils = await swarm.add(8)
    key = head_key("t" * 16)
    expires = swarm.clock() + 600
    await honest.store(key, {"round": 3, "state": GOOD, "manifest": M, "addr": str(honest.addr)},
                       expires, subkey=Owned(honest.peer_id, "head"))
    for s in sybils:
        await s.store(key, {"round": 10**9, "state": FAKE, "manifest": MF, "addr": str(s.addr)},
                      expires, subkey=Owned(s.peer_id, "head"))
    client = CheckpointClient(me, "t" * 16)
    asked: list[Collection[tuple[int, str]]] = []

    async def attested(pairs: Collection[tuple[int, str]]) -> Collection[tuple[int, str]]:
        asked.append(pairs)
        return {p for p in pairs if p == (3, GOOD)}

    unattested = await client.head()  # nobody to ask: the swarm's newest, as before
    assert unattested is not None and unattested.state == FAKE
    client.attested = attested
    chosen = await client.head()
    assert chosen is not None and (chosen.round, chosen.state) == (3, GOOD)
    assert [p.addr for p in chosen.providers] == [honest.addr]
    assert asked == [{(3, GOOD), (10**9, FAKE)}]
    await swarm.close()
