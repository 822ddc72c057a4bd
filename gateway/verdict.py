"""Plugin verdicts: what a pipeline hook decides, as a typed value.

A hook never touches the protocol; it returns a L{Verdict} and the runner
turns it into a reply.  The constructors check that a rejection carries a
5xx reply and a temporary failure a 4xx one, so a plugin cannot send a
permanent code with a temporary status by accident.

Standards: RFC 5321 §4.2.1 (reply classes), RFC 3463 (status classes).
See also: Haraka's OK/DENY/DENYSOFT; Postfix access(5) OK/REJECT/DEFER/DUNNO.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.reply import Reply


class Action(enum.Enum):
    """What the pipeline does after a hook.

    CONTINUE goes on to the next plugin; ACCEPT ends the stage successfully;
    REJECT (5xx) and TEMPFAIL (4xx) end it with the verdict's reply.
    """

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A hook's decision.

    @ivar action: the L{Action}.
    @ivar reply: the reply to send; required for REJECT and TEMPFAIL, and
        optional for ACCEPT (replaces the default positive reply).
    @ivar disconnect: close the connection after the reply (421/554).
    @ivar add_headers: header fields (name, value) to prepend to the message.
    """

    action: Action
    reply: Reply | None = None
    disconnect: bool = False
    add_headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.action is Action.REJECT:
            if self.reply is None or not self.reply.is_permanent:
                raise ValueError("a REJECT verdict needs a 5xx reply")
        elif self.action is Action.TEMPFAIL:
            if self.reply is None or not self.reply.is_temporary:
                raise ValueError("a TEMPFAIL verdict needs a 4xx reply")
        elif self.action is Action.ACCEPT:
            if self.reply is not None and not self.reply.is_positive:
                raise ValueError("an ACCEPT verdict needs a 2xx/3xx reply or none")
        elif self.reply is not None:
            raise ValueError("a CONTINUE verdict carries no reply")
        for name, value in self.add_headers:
            if not name or ":" in name or any(c in name for c in " \t\r\n"):
                raise ValueError(f"bad header name {name!r}")
            unfolded = value.replace("\r\n\t", "\t").replace("\r\n ", " ")
            if "\r" in unfolded or "\n" in unfolded:
                raise ValueError(f"bad header value for {name}")

    @property
    def is_final(self) -> bool:
        """True when the verdict ends its stage."""
        return self.action is not Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)


def cont(add_headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
    """Go on to the next plugin, optionally adding header fields."""
    if not add_headers:
        return CONTINUE
    return Verdict(Action.CONTINUE, add_headers=tuple(add_headers))


def accept(reply: Reply | None = None, add_headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
    """End the stage with success (Postfix C{OK}, Haraka C{OK})."""
    return Verdict(Action.ACCEPT, reply, add_headers=tuple(add_headers))


def reject(
    code: int = 550, status: str = "5.7.1", text: str = "Rejected by policy",
    disconnect: bool = False,
) -> Verdict:
    """End the stage with a permanent failure (Postfix C{REJECT}, Haraka C{DENY})."""
    return Verdict(Action.REJECT, Reply(code, status, text), disconnect=disconnect)


def tempfail(
    code: int = 451, status: str = "4.7.1", text: str = "Try again later",
    disconnect: bool = False,
) -> Verdict:
    """End the stage with a temporary failure (Postfix C{DEFER}, Haraka C{DENYSOFT})."""
    return Verdict(Action.TEMPFAIL, Reply(code, status, text), disconnect=disconnect)


def from_reply(reply: Reply, disconnect: bool = False) -> Verdict:
    """The verdict that answers with C{reply}, whatever its class."""
    if reply.is_permanent:
        return Verdict(Action.REJECT, reply, disconnect=disconnect)
    if reply.is_temporary:
        return Verdict(Action.TEMPFAIL, reply, disconnect=disconnect)
    return Verdict(Action.ACCEPT, reply)
