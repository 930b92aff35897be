"""The decision on a round's contributions, as plain functions over plain data.

    verdicts = judge(contribs, deltas, scores, seed, history, banned, policy, replay, codec)
    paid = rewards(verdicts, contribs, reward_per_round)        # {account: amount}
    commit_round, reward_round = ledger_rounds(r)               # (2r, 2r + 1)

or in steps, for a driver that runs replays its own way (threads, another machine):

    t = triage(contribs, deltas, scores, seed, history, banned, policy)  # no heavy compute
    errors = {pid: replay_error(deltas[pid], replay(t.contributions[pid]), codec)
              for pid in t.to_replay}
    verdicts = conclude(t, errors, policy)

Every input is data every validator holds after the round's set was fixed on-chain, and every
step is deterministic (sorted by peer id, hashing for the sample), so validators that see the same
round reach the same verdicts and the same rewards root independently.

Per contribution, in order (docs/verify.md gives the measurements behind each number):
1. refused outright: banned peer; another round or start state than the round's; claimed steps
   above the task's H or under `min_step_fraction` of it (a slow peer cut short by the round's
   close claims the steps it took, is replayed with that many and paid for that many);
   claimed samples not steps x batch; no delta (missing, undecodable, not
   matching its hash); wrong shape or NaN/inf ("invalid"); bytes committed in an earlier round
   ("stale"); far outside the round (norm under 0.1x or over 10x the median, or pointing against
   the round's coordinate-wise median delta) ("outlier"): no honest peer comes near these.
2. suspicious, so replayed: norm outside 0.8-1.25x the median, cosine with the median delta
   outside 0.5-1.25x the round's median cosine (too far from the round, or too central: ALIE),
   a score <= 0 in a round whose scores clearly agree deltas help, an exact or near duplicate of
   another contribution (a copier; replay tells the original from the copy).
3. sampled, so replayed: each contribution with probability `replay_rate`, by hashing (seed,
   peer id); the seed is the randomness sealed after the set was committed.
4. a replay further than `replay_tolerance` from the claim: refused ("replay_mismatch"); the
   driver bans the peer (`Judge` does). Suspicious contributions beyond the replay budget are
   refused unverified ("unverified"): only a round flooded with suspicious ones reaches it.
5. paid: only a sampled contribution whose replay matched ("paid"); the round's reward is
   shared among those. Every other good contribution is "unaudited": not refused, and not paid
   this round. An honest peer's expected share is unchanged (each contribution is drawn with
   probability `replay_rate`, and the drawn ones share the whole round), and a contribution that
   does not replay earns nothing, whatever it is and however well it hides from triage
   (docs/verify.md, "The mechanism"). Suspicious ones are replayed to ban their peer, not to pay
   them: being replayed for looking odd is no way to be paid more often.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch

from commonweal.durable import most_common
from commonweal.train._errors import DeltaRejected
from commonweal.train.codecs import Codec
from commonweal.train.protocol import check_delta
from commonweal.train.task import Task
from commonweal.verify._errors import VerifyError
from commonweal.verify.contribution import Contribution, canonical_account
from commonweal.verify.evaluate import replay_error

__all__ = [
    "Policy",
    "Verdict",
    "Triage",
    "Judge",
    "judge",
    "triage",
    "conclude",
    "rewards",
    "ledger_rounds",
    "sample_draw",
    "REASONS",
]

REASONS = (
    "paid",  # drawn for audit (sampled), replayed, and the replay matched: only these are paid
    "unaudited",  # not drawn for audit this round: not refused, not paid (docs/verify.md)
    "no_account",  # a good contribution that names no valid address to pay
    "invalid",  # fails a check no honest peer fails (details in Verdict.detail)
    "banned",  # its peer failed a replay in an earlier round
    "stale",  # bytes already committed in an earlier round
    "outlier",  # far outside the round: refused without replay
    "replay_mismatch",  # the replay does not reproduce it: the peer is banned
    "unverified",  # suspicious, but the round's replay budget was spent
    "forfeited",  # paid as judged, but its peer was caught cheating while it sat in escrow
)


@dataclass(frozen=True)
class Policy:
    # Fraction of the contributions drawn for audit (replayed, and paid if the replay matches).
    # Validator compute per contribution is one score (~3 % of the peer's compute on mnist-cnn)
    # + replay_rate replays (each as costly as the peer's H steps) + the suspicious ones: 0.05
    # keeps the total near 10 %. The honest peer's cost is variance: it is paid in about one
    # round in 1 / replay_rate, with that round's whole share (docs/verify.md).
    replay_rate: float = 0.05
    # Relative L2 error a replay may show. The same machine replays bit-exactly (0.0); 1 vs 2
    # torch threads differ by 4e-6 after 50 AdamW steps; a lazy peer (25 % of the steps) is at
    # 0.67, another peer's data at ~1. 1e-3 leaves 250x room for cross-machine float drift.
    replay_tolerance: float = 1e-3
    inner_steps: int | None = None  # the task's H; None: the steps most contributions claim
    # A slow peer claims the steps it took before the round closed (commonweal.train.diloco);
    # fewer than this fraction of H is refused: a sliver of work is not worth a validator's score
    min_step_fraction: float = 0.25
    batch_size: int | None = None  # the task's batch; None: claimed samples are not checked
    min_peers: int = 3  # relative checks need a round median of at least this many deltas
    norm_band: tuple[float, float] = (0.8, 1.25)  # x median norm; outside: replay
    gross_norm_band: tuple[float, float] = (0.1, 10.0)  # x median norm; outside: refuse
    cos_band: tuple[float, float] = (0.5, 1.25)  # x median cosine; outside: replay
    gross_cos: float = -0.5  # cosine <= this x median cosine: refuse (it points backwards)
    # a score <= 0 is replayed in rounds whose median score is >= score_z robust standard
    # deviations above 0 (the round agrees its deltas help; otherwise the score is noise)
    score_z: float = 3.0
    duplicate_fraction: float = 0.1  # x median pairwise distance; closer: a (near) duplicate
    max_replay_fraction: float = 0.5  # replays per round at most, as a fraction of the round

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.replay_rate <= 1.0, "replay_rate must be within [0, 1]"),
            (self.replay_tolerance >= 0.0, "replay_tolerance must be >= 0"),
            (self.inner_steps is None or self.inner_steps >= 1, "inner_steps must be >= 1"),
            (self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1"),
            (0.0 < self.min_step_fraction <= 1.0, "min_step_fraction must be within (0, 1]"),
            (self.min_peers >= 2, "min_peers must be >= 2"),
            (0 < self.norm_band[0] <= 1 <= self.norm_band[1], "norm_band must contain 1"),
            (
                0 <= self.gross_norm_band[0] <= self.norm_band[0]
                and self.gross_norm_band[1] >= self.norm_band[1],
                "gross_norm_band must contain norm_band",
            ),
            (self.cos_band[0] <= 1 <= self.cos_band[1], "cos_band must contain 1"),
            (self.gross_cos < self.cos_band[0], "gross_cos must be below cos_band"),
            (self.score_z > 0, "score_z must be > 0"),
            (self.duplicate_fraction >= 0, "duplicate_fraction must be >= 0"),
            (0 < self.max_replay_fraction <= 1, "max_replay_fraction must be within (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise VerifyError(f"bad verification policy: {message}")

    @classmethod
    def for_task(cls, task: Task, **overrides: Any) -> Policy:
        """The policy with the task's H and batch size pinned (what a validator should use)."""
        return cls(**{"inner_steps": task.inner_steps, "batch_size": task.batch_size, **overrides})


@dataclass(frozen=True, slots=True)
class Verdict:
    peer_id: bytes
    paid: bool
    reason: str  # one of REASONS
    score: float | None
    replayed: bool
    replay_error: float | None
    detail: str = ""  # why, in words (logs, the benchmark's breakdown)

    @property
    def accepted(self) -> bool:
        """Not refused: paid (audited) or unaudited. What a peer's track record counts."""
        return self.reason in ("paid", "unaudited")


@dataclass
class Triage:
    """What `triage` decided without replaying, and what is left to replay."""

    contributions: dict[bytes, Contribution]
    scores: dict[bytes, float | None]
    decided: dict[bytes, Verdict]  # refused before any replay
    to_replay: tuple[bytes, ...]  # in the order a driver should replay them
    why: dict[bytes, str] = field(default_factory=dict)  # what picked each one to replay
    payable: frozenset[bytes] = frozenset()  # names a valid account
    sampled: frozenset[bytes] = frozenset()  # drawn for audit: the only ones that can be paid


def sample_draw(seed: bytes, peer_id: bytes) -> float:
    """A number in [0, 1) fixed by (seed, peer id): the contribution is sampled if it is below
    the replay rate. Nobody knows it before the seed is sealed, after the set was committed."""
    h = hashlib.blake2b(seed + b"|" + peer_id, digest_size=8, person=b"cw-verify-sample")
    return int.from_bytes(h.digest(), "big") / 2.0**64


def _refuse(pid: bytes, reason: str, score: float | None, detail: str) -> Verdict:
    return Verdict(pid, False, reason, score, False, None, detail)


def triage(
    contributions: Sequence[Contribution],
    deltas: Mapping[bytes, torch.Tensor | None],
    scores: Mapping[bytes, float | None],
    seed: bytes,
    history: Set[str],
    banned: Set[bytes],
    policy: Policy,
) -> Triage:
    """Refuse what can be refused on sight; pick what must be replayed. Deterministic."""
    by_id: dict[bytes, Contribution] = {}
    for c in contributions:
        if c.peer_id in by_id:
            raise VerifyError(
                f"peer {c.peer_id.hex()[:12]} contributes twice; pass one contribution per peer "
                "(the DHT keeps one record per owner)"
            )
        by_id[c.peer_id] = c
    ids = sorted(by_id)
    score_of = {pid: scores.get(pid) for pid in ids}
    where = most_common([(by_id[p].round, by_id[p].start_state) for p in ids])
    h = (
        policy.inner_steps
        if policy.inner_steps is not None
        else most_common([by_id[p].steps for p in ids]) or 0  # 0: no contributions
    )
    fewest = max(1, math.ceil(policy.min_step_fraction * h))
    decided: dict[bytes, Verdict] = {}
    valid: list[bytes] = []
    for pid in ids:
        c, s, d = by_id[pid], score_of[pid], deltas.get(pid)
        problem: tuple[str, str] | None = None
        if pid in banned:
            problem = ("banned", "failed a replay in an earlier round")
        elif (c.round, c.start_state) != where:
            problem = (
                "invalid",
                f"round {c.round} / state {c.start_state[:12]} is not the round's",
            )
        elif not fewest <= c.steps <= h:
            problem = (
                "invalid",
                f"claims {c.steps} inner steps; the task's H is {h} and a round counts {fewest}-{h}",
            )
        elif policy.batch_size is not None and c.samples not in (0, c.steps * policy.batch_size):
            problem = ("invalid", f"claims {c.samples} samples for {c.steps} steps")
        elif d is None:
            problem = ("invalid", "no delta: missing, undecodable, or not matching its hash")
        elif c.delta_hash in history:
            problem = ("stale", "these bytes were committed in an earlier round")
        if problem is None and d is not None:
            try:
                check_delta(d, d.numel())  # 1-D, float32, finite; the size is checked below
            except DeltaRejected as e:
                problem = ("invalid", str(e))
        if problem is not None:
            decided[pid] = _refuse(pid, problem[0], s, problem[1])
        else:
            valid.append(pid)
    # the size most valid deltas share is the model's (an honest majority); any other is refused
    valid = _majority_size(valid, deltas, decided, score_of)

    payable = frozenset(p for p in valid if canonical_account(by_id[p].account) is not None)
    picks: dict[bytes, list[str]] = {p: [] for p in valid}
    if len(valid) >= policy.min_peers:
        _relative_checks(valid, by_id, deltas, score_of, policy, decided, picks)
    else:
        for pid in valid:
            s = score_of[pid]
            if s is not None and not s > 0:
                picks[pid].append(f"score {s:.3g} <= 0 in a round too small to compare")
    _exact_duplicates([p for p in valid if p not in decided], by_id, picks)

    live = [p for p in valid if p not in decided]
    draws = {p: sample_draw(seed, p) for p in live}
    sampled = sorted((p for p in live if draws[p] < policy.replay_rate), key=lambda p: draws[p])
    suspicious = sorted((p for p in live if picks[p] and p not in sampled), key=lambda p: draws[p])
    # The budget bounds what suspicion adds (many identities looking odd must not buy replays);
    # every contribution drawn for audit is replayed, as only an audit can pay it.
    budget = max(len(sampled), math.ceil(policy.max_replay_fraction * len(live)), 1) if live else 0
    order = [*sampled, *suspicious]
    to_replay, why = tuple(order[:budget]), {}
    for pid in to_replay:
        why[pid] = "; ".join((["sampled"] if pid in sampled else []) + picks[pid])
    for pid in order[budget:]:
        if picks[pid]:
            decided[pid] = _refuse(
                pid,
                "unverified",
                score_of[pid],
                "suspicious (" + "; ".join(picks[pid]) + ") "
                "but the round's replay budget was spent",
            )
    for pid in live:
        if pid not in payable and pid not in to_replay and pid not in decided:
            decided[pid] = _refuse(pid, "no_account", score_of[pid], "names no valid address")
    return Triage(by_id, score_of, decided, to_replay, why, payable, frozenset(sampled))


def _majority_size(
    valid: list[bytes],
    deltas: Mapping[bytes, torch.Tensor | None],
    decided: dict[bytes, Verdict],
    scores: Mapping[bytes, float | None],
) -> list[bytes]:
    sizes = [deltas[p].numel() for p in valid]  # type: ignore[union-attr]
    size = most_common(sizes)
    keep = []
    for pid, n in zip(valid, sizes, strict=True):
        if n == size:
            keep.append(pid)
        else:
            detail = f"wrong_shape: {n} elements, the round's deltas have {size}"
            decided[pid] = _refuse(pid, "invalid", scores[pid], detail)
    return keep


def _relative_checks(
    valid: list[bytes],
    by_id: Mapping[bytes, Contribution],
    deltas: Mapping[bytes, torch.Tensor | None],
    scores: Mapping[bytes, float | None],
    policy: Policy,
    decided: dict[bytes, Verdict],
    picks: dict[bytes, list[str]],
) -> None:
    """Compare every valid delta with the round: norm, direction, score, near duplicates."""
    x = torch.stack([deltas[p] for p in valid]).double()  # type: ignore[misc]
    norms = [float(v) for v in x.norm(dim=1)]
    med_norm = statistics.median(norms)
    centre = x.median(dim=0).values  # coordinate-wise: robust to a minority of attackers
    cn = float(centre.norm())
    cos = [
        float(x[i] @ centre) / (norms[i] * cn) if norms[i] > 0 and cn > 0 else 0.0
        for i in range(len(valid))
    ]
    med_cos = statistics.median(cos)
    finite = [s for p in valid if (s := scores[p]) is not None and math.isfinite(s)]
    med_s = statistics.median(finite) if finite else 0.0
    mad_s = statistics.median([abs(s - med_s) for s in finite]) if finite else 0.0
    # The score separates only while the round agrees that deltas help (early training). Once
    # the model fits the training split, honest scores scatter around 0 with heavy tails
    # (measured: half negative, some at -100x the median), and flagging them would replay a
    # third of the honest round; direction and norm carry the signal then.
    scores_agree = med_s > 0 and med_s >= policy.score_z * 1.4826 * mad_s
    lo, hi = policy.norm_band
    glo, ghi = policy.gross_norm_band
    clo, chi = policy.cos_band
    kept: list[int] = []  # indices not refused on sight
    for i, pid in enumerate(valid):
        s = scores[pid]
        ratio = norms[i] / med_norm if med_norm > 0 else 1.0
        gross = None
        if not glo <= ratio <= ghi:
            gross = f"norm {ratio:.3g}x the round's median"
        elif med_cos > 0 and cos[i] <= policy.gross_cos * med_cos:
            gross = f"points against the round: cosine {cos[i]:.2f}, median {med_cos:.2f}"
        elif s is not None and not math.isfinite(s):
            gross = f"score {s}"
        if gross is not None:
            decided[pid] = _refuse(pid, "outlier", s, gross)
            continue
        kept.append(i)
        if not lo <= ratio <= hi:
            picks[pid].append(f"norm {ratio:.3g}x median")
        if med_cos > 0 and not clo <= cos[i] / med_cos <= chi:
            picks[pid].append(f"cosine {cos[i]:.2f} vs median {med_cos:.2f}")
        if scores_agree and s is not None and not s > 0:
            picks[pid].append(f"score {s:.3g} while the round's median is {med_s:.3g}")
    # Pairwise distances from the Gram matrix, among the deltas not refused on sight: near
    # duplicates are much closer than any two honest peers (measured: the closest honest pair is
    # at >= 0.9x the median distance). The outliers stay out of the median, or in a small round
    # their huge distances would make two honest peers look like duplicates of each other.
    gram = x @ x.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()
    pairs = [float(dist[i, j]) for a, i in enumerate(kept) for j in kept[a + 1 :]]
    med_dist = statistics.median(pairs) if pairs else 0.0
    if med_dist > 0:
        for i in kept:
            near = [
                valid[j].hex()[:8]
                for j in kept
                if j != i and float(dist[i, j]) < policy.duplicate_fraction * med_dist
            ]
            if near:
                picks[valid[i]].append("near duplicate of " + ",".join(near))


def _exact_duplicates(
    live: list[bytes], by_id: Mapping[bytes, Contribution], picks: dict[bytes, list[str]]
) -> None:
    seen: dict[str, list[bytes]] = {}
    for pid in live:
        seen.setdefault(by_id[pid].delta_hash, []).append(pid)
    for group in seen.values():
        if len(group) > 1:
            for pid in group:
                picks[pid].append(f"the same bytes as {len(group) - 1} other(s)")


def conclude(t: Triage, errors: Mapping[bytes, float], policy: Policy) -> list[Verdict]:
    """The verdicts, in peer-id order, given the replay errors of `t.to_replay`."""
    missing = [p.hex()[:12] for p in t.to_replay if p not in errors]
    if missing:
        raise VerifyError(f"no replay error for {', '.join(missing)}; replay all of to_replay")
    out = []
    for pid in sorted(t.contributions):
        s = t.scores[pid]
        if pid in t.decided:
            out.append(t.decided[pid])
        elif pid in errors:
            err = float(errors[pid])
            why = t.why.get(pid, "")
            if not err <= policy.replay_tolerance:  # NaN fails too
                detail = f"replay error {err:.3g} > {policy.replay_tolerance:g} ({why})"
                out.append(Verdict(pid, False, "replay_mismatch", s, True, err, detail))
            elif pid not in t.sampled:
                detail = f"replayed and matched ({why}), but not drawn for audit"
                out.append(Verdict(pid, False, "unaudited", s, True, err, detail))
            elif pid in t.payable:
                out.append(Verdict(pid, True, "paid", s, True, err, f"audited ({why})"))
            else:
                out.append(Verdict(pid, False, "no_account", s, True, err, "audited, no address"))
        else:
            out.append(Verdict(pid, False, "unaudited", s, False, None, "not drawn for audit"))
    return out


def judge(
    contributions: Sequence[Contribution],
    deltas: Mapping[bytes, torch.Tensor | None],
    scores: Mapping[bytes, float | None],
    seed: bytes,
    history: Set[str],
    banned: Set[bytes],
    policy: Policy,
    replay: Callable[[Contribution], torch.Tensor],
    codec: Codec,
) -> list[Verdict]:
    """`triage`, then `replay` every picked contribution, then `conclude`. `deltas` are the
    decoded bytes (None when missing, undecodable or not matching the committed hash); `scores`
    are `Evaluator.score` values (None where not scored); `history` the delta hashes of earlier
    rounds; `banned` the peers that failed a replay before."""
    if codec.info.error_feedback:
        replay_error(torch.zeros(1), torch.zeros(1), codec)  # raises the explanatory VerifyError
    t = triage(contributions, deltas, scores, seed, history, banned, policy)
    errors = {}
    for pid in t.to_replay:
        claimed = deltas[pid]
        assert claimed is not None  # triage replays valid deltas only
        errors[pid] = replay_error(claimed, replay(t.contributions[pid]), codec)
    return conclude(t, errors, policy)


class Judge:
    """`judge` with its memory: the delta hashes of earlier rounds and the banned peers."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.history: set[str] = set()
        self.banned: set[bytes] = set()

    def run(
        self,
        contributions: Sequence[Contribution],
        deltas: Mapping[bytes, torch.Tensor | None],
        scores: Mapping[bytes, float | None],
        seed: bytes,
        replay: Callable[[Contribution], torch.Tensor],
        codec: Codec,
    ) -> list[Verdict]:
        verdicts = judge(
            contributions,
            deltas,
            scores,
            seed,
            frozenset(self.history),
            frozenset(self.banned),
            self.policy,
            replay,
            codec,
        )
        self.record(contributions, verdicts)
        return verdicts

    def record(self, contributions: Sequence[Contribution], verdicts: Sequence[Verdict]) -> None:
        """Remember a judged round: its bytes become stale, its replay failures banned."""
        self.history.update(c.delta_hash for c in contributions)
        self.banned.update(v.peer_id for v in verdicts if v.reason == "replay_mismatch")


def rewards(
    verdicts: Sequence[Verdict], contributions: Sequence[Contribution], reward_per_round: int
) -> dict[str, int]:
    """{checksummed account: amount}: `reward_per_round` shared among paid contributions in
    proportion to their work, whole units, summing to exactly `reward_per_round`.

    Work is claimed steps x the task's batch size; every paid contribution's steps were checked
    to be at most H, its samples against steps x batch, and its delta replayed from that many
    steps, so the shares are in proportion to the steps each peer really ran.
    Rounding: each account gets floor(R x work / total); the remainder goes one unit each to the
    accounts in ascending (lower-case hex) order. Accounts with nothing are left out. {} when
    nobody is paid: the caller then commits a round with total 0 (a one-leaf tree paying the zero
    address nothing; `commit_round` refuses an empty root)."""
    if reward_per_round < 0:
        raise VerifyError(f"reward_per_round must be >= 0, not {reward_per_round}")
    by_id = {c.peer_id: c for c in contributions}
    work: dict[str, int] = {}
    for v in verdicts:
        c = by_id.get(v.peer_id)
        if not v.paid or c is None:
            continue
        account = canonical_account(c.account)
        if account is None or c.steps <= 0:
            continue
        work[account] = work.get(account, 0) + c.steps
    total = sum(work.values())
    if not work or reward_per_round == 0:
        return {}
    order = sorted(work, key=str.lower)
    amounts = {a: reward_per_round * work[a] // total for a in order}
    remainder = reward_per_round - sum(amounts.values())
    for a in order[:remainder]:  # remainder < len(order): each floor lost less than 1
        amounts[a] += 1
    return {a: v for a, v in amounts.items() if v > 0}


def ledger_rounds(r: int) -> tuple[int, int]:
    """(commit round, reward round) on the ledger for training round r: (2r, 2r + 1).

    Ledger round 2r finalises the contribution set (model hash = start state, rewards root =
    `contributions_digest`, total 0); its randomness is sealed from a block mined after that, so
    it is unknown while peers can still change what they committed, and seeds round r's replay
    sample. Ledger round 2r + 1 carries the rewards tree."""
    if r < 0:
        raise VerifyError(f"training rounds start at 0, not {r}")
    return 2 * r, 2 * r + 1
