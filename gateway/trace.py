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
from typing import Any


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


def strip_forged_results(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove C{Authentication-Results:} fields that claim our authserv-id.

    RFC 8601 §5: a border MTA must delete such fields arriving from outside,
    or downstream filters would trust a forgery.  Fields of other
    authserv-ids are kept.  C{header} is the header block (fields with
    their CRLFs, without the blank line).

    @return: the header block without them, and how many were removed.
    """
    ours = authserv_id.lower().rstrip(".")
    out: list[bytes] = []
    removed = 0
    keep = True
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name, sep, value = line.partition(b":")
        keep = True
        if sep and name.strip().lower() == b"authentication-results":
            claimed = value.split(b";", 1)[0].strip().split()
            if claimed and claimed[0].decode("ascii", "replace").lower().rstrip(".") == ours:
                keep = False
                removed += 1
        if keep:
            out.append(line)
    return b"\r\n".join(out), removed


def authentication_results(authserv_id: str, notes: Any) -> str:
    """The value of our one C{Authentication-Results:} field (RFC 8601),
    from what the spf, dkim_verify and dmarc plugins recorded in
    C{transaction.notes}; C{none} when no method ran."""
    parts: list[str] = []
    spf = notes.get("spf") if "spf" in notes else None
    if spf:
        ptype = "smtp.helo" if spf.get("identity") == "helo" else "smtp.mailfrom"
        parts.append(f"spf={spf.get('result', 'none')} {ptype}={spf.get('domain') or 'unknown'}")
    dkim = notes.get("dkim") if "dkim" in notes else None
    if isinstance(dkim, dict):
        dkim = dkim.get("signatures", [])
    for signature in dkim or []:
        item = f"dkim={signature.get('result', 'none')}"
        if signature.get("domain"):
            item += f" header.d={signature['domain']}"
        if signature.get("selector"):
            item += f" header.s={signature['selector']}"
        if signature.get("algorithm"):
            item += f" header.a={signature['algorithm']}"
        parts.append(item)
    dmarc = notes.get("dmarc") if "dmarc" in notes else None
    if dmarc:
        comment = ""
        if dmarc.get("policy"):
            comment = f" (p={dmarc['policy']} dis={dmarc.get('disposition') or 'none'})"
        parts.append(f"dmarc={dmarc.get('result', 'none')}{comment} header.from={dmarc.get('domain') or 'unknown'}")
    if not parts:
        return f"{authserv_id}; none"
    return f"{authserv_id};\r\n\t" + ";\r\n\t".join(parts)
