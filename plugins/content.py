# -*- test-case-name: tests.test_content,tests.e2e.test_policy_filters -*-
"""content: header rules, header limits, and blocking of dangerous attachments.

Three checks, all answered after the final dot of DATA:

B{Header limits} (the top-level header block): more than C{max_headers}
fields, or one field (name, colon and value with its folding) longer than
C{max_field_size} octets, is refused with C{552 5.3.4}.  0 turns a limit
off.  (C{[limits] max_header_size} bounds the whole block in the server.)

B{Header rules}, C{header_rules = ["/REGEX/ ACTION [text]", ...]}, as
Postfix's header_checks: every header field of the top-level header block
is matched, as the unfolded line C{Name: value}, against the rules in
order; the first rule that matches a field decides for that field.  A
field with RFC 2047 encoded words (C{=?utf-8?b?...?=}) is matched both as
sent and decoded.  Patterns are Python regular expressions, matched
case-insensitively (use C{(?-i:...)} for a case-sensitive part); the
pattern ends at the first C{/} followed by blanks and an action.
Actions (case-insensitive):

  - C{REJECT [text]}: C{550 5.7.1 text} (default "Message content
    rejected"); the message is not queued.
  - C{TEMPFAIL [text]} (or C{DEFER}): C{451 4.7.1 text}.
  - C{TAG Name: value} (or C{PREPEND}): adds the header field
    C{Name: value} to the message, once, and goes on.
  - C{HOLD [reason]}: the queue cannot hold a message on a plugin's
    request yet (the verdict has no HOLD action), so a held message is
    I{accepted and tagged} with C{X-Hold-Reason: reason} (default "held
    by content rule").  Route or filter on that field downstream, or use
    REJECT where a message must not get through.  The result is recorded
    as C{content=hold}.

B{Attachments}: every MIME part of the message, nested messages included,
is checked, by its file names (the C{filename} of Content-Disposition and
the C{name} of Content-Type, both after RFC 2231 and RFC 2047 decoding)
and by its media type.  A part is refused with C{550 5.7.1 Message
rejected: attachment "x.exe" is not allowed (.exe files are blocked)}
when:

  - the last extension of a name is in C{blocked_extensions}
    (case-insensitive; trailing dots and blanks are ignored, as Windows
    ignores them, so C{invoice.pdf.exe.} is C{exe});
  - a name matches a glob in C{blocked_filenames} (e.g. C{"*.pdf.*"});
  - the part's type matches a glob in C{blocked_types} (e.g.
    C{"application/x-msdownload"}, C{"application/x-ms*"}).

The message is read from the spool in a thread, line by line; only each
part's header block is parsed (with the stdlib email package), bodies are
skipped, so memory does not grow with the message.  A message with more
than C{max_mime_parts} parts or nested more than 30 multiparts deep is
refused with C{550 5.6.0}.  Archives (zip, rar, 7z) are not opened.

Options (C{[plugins.content]}):

  - C{header_rules = []}
  - C{max_headers = 500}, C{max_field_size = 102400}
  - C{blocked_extensions}: by default exe, scr, com, bat, cmd, pif, vbs,
    vbe, js, jse, wsf, wsh, hta, msi, msp, mst, jar, ps1, psm1, lnk, iso,
    img, vhd, vhdx, cpl, reg, scf, inf, chm, gadget, application, appx,
    msix, appref-ms, settingcontent-ms.  Setting the option replaces the
    whole list; C{[]} turns the check off.
  - C{blocked_filenames = []}
  - C{blocked_types}: by default application/x-msdownload,
    application/x-msdos-program, application/x-dosexec,
    application/x-ms-shortcut, application/hta, application/x-ms-installer.
  - C{max_mime_parts = 1000}

Example::

    [plugins.content]
    header_rules = [
        "/^Subject:.*\\\\bviagra\\\\b/ REJECT Looks like spam",
        "/^X-Mailer: MassMailer/ TAG X-Spam-Flag: YES",
        "/^From:.*@partner\\\\.example/ HOLD partner mail is reviewed",
    ]
    blocked_filenames = ["*.pdf.*", "*.doc.*"]
    max_headers = 300

(In TOML basic strings a regex backslash is written twice; a literal
string, C{'/^Subject:.*\\bviagra\\b/ REJECT'}, takes it as is.)

Standards: RFC 5322 §2.2, §3.6 (header fields); RFC 2045 §5, RFC 2046
§5.1 (multipart boundaries), §5.2.1 (message/rfc822), RFC 2183
(Content-Disposition), RFC 2231 (parameter encoding), RFC 2047 (encoded
words); RFC 3463 (5.3.4, 5.6.0, 5.7.1).
See also: Postfix header_checks(5), header_size_limit; amavis banned
files; plugins/dkim_verify.py (another IMessageCheck streaming the spool).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IHeadersCheck, IMessageCheck, IPluginFactory
from gateway.reply import Reply
from gateway.verdict import CONTINUE, Action, Verdict, cont

#: Extensions that run code on Windows (or mount disk images that do).
DEFAULT_EXTENSIONS = (
    "exe", "scr", "com", "bat", "cmd", "pif", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta",
    "msi", "msp", "mst", "jar", "ps1", "psm1", "lnk", "iso", "img", "vhd", "vhdx", "cpl",
    "reg", "scf", "inf", "chm", "gadget", "application", "appx", "msix", "appref-ms",
    "settingcontent-ms",
)

#: Media types of executables.
DEFAULT_TYPES = (
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
    "application/x-ms-shortcut", "application/hta", "application/x-ms-installer",
)

#: Header rule actions and their aliases.
ACTIONS = {"REJECT": "reject", "TEMPFAIL": "tempfail", "DEFER": "tempfail", "TAG": "tag",
           "PREPEND": "tag", "HOLD": "hold"}

#: The header field a HOLD adds while the queue cannot hold on request.
HOLD_HEADER = "X-Hold-Reason"

#: Multiparts nested deeper than this are refused.
MAX_DEPTH = 30

#: A part's header block beyond this is not parsed further.
MAX_PART_HEADER = 64 * 1024

_RULE_END = re.compile(r"/\s+(?P<action>[A-Za-z]+)(?=\s|$)")
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class HeaderRule:
    """One C{/REGEX/ ACTION [text]} rule.

    @ivar action: C{reject}, C{tempfail}, C{tag} or C{hold}.
    @ivar text: reply text, or the C{(name, value)} field to add as one
        string for C{tag}, or the hold reason.
    """

    pattern: str
    action: str
    text: str
    regex: Any = field(compare=False, repr=False)

    def header(self) -> tuple[str, str] | None:
        """The field a C{tag} or C{hold} rule adds."""
        if self.action == "hold":
            return HOLD_HEADER, self.text or "held by content rule"
        if self.action == "tag":
            name, _, value = self.text.partition(":")
            return name.strip(), value.strip()
        return None


def parse_header_rule(text: str) -> HeaderRule:
    """Parse C{/REGEX/ ACTION [text]}.

    The pattern ends at the first C{/} that is followed by blanks and a
    known action, so a pattern may itself contain C{/}.

    @raise ValueError: naming what is wrong.
    """
    stripped = text.strip()
    found = None
    if stripped.startswith("/"):
        for end in _RULE_END.finditer(stripped, 1):
            if end["action"].upper() in ACTIONS:
                found = end
                break
    if found is None:
        raise ValueError(f"{text!r}: expected /REGEX/ ACTION [text] with ACTION one of "
                         f"REJECT, TEMPFAIL, TAG, HOLD")
    pattern = stripped[1:found.start()]
    action = ACTIONS[found["action"].upper()]
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{text!r}: bad regular expression: {exc}") from None
    rule_text = stripped[found.end():].strip()
    if any(not (" " <= c < "\x7f") for c in rule_text):
        raise ValueError(f"{text!r}: the text must be printable ASCII")
    if action == "tag":
        name, colon, _ = rule_text.partition(":")
        if not colon or not _FIELD_NAME.match(name.strip()):
            raise ValueError(f"{text!r}: TAG needs a header field, e.g. TAG X-Spam-Flag: YES")
    return HeaderRule(pattern, action, rule_text, regex)


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def _decode_words(text: str) -> str:
    """C{text} with RFC 2047 encoded words decoded (as is when that fails)."""
    if "=?" not in text:
        return text
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(text)))
    except Exception:  # malformed encoded words, unknown charsets
        return text


@dataclass(frozen=True)
class Part:
    """One MIME entity found in a message (its header block only).

    @ivar content_type: the media type, lower case (with the RFC 2046
        defaults: text/plain, or message/rfc822 inside multipart/digest).
    @ivar filenames: the decoded C{filename} and C{name} parameters.
    @ivar depth: how many multiparts enclose it.
    """

    content_type: str
    filenames: tuple[str, ...]
    depth: int


class MIMEStructureError(ValueError):
    """The message has too many parts or is nested too deep to check."""


def _filenames(headers: Any) -> tuple[str, ...]:
    from email.utils import collapse_rfc2231_value

    names = []
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            value = headers.get_param(param, header=header)
            if value is None:
                continue
            text = collapse_rfc2231_value(value)
        except Exception:  # a malformed parameter must not hide the part
            continue
        text = _decode_words(str(text)).strip()
        if text:
            names.append(text)
    return tuple(dict.fromkeys(names))


def _boundary_hit(line: bytes, boundaries: list[tuple[bytes, str]]) -> tuple[int, bool] | None:
    """(index in C{boundaries}, closing) when C{line} is a delimiter line."""
    text = line.rstrip(b"\r\n").rstrip(b" \t")
    for index in range(len(boundaries) - 1, -1, -1):
        delimiter = boundaries[index][0]
        if text == delimiter:
            return index, False
        if text == delimiter + b"--":
            return index, True
    return None


def iter_parts(stream: BinaryIO, *, max_parts: int = 1000, max_depth: int = MAX_DEPTH) -> Iterator[Part]:
    """The MIME entities of the message in C{stream}, header blocks only.

    Why not C{email.parser.BytesFeedParser}: it keeps each part's body in
    memory until the part ends, so one large attachment would be held
    whole.  This reads line by line, keeps only the header block of the
    part being read and the stack of open boundaries, and hands each
    header block to the stdlib header parser.

    @raise MIMEStructureError: beyond C{max_parts} or C{max_depth}.
    """
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    parser = BytesHeaderParser(policy=compat32)
    boundaries: list[tuple[bytes, str]] = []  # (b"--" + boundary, multipart subtype)
    in_headers = True
    header = bytearray()
    default_type = "text/plain"
    count = 0

    def finish() -> tuple[Part, bool]:
        """Parse the header block read: (the part, whether headers follow)."""
        nonlocal count, default_type
        count += 1
        if count > max_parts:
            raise MIMEStructureError(f"more than {max_parts} MIME parts")
        headers = parser.parsebytes(bytes(header) + b"\r\n")
        headers.set_default_type(default_type)
        content_type = headers.get_content_type()
        part = Part(content_type, _filenames(headers), len(boundaries))
        default_type = "text/plain"
        if headers.get_content_maintype() == "multipart":
            boundary = headers.get_boundary()
            if boundary:
                if len(boundaries) >= max_depth:
                    raise MIMEStructureError(f"multiparts nested deeper than {max_depth}")
                boundaries.append((b"--" + boundary.encode("ascii", "surrogateescape"),
                                   headers.get_content_subtype()))
            return part, False
        if content_type == "message/rfc822":
            encoding = str(headers.get("content-transfer-encoding", "")).strip().lower()
            return part, encoding in ("", "7bit", "8bit", "binary")
        return part, False

    while True:
        line = stream.readline(65536)
        if not line:
            break
        if in_headers and line not in (b"\r\n", b"\n"):
            hit = _boundary_hit(line, boundaries) if boundaries and line.startswith(b"--") else None
            if hit is None:
                if len(header) < MAX_PART_HEADER:
                    header += line
                continue
            part, _ = finish()  # a part with headers and no body
            header.clear()
            yield part
        elif in_headers:
            part, in_headers = finish()
            header.clear()
            yield part
            continue
        else:
            if not (boundaries and line.startswith(b"--")):
                continue
            hit = _boundary_hit(line, boundaries)
            if hit is None:
                continue
        index, closing = hit
        del boundaries[index + 1:]
        if closing:
            boundaries.pop()
            in_headers = False
        else:
            in_headers = True
            default_type = "message/rfc822" if boundaries[index][1] == "digest" else "text/plain"
    if in_headers and header:
        part, _ = finish()
        yield part


def extension(filename: str) -> str:
    """The last extension of a file name as Windows sees it, lower case."""
    name = filename.split("\x00", 1)[0].replace("\\", "/").rsplit("/", 1)[-1]
    name = name.strip().rstrip(". \t")
    base, dot, ext = name.rpartition(".")
    return ext.lower() if dot else ""


@dataclass(frozen=True)
class Options:
    """C{[plugins.content]}.

    @ivar header_rules: C{/REGEX/ ACTION [text]} rules.
    @ivar max_headers: header fields allowed in the top-level block (0: any).
    @ivar max_field_size: octets allowed in one header field (0: any).
    @ivar blocked_extensions: file name extensions refused.
    @ivar blocked_filenames: file name globs refused.
    @ivar blocked_types: media type globs refused.
    @ivar max_mime_parts: MIME parts allowed in one message.
    """

    header_rules: tuple[str, ...] = ()
    max_headers: int = 500
    max_field_size: int = 102400
    blocked_extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    blocked_filenames: tuple[str, ...] = ()
    blocked_types: tuple[str, ...] = DEFAULT_TYPES
    max_mime_parts: int = 1000

    def __post_init__(self) -> None:
        for text in self.header_rules:
            try:
                parse_header_rule(text)
            except ValueError as exc:
                raise ValueError(f"header_rules: {exc}") from None
        for key in ("max_headers", "max_field_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must not be negative; got {getattr(self, key)!r}")
        if self.max_mime_parts < 1:
            raise ValueError(f"max_mime_parts must be at least 1; got {self.max_mime_parts!r}")
        for ext in self.blocked_extensions:
            if not ext.strip(". ") or "/" in ext:
                raise ValueError(f"blocked_extensions: {ext!r} is not an extension")
        for media in self.blocked_types:
            if "/" not in media:
                raise ValueError(f"blocked_types: {media!r} is not a media type such as application/x-msdownload")


def _printable(text: str, limit: int = 100) -> str:
    cleaned = "".join(c if " " <= c < "\x7f" and c != '"' else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


@implementer(IHeadersCheck, IMessageCheck)
class ContentCheck:
    """The C{content} plugin."""

    log = Logger()

    def __init__(self, options: Options, context: Any) -> None:
        self.options = options
        self._name = context.name
        self._run_in_thread = context.run_in_thread
        self.rules = tuple(parse_header_rule(text) for text in options.header_rules)
        self._extensions = frozenset(e.strip().lstrip(".").lower() for e in options.blocked_extensions)
        self._filenames = tuple(p.lower() for p in options.blocked_filenames)
        self._types = tuple(t.lower() for t in options.blocked_types)

    # -- headers -----------------------------------------------------------------

    def check_headers(self, session: Any, transaction: Any, headers: Any) -> Verdict:
        results = transaction.results
        fields = list(headers.raw_items())
        limit = self.options.max_headers
        if limit and len(fields) > limit:
            results.add(self._name, "reject", f"{len(fields)} header fields")
            return Verdict(Action.REJECT, Reply(552, "5.3.4", f"Message header has too many fields (limit {limit})"))
        limit = self.options.max_field_size
        if limit:
            for name, value in fields:
                size = len(name) + 1 + len(value.encode("utf-8", "surrogateescape"))
                if size > limit:
                    results.add(self._name, "reject", f"{name} field of {size} octets")
                    return Verdict(Action.REJECT, Reply(
                        552, "5.3.4", f"Message header field {_printable(name, 60)} is too long (limit {limit} octets)"))
        added: list[tuple[str, str]] = []
        for name, value in fields:
            verdict = self._match_field(f"{name}: {_unfold(value)}", results, added)
            if verdict is not None:
                return verdict
        return cont(add_headers=tuple(added))

    def _match_field(self, line: str, results: Any, added: list[tuple[str, str]]) -> Verdict | None:
        decoded = _decode_words(line)
        for rule in self.rules:
            if not (rule.regex.search(line) or (decoded is not line and rule.regex.search(decoded))):
                continue
            results.add(self._name, rule.action, f"/{rule.pattern}/")
            if rule.action == "reject":
                return Verdict(Action.REJECT, Reply(550, "5.7.1", rule.text or "Message content rejected"))
            if rule.action == "tempfail":
                return Verdict(Action.TEMPFAIL, Reply(451, "4.7.1", rule.text or "Message content deferred, try again later"))
            header = rule.header()
            if header is not None and header not in added:
                added.append(header)
            return None
        return None

    # -- attachments ---------------------------------------------------------------

    def blocked(self, part: Part) -> str | None:
        """Why C{part} is refused, or None."""
        from fnmatch import fnmatchcase

        for filename in part.filenames:
            ext = extension(filename)
            if ext and ext in self._extensions:
                return f"attachment \"{_printable(filename)}\" is not allowed (.{_printable(ext, 20)} files are blocked)"
            lowered = filename.lower()
            for pattern in self._filenames:
                if fnmatchcase(lowered, pattern):
                    return f"attachment \"{_printable(filename)}\" is not allowed"
        for pattern in self._types:
            if fnmatchcase(part.content_type, pattern):
                return f"attachments of type {_printable(part.content_type)} are not allowed"
        return None

    def scan(self, stream: BinaryIO) -> tuple[str, str] | None:
        """Read the message in C{stream} (blocking: run in a thread).

        @return: (C{"attachment"} or C{"structure"}, reason), or None.
        """
        try:
            for part in iter_parts(stream, max_parts=self.options.max_mime_parts):
                reason = self.blocked(part)
                if reason is not None:
                    return "attachment", reason
        except MIMEStructureError as exc:
            return "structure", str(exc)
        finally:
            stream.close()
        return None

    def check_message(self, session: Any, transaction: Any, message: Any) -> Any:
        if not (self._extensions or self._filenames or self._types):
            return CONTINUE
        from twisted.internet import defer

        stream = message.open()
        d = defer.maybeDeferred(self._run_in_thread, self.scan, stream)
        d.addCallback(self._attachment_verdict, transaction)
        return d

    def _attachment_verdict(self, found: tuple[str, str] | None, transaction: Any) -> Verdict:
        if found is None:
            transaction.results.add(self._name, "pass")
            return CONTINUE
        kind, reason = found
        transaction.results.add(self._name, "reject", reason)
        if kind == "structure":
            return Verdict(Action.REJECT, Reply(550, "5.6.0", f"Message rejected: MIME structure not accepted: {reason}"))
        return Verdict(Action.REJECT, Reply(550, "5.7.1", f"Message rejected: {reason}"))


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "content"
    options_type = Options
    description = "Content rules: header regex rules, header limits, dangerous attachment blocking."

    @staticmethod
    def build(options: Options, context: Any) -> ContentCheck:
        return ContentCheck(options, context)


factory = _Factory
