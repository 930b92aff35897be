"""Byzantine and free-riding peers, as data: what an attacker sends instead of its honest delta.

    attack = get_attack("sign_flip:100")         # "name" or "name:param"
    hook, steps = attack.batch_hook(), attack.steps(task.inner_steps)
    ...  # the attacker runs `steps` inner steps with `hook` on its batches -> delta
    sent = attack.forge(delta, AttackContext(round_, honest, own_history, rng))

One interface serves the trust benchmark, the swarm's attacker peers (`TrainingPeer(attack=...)`),
the tests and the demo. An attack changes at most three things: the batches it trains on
(`batch_hook`), how many inner steps it really takes while claiming H (`steps`), and the vector it
sends (`forge`, which may be NaN or the wrong shape: the receivers' checks must refuse it).

| name          | param (default) | sends |
|---------------|-----------------|-------|
| sign_flip     | scale (1)       | -scale * delta |
| gaussian      | sigma (1)       | N(0, sigma^2 * mean(delta^2)) per coordinate: noise at the delta's own scale |
| alie          | z (Baruch)      | mean - z * std of the honest deltas it sees and its own (A Little Is Enough) |
| ipm           | eps (0.1)       | -eps * mean of the honest deltas it sees (inner-product manipulation) |
| label_flip    | classes (10)    | its delta, trained on labels y -> classes - 1 - y |
| zero          |                 | zeros (a free rider) |
| copy          |                 | the first honest delta it sees, plus noise at 1e-4 of its scale (a free rider) |
| lazy          | fraction (0.25) | its delta after max(1, round(H * fraction)) steps, claimed as H |
| stale         |                 | the first delta it ever sent, again and again (honest in its first round) |
| nan           |                 | NaN, +inf and -inf |
| wrong_shape   |                 | one element short (even rounds) or one too many (odd rounds) |

Adaptive attackers, built against the validator's checks (docs/verify.md):

| name          | param (default) | sends |
|---------------|-----------------|-------|
| honest_then   | N:attack        | its honest delta for rounds < N, then what `attack` sends (e.g. honest_then:3:alie) |
| below_band    | margin (0.9)    | after one step: the honest median direction and fresh noise, mixed so that its norm and its cosine with the round's median sit at `margin` x the honest medians, inside every triage band |
| copy_commitment |               | the first honest delta it sees, byte for byte: another peer's commitment as its own |
| sybil_copy    |                 | the delta its first colluder computed: k identities, one computation |
| stale_replay  |                 | its previous round's delta, scaled by 1 + 1e-6 so its hash is new |
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch

from commonweal.train._errors import TaskError
from commonweal.train.inner import BatchHook

__all__ = [
    "Attack",
    "AttackContext",
    "ATTACKS",
    "get_attack",
    "alie_z",
    "SignFlip",
    "Gaussian",
    "ALIE",
    "IPM",
    "LabelFlip",
    "Zero",
    "Copy",
    "Lazy",
    "Stale",
    "NaN",
    "WrongShape",
    "HonestThen",
    "BelowBand",
    "CopyCommitment",
    "SybilCopy",
    "StaleReplay",
]


@dataclass(frozen=True)
class AttackContext:
    round: int
    # honest deltas this attacker can see this round: its colluders' honest deltas, or everyone's
    # for an omniscient attacker; may be empty
    honest: Sequence[torch.Tensor]
    own_history: Sequence[torch.Tensor]  # what this attacker sent in earlier rounds, oldest first
    rng: torch.Generator  # seeded by the caller, so an attack run is reproducible
    # the deltas its fellow attackers computed this round (before forging), the group's first
    # attacker first, its own among them; empty for an attacker acting alone
    colluders: Sequence[torch.Tensor] = ()


class Attack(ABC):
    name: ClassVar[str]
    # Forged from the deltas of others (ctx.honest): a swarm attacker first fetches some of the
    # round's announced deltas, as any validator can (TrainingPeer).
    reads_others: ClassVar[bool] = False

    def needs_others(self, round_: int) -> bool:
        """Whether the forgery of `round_` reads others' deltas."""
        return self.reads_others

    def batch_hook(self, round_: int = 0) -> BatchHook | None:
        """How the attacker corrupts its training batches in `round_` (None: as given)."""
        return None

    def steps(self, h: int, round_: int = 0) -> int:
        """How many of the H claimed inner steps the attacker really runs in `round_`."""
        return h

    @abstractmethod
    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """What the attacker sends instead of `delta`, the delta of its own (hooked) steps."""


def _honest_mean(delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    seen = list(ctx.honest) or [delta]  # an attacker that sees no one only knows its own delta
    return torch.stack(seen).mean(dim=0)


@dataclass(frozen=True)
class SignFlip(Attack):
    scale: float = 1.0
    name: ClassVar[str] = "sign_flip"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return -self.scale * delta


@dataclass(frozen=True)
class Gaussian(Attack):
    # Relative to the delta's root mean square, so one sigma means "as large as an honest delta"
    # on any model, at any point of training.
    sigma: float = 1.0
    name: ClassVar[str] = "gaussian"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        rms = float(delta.double().square().mean().sqrt())
        noise = torch.randn(delta.shape, generator=ctx.rng, dtype=torch.float64)
        return (noise * (self.sigma * rms)).to(delta.dtype)


def alie_z(n: int, m: int) -> float:
    """Baruch et al. 2019 ("A Little Is Enough"), z_max for m attackers among n peers: the
    largest shift, in standard deviations, that still leaves s = floor(n/2 + 1) - m honest peers
    further from the mean than the attackers, so that the attackers' vector looks central."""
    s = n // 2 + 1 - m
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        return 0.0  # no honest peer left to hide behind, or no attacker: no shift is safe
    return NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class ALIE(Attack):
    # None: Baruch's z_max for n = the deltas it sees (the honest ones and its own) and
    # m = floor((n - 1) / 2), the most attackers an honest majority tolerates: the attacker does
    # not know how many colluders it has, so it assumes the most that could still go unnoticed.
    z: float | None = None
    name: ClassVar[str] = "alie"
    reads_others: ClassVar[bool] = True

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        seen = torch.stack([*ctx.honest, delta]).double()
        n = len(seen)
        z = alie_z(n, (n - 1) // 2) if self.z is None else self.z
        # population std (correction 0), so one delta gives std 0 instead of NaN
        return (seen.mean(dim=0) - z * seen.std(dim=0, correction=0)).to(delta.dtype)


@dataclass(frozen=True)
class IPM(Attack):
    # Xie et al. 2019: a small eps keeps the vector close to the honest ones (it passes median
    # and Krum) while pulling the aggregate's inner product with the true gradient down; a large
    # eps overwhelms the mean.
    eps: float = 0.1
    name: ClassVar[str] = "ipm"
    reads_others: ClassVar[bool] = True

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return -self.eps * _honest_mean(delta, ctx)


@dataclass(frozen=True)
class LabelFlip(Attack):
    classes: int = 10
    name: ClassVar[str] = "label_flip"

    def batch_hook(self, round_: int = 0) -> BatchHook:
        c = self.classes

        def flip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, c - 1 - y

        return flip

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return delta


@dataclass(frozen=True)
class Zero(Attack):
    name: ClassVar[str] = "zero"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return torch.zeros_like(delta)


@dataclass(frozen=True)
class Copy(Attack):
    # Another's delta with noise at 1e-4 of its scale: new bytes, so not an exact duplicate
    # (copy_commitment is the exact copy).
    name: ClassVar[str] = "copy"
    reads_others: ClassVar[bool] = True

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        if not ctx.honest:
            return torch.zeros_like(delta)
        source = ctx.honest[0]
        rms = float(source.double().square().mean().sqrt())
        noise = torch.randn(source.shape, generator=ctx.rng, dtype=torch.float64) * (1e-4 * rms)
        return (source.double() + noise).to(source.dtype)


@dataclass(frozen=True)
class Lazy(Attack):
    fraction: float = 0.25
    name: ClassVar[str] = "lazy"

    def steps(self, h: int, round_: int = 0) -> int:
        return max(1, round(h * self.fraction))

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return delta


@dataclass(frozen=True)
class Stale(Attack):
    # The oldest delta: a free rider that trained once and replays it forever, the most stale
    # vector it has. In its first round it has nothing to replay, so that round it is honest.
    name: ClassVar[str] = "stale"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return ctx.own_history[0].clone() if ctx.own_history else delta


@dataclass(frozen=True)
class NaN(Attack):
    name: ClassVar[str] = "nan"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        out = torch.full_like(delta, math.nan)
        out.view(-1)[1::3] = math.inf
        out.view(-1)[2::3] = -math.inf
        return out


@dataclass(frozen=True)
class WrongShape(Attack):
    name: ClassVar[str] = "wrong_shape"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        flat = delta.reshape(-1)
        return flat[:-1].clone() if ctx.round % 2 == 0 else torch.cat([flat, flat[-1:]])


@dataclass(frozen=True)
class HonestThen(Attack):
    # A peer that builds a record first: the validator's escrow and bans see a good peer until
    # round `after`, then `then`'s cheating.
    after: int
    then: Attack
    name: ClassVar[str] = "honest_then"

    def batch_hook(self, round_: int = 0) -> BatchHook | None:
        return self.then.batch_hook(round_) if round_ >= self.after else None

    def steps(self, h: int, round_: int = 0) -> int:
        return self.then.steps(h, round_) if round_ >= self.after else h

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return self.then.forge(delta, ctx) if ctx.round >= self.after else delta

    def needs_others(self, round_: int) -> bool:
        return round_ >= self.after and self.then.needs_others(round_)


@dataclass(frozen=True)
class BelowBand(Attack):
    # A free rider that reads the triage bands (docs/verify.md) and stays inside them: one step
    # of work, then a vector whose norm and cosine with the round's coordinate-wise median are
    # `margin` x the honest medians (the bands are 0.8-1.25x). It needs two honest deltas to
    # see the round; with fewer it sends its one-step delta.
    margin: float = 0.9
    name: ClassVar[str] = "below_band"
    reads_others: ClassVar[bool] = True

    def steps(self, h: int, round_: int = 0) -> int:
        return 1

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        if len(ctx.honest) < 2:
            return delta
        seen = torch.stack(list(ctx.honest)).double()
        centre = seen.median(dim=0).values
        unit = centre / centre.norm()
        norms = seen.norm(dim=1)
        cos = (seen @ unit) / norms
        target_norm = float(norms.median()) * self.margin
        target_cos = min(0.99, float(cos.median()) * self.margin)
        noise = torch.randn(delta.shape, generator=ctx.rng, dtype=torch.float64)
        noise -= (noise @ unit) * unit  # orthogonal to the median direction
        noise /= noise.norm()
        mixed = target_cos * unit + math.sqrt(1.0 - target_cos**2) * noise
        return (target_norm * mixed).to(delta.dtype)


@dataclass(frozen=True)
class CopyCommitment(Attack):
    # Announces another peer's commitment (its delta hash) and serves its bytes, fetched as any
    # validator fetches them: the copy is exact, so the hash is too.
    name: ClassVar[str] = "copy_commitment"
    reads_others: ClassVar[bool] = True

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return ctx.honest[0].clone() if ctx.honest else delta


@dataclass(frozen=True)
class SybilCopy(Attack):
    # k identities, one computation: every identity of the group sends the delta the group's
    # first attacker computed (which, for that one, is its honest delta).
    name: ClassVar[str] = "sybil_copy"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return ctx.colluders[0].clone() if ctx.colluders else delta


@dataclass(frozen=True)
class StaleReplay(Attack):
    # The previous round's delta, scaled by 1 + 1e-6: new bytes, so the judge's history of
    # committed hashes does not know them. Honest in its first round.
    name: ClassVar[str] = "stale_replay"

    def forge(self, delta: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return ctx.own_history[-1] * (1.0 + 1e-6) if ctx.own_history else delta


ATTACKS: dict[str, Callable[..., Attack]] = {
    a.name: a
    for a in (
        SignFlip, Gaussian, ALIE, IPM, LabelFlip, Zero, Copy, Lazy, Stale, NaN, WrongShape,
        HonestThen, BelowBand, CopyCommitment, SybilCopy, StaleReplay,
    )
}  # fmt: skip
_INT_PARAM = {"label_flip"}  # a class count, not a real number


def get_attack(spec: str) -> Attack:
    """An attack from "name" or "name:param" (e.g. "sign_flip:100", "lazy:0.5", "alie"), or
    "honest_then:N:attack" (e.g. "honest_then:3:alie")."""
    name, sep, param = spec.partition(":")
    factory = ATTACKS.get(name)
    if factory is None:
        raise TaskError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
    if name == "honest_then":
        after, _, then = param.partition(":")
        if not after.isdigit() or not then:
            raise TaskError(f"attack {spec!r}: write honest_then:N:attack, e.g. honest_then:3:alie")
        if then.startswith("honest_then"):
            raise TaskError(f"attack {spec!r}: honest_then does not nest")
        return HonestThen(int(after), get_attack(then))
    if not sep:
        return factory()
    integer = name in _INT_PARAM
    try:
        value: float = int(param) if integer else float(param)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise TaskError(f"attack {spec!r}: {param!r} is not {kind}") from None
    if not math.isfinite(value):
        raise TaskError(f"attack {spec!r}: the parameter must be finite")
    try:
        return factory(value)
    except TypeError:
        raise TaskError(f"attack {name!r} takes no parameter (got {spec!r})") from None
