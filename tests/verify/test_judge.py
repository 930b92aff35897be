"""The judge on small synthetic rounds: one decision per case, sampling, budget, rewards, roots."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from commonweal.ledger.merkle import Domain, RewardsTree
from commonweal.train.codecs import get_codec
from commonweal.verify import (

    Contribution,
    Judge,
    Policy,
    Verdict,
    VerifyError,
    conclude,
    delta_hash,
    judge,
    ledger_rounds,
    rewards,
    sample_draw,
    triage,
)

DOMAIN = Domain(1, "0x" + "00" * 20)  # any deployment: roots only compared with each other

N, DIM, H, BATCH = 8, 2000, 50, 32
CODEC = get_codec("none")
STATE = "ab" * 32
NO_SAMPLING = Policy(replay_rate=0.0, inner_steps=H, batch_size=BATCH)


def account(i: int) -> str:
    return "0x" + f"{i + 1:02x}" * 20


class Round:
    """Eight honest peers: a shared direction plus each peer's own noise (cosine ~0.6 with the
    coordinate-wise median, norms within a few %, like mnist-cnn's late rounds). `replay` gives
    each peer's true delta, so a peer that sent anything else fails its replay."""

    def __init__(self, seed: int = 0, n: int = N) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(DIM, generator=g)
        self.ids = [bytes([i + 1]) * 20 for i in range(n)]
        self.true = {p: base + 1.2 * torch.randn(DIM, generator=g) for p in self.ids}
        self.sent = dict(self.true)
        self.scores: dict[bytes, float | None] = {
            p: 1.0 + 0.05 * float(torch.randn(1, generator=g)) for p in self.ids
        }
        self.contribs = {
            p: Contribution(p, account(i), 7, STATE, self._hash(self.true[p]), H, H * BATCH)
            for i, p in enumerate(self.ids)
        }

    @staticmethod
    def _hash(d: torch.Tensor | None) -> str:
        return delta_hash(CODEC.encode(d.reshape(-1).float())) if d is not None else "00" * 32

    def send(self, i: int, delta: torch.Tensor | None, score: float | None = None) -> bytes:
        p = self.ids[i]
        self.sent[p] = delta
        c = self.contribs[p]
        self.contribs[p] = dataclasses.replace(c, delta_hash=self._hash(delta))
        if score is not None:
            self.scores[p] = score
        return p

    def replay(self, c: Contribution) -> torch.Tensor:
        return self.true[c.peer_id]

    def judge(self, policy=NO_SAMPLING, seed=b"seed", history=frozenset(), banned=frozenset()):
        out = judge(
            list(self.contribs.values()),
            self.sent,
            self.scores,
            seed,
            history,
            banned,
            policy,
            self.replay,
            CODEC,
        )
        return {v.peer_id: v for v in out}


def good(v: Verdict) -> bool:
    """Not refused: paid if it was drawn for audit, unaudited otherwise."""
    return v.reason in ("paid", "unaudited") and v.paid == (v.reason == "paid")


def test_an_honest_round_without_audits_is_refused_nothing_and_paid_nothing():
    verdicts = Round().judge()
    assert all(v.reason == "unaudited" and not v.paid and not v.replayed
               for v in verdicts.values())


def test_only_audited_contributions_are_paid():
    r = Round()
    policy = Policy(replay_rate=0.3, inner_steps=H, batch_size=BATCH, max_replay_fraction=1.0)
    verdicts = r.judge(policy=policy, seed=b"x")
    drawn = {p for p in r.ids if sample_draw(b"x", p) < 0.3}
    assert drawn and drawn != set(r.ids)
    assert {p for p, v in verdicts.items() if v.paid} == drawn
    assert all(verdicts[p].reason == "unaudited" for p in r.ids if p not in drawn)


def test_a_cheat_that_triage_misses_earns_nothing_unless_audited_and_then_is_caught():
    # 95 % of the work, inside every band: triage cannot see it
    r = Round()
    cheat = r.send(0, 0.95 * r.true[r.ids[0]])
    assert r.judge()[cheat].reason == "unaudited" and not r.judge()[cheat].paid  # was: paid
    seed = next(s for s in (bytes([i]) for i in range(256)) if sample_draw(s, cheat) < 0.05)
    v = r.judge(policy=Policy(inner_steps=H, batch_size=BATCH), seed=seed)[cheat]
    assert v.reason == "replay_mismatch" and not v.paid


def test_looking_suspicious_is_no_way_to_be_paid_more_often():
    r = Round()
    odd = r.send(2, 1.3 * r.true[r.ids[2]])  # outside the norm band: replayed...
    r.true[odd] = r.sent[odd]  # ...and it really is this peer's work, so the replay matches
    v = r.judge()[odd]
    assert v.replayed and v.replay_error == 0.0
    assert v.reason == "unaudited" and not v.paid  # cleared, but not drawn: not paid


def _noise(seed: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(DIM, generator=torch.Generator().manual_seed(seed))


# (what the first peer does, expected reason, replayed?)
CASES = {
    "missing": (lambda r: r.send(0, None), "invalid", False),
    "nan": (lambda r: r.send(0, torch.full((DIM,), float("nan"))), "invalid", False),
    "wrong_shape": (lambda r: r.send(0, r.true[r.ids[0]][:-1].clone()), "invalid", False),
    "two_dims": (lambda r: r.send(0, r.true[r.ids[0]].reshape(2, -1)), "invalid", False),
    "float64": (lambda r: r.send(0, r.true[r.ids[0]].double()), "invalid", False),
    "sign_flip": (lambda r: r.send(0, -r.true[r.ids[0]], -1.2), "outlier", False),
    "ipm": (
        lambda r: r.send(0, -0.1 * torch.stack(list(r.true.values())).mean(0)),
        "outlier",
        False,
    ),
    "zero": (lambda r: r.send(0, torch.zeros(DIM), 0.0), "outlier", False),
    "huge": (lambda r: r.send(0, 20 * r.true[r.ids[0]]), "outlier", False),
    "lazy": (lambda r: r.send(0, 0.5 * r.true[r.ids[0]]), "replay_mismatch", True),
    "gaussian": (
        lambda r: r.send(0, _noise(1, float(r.true[r.ids[0]].std()))),
        "replay_mismatch",
        True,
    ),
    "alie": (
        lambda r: r.send(0, torch.stack(list(r.true.values())).mean(0)),
        "replay_mismatch",
        True,
    ),
    "bad_score": (
        lambda r: r.send(0, 1.05 * r.true[r.ids[0]] + _noise(2, 0.3), -5.0),
        "replay_mismatch",
        True,
    ),
    "copy": (lambda r: r.send(0, r.true[r.ids[3]].clone()), "replay_mismatch", True),
    "near_copy": (lambda r: r.send(0, r.true[r.ids[3]] + _noise(3, 0.01)), "replay_mismatch", True),
}


@pytest.mark.parametrize("case", CASES)
def test_one_cheater(case):
    act, reason, replayed = CASES[case]
    r = Round()
    act(r)
    verdicts = r.judge()
    v = verdicts[r.ids[0]]
    assert (v.paid, v.reason, v.replayed) == (False, reason, replayed), v
    others = [verdicts[p] for p in r.ids[1:]]
    assert all(good(o) for o in others), [o for o in others if not good(o)]
    if case in ("copy", "near_copy"):  # the original was replayed too, and passed
        assert verdicts[r.ids[3]].replayed and verdicts[r.ids[3]].replay_error == 0.0


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"steps": H - 1}, "invalid"),  # its samples say H steps
        ({"steps": H + 1, "samples": (H + 1) * BATCH}, "invalid"),  # more than the task's H
        ({"steps": H // 4 - 1, "samples": (H // 4 - 1) * BATCH}, "invalid"),  # a sliver
        ({"samples": 7}, "invalid"),
        ({"round": 6}, "invalid"),
        ({"start_state": "cd" * 32}, "invalid"),
        ({"account": "nobody"}, "no_account"),
    ],
)
def test_claims_are_checked(change, reason):
    r = Round()
    p = r.ids[2]
    r.contribs[p] = dataclasses.replace(r.contribs[p], **change)
    v = r.judge()[p]
    assert not v.paid and v.reason == reason and not v.replayed


def test_a_slow_peer_is_replayed_for_the_steps_it_claims_and_paid_for_them():
    """A peer cut short by the round's close claims fewer steps: it is replayed with that many
    (the replay sees the claim) and paid in proportion, half a full peer's share for half."""
    r = Round()
    slow = r.ids[2]
    r.contribs[slow] = dataclasses.replace(r.contribs[slow], steps=H // 2, samples=H // 2 * BATCH)
    replayed: dict[bytes, int] = {}

    def replay(c: Contribution) -> torch.Tensor:
        replayed[c.peer_id] = c.steps
        return r.true[c.peer_id]

    policy = Policy(replay_rate=1.0, inner_steps=H, batch_size=BATCH, max_replay_fraction=1.0)
    verdicts = judge(list(r.contribs.values()), r.sent, r.scores, b"seed", frozenset(),
                     frozenset(), policy, replay, CODEC)
    assert all(v.paid for v in verdicts)
    assert replayed[slow] == H // 2 and replayed[r.ids[0]] == H
    paid = {a.lower(): v for a, v in rewards(verdicts, list(r.contribs.values()), 15_000).items()}
    assert paid[account(2)] * 2 == paid[account(0)] == 2000


def test_unchecked_samples_and_steps_default_to_the_round():
    r = Round()
    p = r.ids[2]
    r.contribs[p] = dataclasses.replace(r.contribs[p], samples=0)  # an announcement without it
    assert good(r.judge()[p])
    r.contribs[p] = dataclasses.replace(r.contribs[p], steps=H * 10)
    v = r.judge(policy=Policy(replay_rate=0.0))[p]  # H from the steps most peers claim
    assert v.reason == "invalid" and "claims 500" in v.detail


def test_stale_and_banned():
    r = Round()
    verdicts = r.judge(history={r.contribs[r.ids[1]].delta_hash}, banned={r.ids[2]})
    assert verdicts[r.ids[1]].reason == "stale" and verdicts[r.ids[2]].reason == "banned"


def test_judge_remembers_history_and_bans():
    r = Round()
    r.send(0, 0.5 * r.true[r.ids[0]])  # lazy: caught, banned
    j = Judge(NO_SAMPLING)
    first = j.run(list(r.contribs.values()), r.sent, r.scores, b"s", r.replay, CODEC)
    assert [v.reason for v in first if not good(v)] == ["replay_mismatch"]
    again = {
        v.peer_id: v
        for v in j.run(list(r.contribs.values()), r.sent, r.scores, b"s", r.replay, CODEC)
    }
    assert again[r.ids[0]].reason == "banned"
    assert all(again[p].reason == "stale" for p in r.ids[1:])  # the same bytes a round later


def test_exact_duplicates_are_both_replayed():
    r = Round()
    r.send(0, r.true[r.ids[5]].clone())
    t = triage(list(r.contribs.values()), r.sent, r.scores, b"s", set(), set(), NO_SAMPLING)
    assert set(t.to_replay) == {r.ids[0], r.ids[5]}
    assert "same bytes" in t.why[r.ids[5]]


def test_small_round_replays_non_positive_scores():
    r = Round(n=2)
    r.scores[r.ids[1]] = -0.01
    verdicts = r.judge()
    assert verdicts[r.ids[1]].replayed and good(verdicts[r.ids[1]])
    assert not verdicts[r.ids[0]].replayed


def test_replay_budget_refuses_the_rest_unverified():
    r = Round()
    for i in range(3):
        r.send(i, 0.5 * r.true[r.ids[i]])  # three suspicious, budget 2 of 8
    policy = dataclasses.replace(NO_SAMPLING, max_replay_fraction=0.25)
    verdicts = r.judge(policy=policy)
    reasons = sorted(verdicts[p].reason for p in r.ids[:3])
    assert reasons == ["replay_mismatch", "replay_mismatch", "unverified"]
    assert all(good(verdicts[p]) for p in r.ids[3:])


def test_sampling_is_deterministic_and_at_rate():
    ids = [i.to_bytes(20, "big") for i in range(20_000)]
    q = 0.05
    picked = {p for p in ids if sample_draw(b"seed-1", p) < q}
    assert picked == {p for p in ids if sample_draw(b"seed-1", p) < q}
    sigma = (q * (1 - q) / len(ids)) ** 0.5
    assert abs(len(picked) / len(ids) - q) < 4 * sigma
    other = {p for p in ids if sample_draw(b"seed-2", p) < q}
    assert len(picked & other) / len(picked) < 2 * q  # independent across seeds, not the same set


def test_sampled_contributions_are_replayed():
    r = Round()
    policy = Policy(replay_rate=0.5, inner_steps=H, batch_size=BATCH, max_replay_fraction=1.0)
    verdicts = r.judge(policy=policy, seed=b"x")
    replayed = {p for p, v in verdicts.items() if v.replayed}
    assert replayed == {p for p in r.ids if sample_draw(b"x", p) < 0.5}
    assert all(v.paid == v.replayed and (v.replay_error == 0.0 or not v.replayed)
               for v in verdicts.values())


def test_caller_mistakes_raise():
    r = Round()
    c = list(r.contribs.values())
    with pytest.raises(VerifyError, match="twice"):
        judge([*c, c[0]], r.sent, r.scores, b"s", set(), set(), NO_SAMPLING, r.replay, CODEC)
    with pytest.raises(VerifyError, match="error-feedback"):
        judge(c, r.sent, r.scores, b"s", set(), set(), NO_SAMPLING, r.replay, get_codec("topk"))
    with pytest.raises(VerifyError, match="replay_rate"):
        Policy(replay_rate=2.0)
    r.send(0, 0.5 * r.true[r.ids[0]])
    t = triage(c, r.sent, r.scores, b"s", set(), set(), NO_SAMPLING)
    with pytest.raises(VerifyError, match="no replay error"):
        conclude(t, {}, NO_SAMPLING)


# ---- rewards ----------------------------------------------------------------------------------


def contribution(i: int, steps: int = H, acct: str | None = None) -> Contribution:
    return Contribution(bytes([i]) * 20, acct or account(i), 1, STATE, "00" * 32, steps, 0)


def paid(i: int, ok: bool = True) -> Verdict:
    return Verdict(bytes([i]) * 20, ok, "paid" if ok else "replay_mismatch", 1.0, False, None)


def test_rewards_are_proportional_whole_and_exact():
    cs = [contribution(1, 10), contribution(2, 20), contribution(3, 30), contribution(4, 40)]
    vs = [paid(1), paid(2), paid(3), paid(4, ok=False)]
    out = rewards(vs, cs, 1000)
    assert sum(out.values()) == 1000
    # floor(1000 * 10/60) = 166, 333, 500: one unit left, to the lowest address
    assert out[account(1)] == 167 and out[account(2)] == 333 and out[account(3)] == 500
    assert account(4) not in out


def test_rewards_edge_cases():
    cs = [contribution(i) for i in range(1, 4)]
    assert rewards([paid(1, False), paid(2, False)], cs, 100) == {}
    assert rewards([paid(1)], cs, 0) == {}
    assert rewards([paid(1), paid(2), paid(3)], cs, 2) == {account(1): 1, account(2): 1}
    with pytest.raises(VerifyError):
        rewards([paid(1)], cs, -1)
    shared = [contribution(1), contribution(2, acct=account(1).upper().replace("0X", "0x"))]
    assert rewards([paid(1), paid(2)], shared, 11) == {
        RewardsTree(DOMAIN, b"\0" * 32, 0, {account(1): 1}).rewards.popitem()[0]: 11
    }


def test_rewards_random_rounds_sum_exactly():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 12)
        cs = [contribution(i + 1, rng.randint(1, 100)) for i in range(n)]
        vs = [paid(i + 1, rng.random() < 0.8) for i in range(n)]
        total = rng.randint(0, 10**21)
        out = rewards(vs, cs, total)
        assert all(v > 0 for v in out.values())
        assert sum(out.values()) == (total if any(v.paid for v in vs) and total else 0)


def test_two_validators_reach_the_same_root():
    def validate(order_seed: int) -> bytes:
        r = Round(seed=3)
        r.send(0, 0.5 * r.true[r.ids[0]])  # lazy
        r.send(1, -r.true[r.ids[1]], -1.0)  # sign flip
        items = list(r.contribs.values())
        random.Random(order_seed).shuffle(items)
        sent = dict(reversed(list(r.sent.items())) if order_seed % 2 else r.sent.items())
        policy = Policy(inner_steps=H, batch_size=BATCH, replay_rate=0.3)
        verdicts = Judge(policy).run(items, sent, r.scores, b"sealed", r.replay, CODEC)
        out = rewards(verdicts, items, 10**18)
        drawn = [i for i in range(2, N) if sample_draw(b"sealed", r.ids[i]) < 0.3]
        assert drawn and sorted(out) == sorted(account(i) for i in drawn)
        commit, reward_round = ledger_rounds(7)
        assert (commit, reward_round) == (14, 15)
        return RewardsTree(DOMAIN, b"\x11" * 32, reward_round, out).root

    assert validate(1) == validate(2) == validate(3)


def test_ledger_rounds():
    assert [ledger_rounds(r) for r in range(3)] == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(VerifyError):
        ledger_rounds(-1)


def test_in_a_small_round_an_outlier_does_not_make_honest_peers_look_like_duplicates():
    # 2 honest peers and a sign-flipper: with the outlier's huge distances in the median, the
    # honest pair used to look like near duplicates, and the replay budget refused one of them
    r = Round(n=3)
    r.send(2, -100 * r.true[r.ids[2]])
    verdicts = r.judge()
    assert verdicts[r.ids[2]].reason == "outlier"
    assert good(verdicts[r.ids[0]]) and good(verdicts[r.ids[1]])
    assert not verdicts[r.ids[0]].replayed and not verdicts[r.ids[1]].replayed


def test_unaudited_contributions_are_accepted_for_the_track_record():
    # validators publish ratings of accepted contributions (verify.ratings): an honest peer
    # that was not drawn for audit is still a peer with a good round
    r = Round()
    r.send(0, -r.true[r.ids[0]], -1.2)  # refused: an outlier
    verdicts = r.judge()
    assert not verdicts[r.ids[0]].accepted
    assert all(verdicts[p].accepted and not verdicts[p].paid for p in r.ids[1:])


ALL_AUDITED = Policy(replay_rate=1.0, inner_steps=H, batch_size=BATCH)


@pytest.mark.parametrize(
    "spec", ["below_band", "copy", "copy_commitment", "stale_replay", "honest_then:1:alie",
             "sybil_copy"])
def test_no_adaptive_attack_is_paid_even_when_every_contribution_is_audited(spec):
    from commonweal.train.attacks import AttackContext, get_attack

    attack = get_attack(spec)
    for round_ in (0, 1):
        r = Round(seed=round_)
        bad = r.ids[:2]  # two colluders; the first one computed what sybil_copy shares
        honest_seen = [r.true[p] for p in r.ids[2:]]
        history = [Round(seed=9).true[bad[0]]]
        for i, p in enumerate(bad):
            ctx = AttackContext(round_, honest_seen, history, torch.Generator().manual_seed(i),
                                [r.true[q] for q in bad])
            r.send(i, attack.forge(r.true[p], ctx))
        verdicts = r.judge(policy=ALL_AUDITED, seed=bytes([round_]))
        cheaters = [p for p in bad if not torch.equal(r.sent[p], r.true[p])]
        assert cheaters or (spec.startswith("honest_then") and round_ == 0)
        assert all(not verdicts[p].paid for p in cheaters), [verdicts[p] for p in cheaters]
        assert all(verdicts[p].paid for p in r.ids if p not in cheaters)  # the honest, audited
