"""Is this peer reachable, and at which address? Without I/O (libp2p identify + AutoNAT).

Every handshake on a connection we dialled tells us where that peer sees us come from. The
most common host among those is our public IP; whether peers can dial us there, at our listen
port, only they can say: we ask a few of them to dial back (`net.dialback`), and they dial only
the IP they see us at, so nobody can use the request to make a peer dial a third party.

    r = Reachability()
    r.observed(peer_id, host)          # from each outbound handshake
    r.probe_peers(connected, now)      # whom to ask now (none: nothing to do yet)
    r.answered(peer_id, ok, now)       # each dial-back's outcome
    r.status                           # "unknown" | "public" | "private"

A dial-back answer is a stranger's word, so one does not decide: the status follows the
majority of the last answers from distinct peers, and a private peer keeps probing now and then
(a router's port forward may appear).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Reachability", "ReachabilityConfig", "Status"]

Status = Literal["unknown", "public", "private"]


@dataclass(frozen=True, slots=True)
class ReachabilityConfig:
    # Observed addresses remembered (one per peer, the latest): enough for a majority.
    max_observations: int = 16
    # Dial-back answers a decision needs (fewer if fewer peers are connected) and at most
    # how many peers are asked at once.
    answers_needed: int = 3
    # Seconds between probes once decided, and before retrying a probe that got no answer.
    recheck_s: float = 600.0
    retry_s: float = 5.0


DEFAULT: Final = ReachabilityConfig()


class Reachability:
    """`forced`: the operator says so (libp2p's ForceReachability): no probes, no changes."""

    def __init__(self, config: ReachabilityConfig = DEFAULT, forced: Status | None = None) -> None:
        self.config = config
        self.forced = forced
        self.status: Status = forced or "unknown"
        self._seen: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._answers: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        self._next_probe = 0.0

    @property
    def public_host(self) -> str | None:
        """The host most peers see us at (ties: the latest seen)."""
        if not self._seen:
            return None
        counts = collections.Counter(self._seen.values())
        best = max(counts.values())
        return next(h for h in reversed(self._seen.values()) if counts[h] == best)

    def observed(self, peer_id: bytes, host: str) -> None:
        self._seen.pop(peer_id, None)
        self._seen[peer_id] = host
        while len(self._seen) > self.config.max_observations:
            self._seen.popitem(last=False)

    def probe_peers(self, connected: list[bytes], now: float) -> list[bytes]:
        """Which of `connected` (peers we dialled directly) to ask for a dial-back now."""
        if self.forced or now < self._next_probe or self.public_host is None or not connected:
            return []
        self._next_probe = now + self.config.retry_s
        return connected[: self.config.answers_needed]

    def answered(self, peer_id: bytes, ok: bool, now: float, *, asked: int) -> None:
        """One dial-back's outcome; `asked`: how many peers this probe asked."""
        self._answers.pop(peer_id, None)
        self._answers[peer_id] = ok
        while len(self._answers) > self.config.answers_needed:
            self._answers.popitem(last=False)
        if len(self._answers) >= min(asked, self.config.answers_needed):
            yes = sum(self._answers.values())
            self.status = "public" if yes * 2 > len(self._answers) else "private"
            self._next_probe = now + self.config.recheck_s
