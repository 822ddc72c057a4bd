"""Trace and submission headers: Received, Date, Message-ID.

Pure functions so the exact header text can be tested.  The C{Received:}
field follows RFC 5321 §4.4 with the Postfix-style comment for the client
and TLS; the protocol keyword follows RFC 3848 (ESMTP, ESMTPS, ESMTPSA).
A submission server adds C{Date:} and C{Message-ID:} when the client left
them out (RFC 6409 §8.2, §8.3).

Standards: RFC 5321 §4.4, RFC 3848, RFC 5322 §3.3/§3.6.4, RFC 6409 §8.
See also: Postfix cleanup(8); twisted.mail.smtp.SMTP.receivedHeader.
"""

from __future__ import annotations

import datetime
import email.utils
import secrets


def format_date(now: float) -> str:
    """An RFC 5322 date-time for the unix time C{now}, in local time with offset."""
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).astimezone()
    return email.utils.format_datetime(moment)


def received_header(*, helo: str | None, peer: str, peer_name: str | None, hostname: str,
                    protocol: str, queue_id: str, recipients: list[str],
                    tls: tuple[str, str] | None, now: float) -> tuple[str, str]:
    """The C{Received:} field this gateway prepends.

    @param tls: (version, cipher) when the session was encrypted.
    @param recipients: the envelope recipients; a C{for} clause is added
        only for exactly one, so a Bcc list is not disclosed.
    @return: (name, value) with continuation lines folded by CRLF TAB.
    """
    literal = f"IPv6:{peer}" if ":" in peer else peer
    client = f"{peer_name or 'unknown'} [{literal}]"
    lines = [f"from {_clean(helo) if helo else 'unknown'} ({client})"]
    lines.append(f"by {hostname} (mailgateway)")
    if tls is not None:
        lines.append(f"(using {tls[0]} with cipher {tls[1]})")
    with_clause = f"with {protocol} id {queue_id}"
    if len(recipients) == 1:
        lines.append(with_clause)
        lines.append(f"for <{recipients[0]}>; {format_date(now)}")
    else:
        lines.append(f"{with_clause}; {format_date(now)}")
    return "Received", "\r\n\t".join(lines)


def message_id(queue_id: str, hostname: str) -> str:
    """A globally unique C{Message-ID:} value for a message we queue."""
    return f"<{queue_id}.{secrets.token_hex(6)}@{hostname}>"


def _clean(text: str) -> str:
    """Keep a client-supplied name from breaking the header's syntax."""
    return "".join(c if 32 < ord(c) < 127 and c not in "()\\" else "?" for c in text)[:255]
