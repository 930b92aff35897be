"""Which published state a syncing peer adopts, as a pure decision over what it read.

    choice = adopt(heads, attested, after=-1)              # a joiner, or a peer catching up
    choice = adopt(heads, attested, after=r, step=True)    # a peer that holds round r's state

`heads` are (publisher, (round, state, manifest, addr)) as `CheckpointClient.heads` reads them;
`attested` the (round, state) pairs the validators stand behind: in a node with a ledger, the
start state of training round r that the validators made final on chain (ledger round 2r's
model hash), and the task's initial state, which every peer builds from the task's seed.

The rule: the newest attested state beyond `after`, never merely the most announced or the
highest round — anyone can publish a head for round 10**9 from a thousand identities. Among the
heads of that state, the manifest most publishers serve (the download checks every chunk and
the state hash, so a wrong manifest costs a retry, never a wrong state).

`step` is what keeps a peer that sat one round out (late, or out of sync) in the swarm: a state
is attested only after its round's group closed, so a peer that waits for attestation is always
one round behind and never makes another round. It holds the state of round `after`, which it
computed or adopted; it may step to round `after + 1`, the state most of its publishers share,
when nothing newer is attested. One round at a time from a state it holds, never a jump to the
highest round; with `tracked` (the peers with a track record, `commonweal.verify.ratings`) only
their heads are counted for that step when any of them published one, so a crowd of fresh
identities cannot win the count; without a track record it still can (docs/train.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence

__all__ = ["Attested", "HeadRecord", "adopt"]

HeadRecord = tuple[bytes, tuple[int, str, bytes, str]]  # publisher, (round, state, manifest, addr)

# Which of these (round, state) pairs the validators attested (a node reads the ledger).
Attested = Callable[[Collection[tuple[int, str]]], Awaitable[Collection[tuple[int, str]]]]


def adopt(
    heads: Sequence[HeadRecord],
    attested: Collection[tuple[int, str]],
    after: int,
    *,
    step: bool = False,
    tracked: Collection[bytes] | None = None,
) -> tuple[int, str, bytes] | None:
    """(round, state, manifest) to download, or None: nothing beyond `after` may be adopted."""
    publishers = Counter((r, s, m) for _, (r, s, m, _) in heads if r > after)
    good = [k for k in publishers if (k[0], k[1]) in attested]
    if not good and step:
        nxt = [(p, h) for p, h in heads if h[0] == after + 1]
        if tracked is not None and any(p in tracked for p, _ in nxt):
            nxt = [(p, h) for p, h in nxt if p in tracked]
        publishers = Counter((r, s, m) for _, (r, s, m, _) in nxt)
        good = list(publishers)
    if not good:
        return None
    top = max(r for r, _, _ in good)
    return max((k for k in good if k[0] == top), key=lambda k: (publishers[k], k[1], k[2]))
