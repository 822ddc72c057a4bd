"""
Tests for L{gateway.backoff}: growth to the cap, jitter bounds, expiry and
policy validation.

Pure units: no reactor, no clock; the random source is seeded.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backoff import MINIMUM_DELAY, RetryPolicy, expired, next_delay

NO_JITTER = RetryPolicy(jitter=0.0)


def test_default_policy_values():
    """The defaults are 5 minutes doubling to an hour, +-10 %, 5 days."""
    policy = RetryPolicy()
    assert (policy.initial, policy.maximum, policy.factor) == (300.0, 3600.0, 2.0)
    assert policy.jitter == 0.1
    assert policy.max_age == 5 * 86400.0


def test_exact_schedule_without_jitter():
    """Without jitter the delay is initial * factor ** (attempts - 1), capped
    at maximum: 300, 600, 1200, 2400, then 3600 for ever."""
    rng = random.Random(1)
    delays = [next_delay(NO_JITTER, n, rng) for n in range(1, 9)]
    assert delays == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0, 3600.0]


def test_growth_is_monotonic_up_to_the_cap():
    """Without jitter the delay never shrinks as failures accumulate, and it
    reaches the cap and stays there."""
    policy = RetryPolicy(initial=1.5, maximum=1000.0, factor=1.3, jitter=0.0)
    rng = random.Random(2)
    delays = [next_delay(policy, n, rng) for n in range(1, 200)]
    assert delays == sorted(delays)
    assert delays[0] == 1.5
    assert delays[-1] == 1000.0
    assert max(delays) == 1000.0


def test_factor_one_is_a_constant_delay():
    """A factor of 1 gives the initial delay after every failure."""
    policy = RetryPolicy(initial=60.0, maximum=60.0, factor=1.0, jitter=0.0)
    rng = random.Random(3)
    assert {next_delay(policy, n, rng) for n in range(1, 50)} == {60.0}


def test_huge_attempt_counts_do_not_overflow():
    """An absurd attempt count gives the capped delay instead of an
    OverflowError from the power."""
    rng = random.Random(4)
    assert next_delay(NO_JITTER, 10_000, rng) == 3600.0
    assert next_delay(NO_JITTER, 10**18, rng) == 3600.0
    integral = RetryPolicy(initial=1, maximum=10, factor=2, jitter=0)
    assert next_delay(integral, 10**9, rng) == 10.0


def test_jitter_stays_within_bounds_with_seeded_rng():
    """With +-10 % jitter every delay lies within 10 % of the un-jittered
    value and never above maximum * 1.1, over many draws."""
    policy = RetryPolicy()
    rng = random.Random(5)
    for attempts in range(1, 12):
        base = min(300.0 * 2.0 ** (attempts - 1), 3600.0)
        for _ in range(500):
            delay = next_delay(policy, attempts, rng)
            assert base * 0.9 <= delay <= base * 1.1
            assert delay <= 3600.0 * 1.1


def test_jitter_actually_spreads_the_delays():
    """Jitter is not a no-op: many draws for the same attempt differ, and
    they fall on both sides of the base delay."""
    rng = random.Random(6)
    delays = [next_delay(RetryPolicy(), 3, rng) for _ in range(200)]
    assert len(set(delays)) > 150
    assert min(delays) < 1200.0 < max(delays)


def test_same_seed_same_schedule():
    """The schedule is reproducible: two generators with the same seed give
    the same delays, because each call draws exactly one number."""
    first = random.Random(7)
    second = random.Random(7)
    policy = RetryPolicy()
    assert [next_delay(policy, n, first) for n in range(1, 20)] == [
        next_delay(policy, n, second) for n in range(1, 20)
    ]


def test_one_draw_per_call():
    """Each call consumes exactly one number from the generator, even
    without jitter, so the scheduler's stream stays in step."""
    rng = random.Random(8)
    reference = random.Random(8)
    next_delay(NO_JITTER, 1, rng)
    next_delay(RetryPolicy(), 5, rng)
    reference.random()
    reference.random()
    assert rng.random() == reference.random()


def test_delay_never_below_one_second():
    """A tiny initial delay with full downward jitter is raised to the one
    second floor, so a failing destination can never become a busy loop."""
    policy = RetryPolicy(initial=0.01, maximum=0.01, jitter=0.5)
    rng = random.Random(9)
    for _ in range(100):
        assert next_delay(policy, 1, rng) == MINIMUM_DELAY


@given(
    initial=st.floats(min_value=0.001, max_value=1e6),
    ratio=st.floats(min_value=1.0, max_value=1e4),
    factor=st.floats(min_value=1.0, max_value=100.0),
    jitter=st.floats(min_value=0.0, max_value=0.99),
    attempts=st.integers(min_value=1, max_value=10**6),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_bounds_hold_for_any_policy(initial, ratio, factor, jitter, attempts, seed):
    """For any valid policy and attempt count the delay is finite, at least
    one second and at most maximum * (1 + jitter)."""
    policy = RetryPolicy(initial=initial, maximum=initial * ratio, factor=factor, jitter=jitter)
    delay = next_delay(policy, attempts, random.Random(seed))
    assert MINIMUM_DELAY <= delay
    assert delay <= max(MINIMUM_DELAY, policy.maximum * (1 + jitter))


@pytest.mark.parametrize("attempts", [0, -1, 1.0, True, "1"])
def test_attempts_must_be_a_positive_integer(attempts):
    """Zero, negative or non-integer attempt counts are a caller bug and
    raise ValueError rather than producing a shrunken delay."""
    with pytest.raises(ValueError):
        next_delay(RetryPolicy(), attempts, random.Random(10))


def test_not_expired_before_max_age():
    """A message younger than max_age is retried."""
    policy = RetryPolicy(max_age=100.0)
    assert not expired(policy, received_at=1000.0, now=1000.0)
    assert not expired(policy, received_at=1000.0, now=1099.999)


def test_expired_at_and_after_max_age():
    """A message is expired from the moment its age reaches max_age."""
    policy = RetryPolicy(max_age=100.0)
    assert expired(policy, received_at=1000.0, now=1100.0)
    assert expired(policy, received_at=1000.0, now=10**9)


def test_default_expiry_is_five_days():
    """With the default policy a message expires after five days."""
    received = 1_700_000_000.0
    assert not expired(RetryPolicy(), received, received + 5 * 86400 - 1)
    assert expired(RetryPolicy(), received, received + 5 * 86400)


def test_clock_going_backwards_does_not_expire():
    """A clock stepped back before the reception time never expires a
    message early."""
    assert not expired(RetryPolicy(max_age=10.0), received_at=1000.0, now=500.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0.0},
        {"initial": -1.0},
        {"maximum": 10.0},  # below the default initial of 300
        {"factor": 0.5},
        {"jitter": -0.1},
        {"jitter": 1.0},
        {"max_age": 0.0},
        {"initial": float("nan")},
        {"maximum": float("inf")},
        {"factor": True},
        {"jitter": "0.1"},
    ],
)
def test_invalid_policy_is_refused(kwargs):
    """A policy that would shrink, collapse or never end the schedule is
    refused at construction with ValueError."""
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_policy_is_frozen():
    """A policy cannot be changed after validation."""
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.initial = 1.0  # type: ignore[misc]
