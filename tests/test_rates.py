from __future__ import annotations

import pytest

from app.errors import Overloaded
from app.rates import RateLimits, TokenBucket


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
