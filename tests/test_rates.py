from __future__ import annotations

import pytest

from app import rates as rates_module
from app.errors import Overloaded
from app.rates import REFILL_S, RateLimits, TokenBucket


def test_token_bucket_refills() -> None:
    bucket = TokenBucket(per_minute=60, now_s=0)
    assert all(bucket.take(1, 0) == 0 for _ in range(60))
    assert bucket.take(1, 0) == pytest.approx(1.0)
    assert bucket.take(1, 1.0) == 0


def test_negative_amounts_never_refill_a_bucket() -> None:
    bucket = TokenBucket(per_minute=1000, now_s=0)
    assert bucket.take(900, 0) == 0
    assert bucket.take(-1_000_000, 0) == 0  # taken as 0
    assert bucket.take(900, 0) > 0  # still only 100 left


def test_rate_limits_per_tenant() -> None:
    now = [0.0]
    rates = RateLimits(rpm=2, tpm=100, clock=lambda: now[0])
    rates.check_now("a", 10)
    rates.check_now("a", 10)
    with pytest.raises(Overloaded, match="RPM"):
        rates.check_now("a", 10)
    rates.check_now("b", 90)
    with pytest.raises(Overloaded, match="TPM") as info:
        rates.check_now("b", 50)
    assert float(info.value.headers()["Retry-After"]) >= 1


def test_a_refused_request_takes_nothing() -> None:
    """Refused for its tokens, a request spends none of its tenant's requests either (all or
    nothing, as the Redis script does)."""
    rates = RateLimits(rpm=10, tpm=100, clock=lambda: 0.0)
    rates.check_now("a", 100)
    with pytest.raises(Overloaded, match="TPM"):
        rates.check_now("a", 50)
    for _ in range(9):
        rates.check_now("a", 0)
    with pytest.raises(Overloaded, match="RPM"):
        rates.check_now("a", 0)


def test_buckets_of_idle_tenants_are_forgotten_once_full() -> None:
    """Tenants are what clients send: a flood of new ones leaves no lasting buckets, and a
    tenant past its limit stays limited however many others come within the minute."""
    now = [0.0]
    rates = RateLimits(rpm=1, tpm=0, clock=lambda: now[0])
    rates.check_now("limited", 1)
    for i in range(1000):
        now[0] += 0.05  # 50 s in all
        rates.check_now(f"passer-by {i}", 1)
    with pytest.raises(Overloaded):
        rates.check_now("limited", 1)  # its bucket was kept: still empty
    assert len(rates) == 1001
    now[0] += REFILL_S + 1  # all of them full again
    rates.check_now("newcomer", 1)
    assert len(rates) == 1
    rates.check_now("limited", 1)  # refilled, as it would have been


def test_the_bucket_map_has_a_hard_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rates_module, "MAX_BUCKETS", 100)
    rates = RateLimits(rpm=10, tpm=1000, clock=lambda: 0.0)
    for i in range(1000):
        rates.check_now(f"tenant {i}", 1)
    assert len(rates) == 100


def test_a_refund_gives_back_up_to_the_capacity() -> None:
    bucket = TokenBucket(per_minute=1000, now_s=0)
    assert bucket.take(900, 0) == 0
    assert bucket.give(600, 0) == 600  # 700 now
    assert bucket.take(700, 0) == 0
    assert bucket.take(1, 0) > 0
    assert bucket.give(5000, 30) == 500  # 500 refilled in 30 s: only 500 more fit
    assert bucket.level == 1000
    assert bucket.give(-50, 30) == 0  # a negative refund takes nothing


def test_unused_tokens_go_back_to_the_tenant() -> None:
    """A request is charged its most (prompt + limit) and gets back what it did not use, so a
    tenant's TPM counts tokens used; a request in flight still holds its whole charge."""
    rates = RateLimits(rpm=0, tpm=1000, clock=lambda: 0.0)
    rates.check_now("a", 600)
    with pytest.raises(Overloaded, match="TPM"):
        rates.check_now("a", 600)  # the first one still holds its 600
    rates.refund("a", 550)  # it used 50
    rates.check_now("a", 600)
    rates.refund("b", 100)  # nothing charged to b: no bucket to give to
    assert rates.refunded == 550
    assert rates.describe() == {
        "rpm": 0,
        "tpm": 1000,
        "store": "memory",
        "buckets": 1,
        "refunded_tokens": 550,
    }
