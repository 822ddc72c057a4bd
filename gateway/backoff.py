# -*- test-case-name: tests.test_backoff -*-
"""
Retry schedule for deferred mail: exponential backoff with jitter, and expiry.

A message that could not be delivered is tried again after a delay that
doubles with each failure, up to a ceiling, so that a destination that is
down for a minute is retried soon and one that is down for a day is not
hammered.  The delay is jittered by a few per cent so that the many messages
deferred by one outage do not all come due in the same second.  After
C{max_age} in the queue a message is given up and bounced (status 4.4.7).

Everything here is a pure function of its arguments: the random source and
the clock reading are passed in, so the scheduler's tests can replay a
schedule exactly.

Standards:
    RFC 5321 section 4.5.4.1 (retry intervals of at least 30 minutes are
    recommended and give-up times of 4-5 days), RFC 3463 section 3.5
    (4.4.7, delivery time expired).

See also:
    L{gateway.scheduler} (uses this to set C{Envelope.next_attempt}),
    L{gateway.dsn} (the bounce sent on expiry), Postfix
    C{minimal_backoff_time}, C{maximal_backoff_time} and
    C{maximal_queue_lifetime}, Twisted
    C{twisted.application.internet.backoffPolicy}.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

__all__ = ["MINIMUM_DELAY", "RetryPolicy", "expired", "next_delay"]

# Never schedule a retry sooner than this, whatever the policy and jitter
# say: a zero delay would turn a failing destination into a busy loop.
MINIMUM_DELAY: Final = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """
    How often to retry a deferred message and when to give up.

    Checked at construction, so that a policy read from the config can be
    trusted by the scheduler (a factor below one or a jitter of 100 % would
    make the schedule shrink or collapse to zero).

    @ivar initial: Delay in seconds after the first failed attempt.
    @ivar maximum: Ceiling of the delay before jitter, in seconds.
    @ivar factor: Growth of the delay per further failed attempt (>= 1).
    @ivar jitter: Relative spread, 0.1 for +-10 %; in [0, 1).
    @ivar max_age: Seconds after reception at which the message expires.
    @raise ValueError: If a value is out of range or not finite.
    """

    initial: float = 300.0
    maximum: float = 3600.0
    factor: float = 2.0
    jitter: float = 0.1
    max_age: float = 5 * 86400.0

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "factor", "jitter", "max_age"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number, not {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: must be finite, not {value!r}")
        if self.initial <= 0:
            raise ValueError(f"initial: must be positive, not {self.initial!r}")
        if self.maximum < self.initial:
            raise ValueError(
                f"maximum: must be at least initial ({self.initial!r}), not {self.maximum!r}"
            )
        if self.factor < 1:
            raise ValueError(f"factor: must be at least 1, not {self.factor!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: must be in [0, 1), not {self.jitter!r}")
        if self.max_age <= 0:
            raise ValueError(f"max_age: must be positive, not {self.max_age!r}")


def next_delay(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    """
    Seconds to wait before the next attempt, after C{attempts} failures.

    The base delay is C{initial * factor ** (attempts - 1)} capped at
    C{maximum}; it is then multiplied by a factor drawn uniformly from
    C{[1 - jitter, 1 + jitter]}.  The result is never below
    L{MINIMUM_DELAY} and never above C{maximum * (1 + jitter)} (the floor
    wins should a policy's maximum be under a second).  Exactly
    one number is drawn from C{rng} per call, so a seeded generator gives a
    reproducible schedule.  Any number of attempts is safe: the power is
    capped before it can overflow.

    @param policy: The retry policy.
    @param attempts: Failed attempts so far, 1 after the first failure.
    @param rng: Source of the jitter, e.g. C{random.Random()} held by the
        scheduler, or C{random.Random(seed)} in tests.
    @return: The delay in seconds.
    @raise ValueError: If C{attempts} is less than 1.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts: expected an integer >= 1, not {attempts!r}")
    factor = float(policy.factor)
    # Compare logarithms instead of computing the power, which overflows
    # a float long before the attempt count gets silly.
    if factor == 1.0 or (attempts - 1) * math.log(factor) < math.log(
        policy.maximum / policy.initial
    ):
        base = min(policy.initial * factor ** (attempts - 1), policy.maximum)
    else:
        base = float(policy.maximum)
    spread = rng.uniform(-policy.jitter, policy.jitter)
    delay = base * (1.0 + spread)
    # The floor wins over the ceiling for a (silly) maximum below a second.
    return max(min(delay, policy.maximum * (1.0 + policy.jitter)), MINIMUM_DELAY)


def expired(policy: RetryPolicy, received_at: float, now: float) -> bool:
    """
    Tell whether a message received at C{received_at} has been queued too
    long and should be bounced rather than retried.

    A message is expired from the moment its age reaches C{max_age}
    exactly, so that a scheduler waking at the deadline gives up then
    rather than one more retry interval later.

    @param policy: The retry policy.
    @param received_at: Unix time of reception (C{Envelope.received_at}).
    @param now: The current Unix time, from the injected clock.
    @return: L{True} if C{now - received_at >= policy.max_age}.
    """
    return now - received_at >= policy.max_age
