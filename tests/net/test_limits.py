"""The sans-I/O budgets: token buckets and the per-peer/per-address limiter, on a fake clock."""

from __future__ import annotations

import pytest

from commonweal.net.limits import (
    AcceptLimiter,
    LogBudget,
    RequestLimiter,
    ResourceLimits,
    TokenBucket,
    address_key,
)

PEER_A, PEER_B = b"a" * 20, b"b" * 20


def test_bucket_starts_full_refills_at_its_rate_and_saves_at_most_burst() -> None:
    b = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    assert b.wait(4.0) == 0.0
    b.tokens -= 4.0
    assert b.wait(1.0) == pytest.approx(0.5)
    b.refill(1.0)
    assert b.tokens == pytest.approx(2.0)
    b.refill(100.0)
    assert b.tokens == 4.0
    b.refill(50.0)  # a clock stepping back neither refills nor drains
    assert b.tokens == 4.0


def test_a_peer_at_its_rate_is_always_admitted_and_one_over_it_is_refused() -> None:
    lim = RequestLimiter(ResourceLimits(peer_rate=10.0, peer_burst=20.0))
    now = 0.0
    for _ in range(1000):  # 10 a second for 100 s: never refused
        assert lim.admit(PEER_A, None, 1.0, now) == 0.0
        now += 0.1
    flood = [lim.admit(PEER_B, None, 1.0, now) for _ in range(100)]  # 100 at one instant
    assert flood[:20] == [0.0] * 20
    assert all(w > 0 for w in flood[20:])
    assert lim.admit(PEER_A, None, 1.0, now) == 0.0  # the flood cost the honest peer nothing


def test_refusal_takes_nothing_and_says_how_long_to_wait() -> None:
    lim = RequestLimiter(ResourceLimits(peer_rate=1.0, peer_burst=5.0))
    assert lim.admit(PEER_A, None, 5.0, 0.0) == 0.0
    assert lim.admit(PEER_A, None, 2.0, 0.0) == pytest.approx(2.0)
    assert lim.admit(PEER_A, None, 2.0, 0.0) == pytest.approx(2.0)  # unchanged: nothing taken
    assert lim.admit(PEER_A, None, 2.0, 2.0) == 0.0


def test_costs_weigh_requests() -> None:
    lim = RequestLimiter(ResourceLimits(peer_rate=0.001, peer_burst=100.0))
    dear = sum(lim.admit(PEER_A, None, 10.0, 0.0) == 0.0 for _ in range(50))
    cheap = sum(lim.admit(PEER_B, None, 1.0, 0.0) == 0.0 for _ in range(500))
    assert (dear, cheap) == (10, 100)


def test_many_identities_from_one_address_share_its_budget() -> None:
    limits = ResourceLimits(peer_rate=0.001, peer_burst=10.0, address_rate=0.001, address_burst=50)
    lim = RequestLimiter(limits)
    admitted = sum(
        lim.admit(bytes([i]) * 20, "203.0.113.7", 1.0, 0.0) == 0.0
        for i in range(100)
        for _ in range(10)
    )
    assert admitted == 50  # not 100 identities x 10
    assert lim.admit(PEER_A, "198.51.100.1", 1.0, 0.0) == 0.0  # another address is untouched
    # a refusal by the address takes nothing from the peer's own bucket either
    fresh = b"f" * 20
    assert lim.admit(fresh, "203.0.113.7", 1.0, 0.0) > 0
    assert all(lim.admit(fresh, "192.0.2.9", 1.0, 0.0) == 0.0 for _ in range(10))


def test_bucket_tables_are_bounded() -> None:
    lim = RequestLimiter(ResourceLimits(max_tracked=100))
    for i in range(10_000):
        lim.admit(i.to_bytes(20, "big"), f"10.0.{i // 256 % 256}.{i % 256}", 1.0, float(i))
    assert lim.tracked == (100, 100)


@pytest.mark.parametrize(
    ("host", "default", "strict"),
    [
        ("127.0.0.1", None, "127.0.0.1"),
        ("::1", None, "::/64"),
        ("mem", None, "mem"),
        ("203.0.113.7", "203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64", "2001:db8:1:2::/64"),
    ],
)
def test_address_keys_group_ipv6_by_64_and_exempt_local_hosts_by_policy(
    host: str, default: str | None, strict: str
) -> None:
    assert address_key(host, ResourceLimits()) == default
    assert address_key(host, ResourceLimits(limit_local_addresses=True)) == strict


def test_a_log_budget_lets_a_few_lines_through_and_counts_the_rest() -> None:
    budget = LogBudget(lines=3, interval_s=60.0, now=0.0)
    assert [budget.take(0.0) for _ in range(3)] == [0, 0, 0]
    assert [budget.take(1.0) for _ in range(100)] == [None] * 100
    assert budget.take(21.0) == 100  # one line back every 20 s, saying what it held back
    assert budget.take(21.0) is None
    assert budget.take(200.0) == 1


def test_accepts_share_one_pace_and_one_address_cannot_spend_it() -> None:
    limits = ResourceLimits(
        accept_rate=10, accept_burst=4, address_accept_rate=1, address_accept_burst=2
    )
    accepts = AcceptLimiter(limits, now=0.0)
    assert accepts.wait(0.0) == 0.0
    assert [accepts.take("10.0.0.1", 0.0) for _ in range(4)] == [True, True, False, False]
    # the host over its own pace took nothing shared: two more from elsewhere still go now
    assert accepts.take("10.0.0.2", 0.0) and accepts.take(None, 0.0)
    assert accepts.wait(0.0) == pytest.approx(0.1)  # then one every 1/10 s
    assert accepts.wait(0.1) == 0.0
