"""Tests for plugins/content.py: header rule parsing and actions, header
limits, the streaming MIME walker (structure, file name decoding, limits)
and attachment blocking through the real Pipeline with a MessageView over
spooled bytes.  The attachment scan runs in a real thread where the test
says so, bounded by a reactor timeout."""

from __future__ import annotations

import email.parser
import email.policy
import io
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from gateway.address import Mailbox
from gateway.config import ConfigError, parse_config
from gateway.pipeline import MessageView, Pipeline, PluginSlot
from gateway.registry import PluginContext, build_options
from gateway.session import Session, Transaction
from gateway.verdict import CONTINUE, Action
from plugins import content
from tests.support import base_config

WAIT = 10
_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def run_now(f: Any, *args: Any) -> Any:
    return f(*args)


def make(tmp_path: Path, run_in_thread: Any = run_now, **options: Any) -> Any:
    """The plugin built as the registry builds it."""
    config = parse_config(base_config(tmp_path), str(tmp_path / "gateway.toml"))
    settings = build_options(content.factory, options, config.path)
    context = PluginContext("content", Clock(), None, config, run_in_thread)
    return content.factory.build(settings.options, context)


def session() -> Session:
    return Session(id="s1", listener="mx", peer="192.0.2.10", helo="client.example.org")


def headers_of(raw: bytes) -> Any:
    """The header block as the server parses it."""
    return _PARSER.parsebytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")


def view(raw: bytes) -> MessageView:
    """A MessageView over spooled bytes, as the server gives plugins."""
    return MessageView(headers_of(raw), len(raw), lambda: io.BytesIO(raw))


def check_headers(plugin: Any, raw: bytes) -> tuple[Any, Transaction]:
    txn = Transaction(sender=Mailbox("a", "example.org"))
    return plugin.check_headers(session(), txn, headers_of(raw)), txn


def check_message(plugin: Any, raw: bytes) -> Any:
    txn = Transaction(sender=Mailbox("a", "example.org"))
    return fired(plugin.check_message(session(), txn, view(raw)))


def fired(result: Any) -> Any:
    """The verdict, or the result of an already fired Deferred (run_now
    makes the scan synchronous)."""
    if not isinstance(result, defer.Deferred):
        return result
    results: list[Any] = []
    result.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def mime(*parts: tuple[str, bytes], outer: str = "multipart/mixed", boundary: str = "BOUNDARY") -> bytes:
    """A multipart message with the given (header lines, body) parts."""
    out = [b"From: a@example.org\r\nSubject: test\r\nMIME-Version: 1.0\r\n",
           f'Content-Type: {outer}; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode()]
    for headers, body in parts:
        out.append(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + body + b"\r\n")
    out.append(f"--{boundary}--\r\nepilogue\r\n".encode())
    return b"".join(out)


def attachment(filename: str, ctype: str = "application/octet-stream") -> tuple[str, bytes]:
    return (f'Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n'
            f'Content-Disposition: attachment; filename="{filename}"', b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n" * 3)


TEXT = ("Content-Type: text/plain; charset=utf-8", b"Hello")

# -- header rule parsing ------------------------------------------------------------------


@pytest.mark.parametrize("text, pattern, action, rule_text", [
    ("/^Subject:.*viagra/ REJECT No spam", "^Subject:.*viagra", "reject", "No spam"),
    ("/^X-Mailer: a/b/ tempfail", "^X-Mailer: a/b", "tempfail", ""),
    ("/x/ DEFER later", "x", "tempfail", "later"),
    ("/x/ TAG X-Spam-Flag: YES", "x", "tag", "X-Spam-Flag: YES"),
    ("/x/ PREPEND X-A: b/ c", "x", "tag", "X-A: b/ c"),
    ("/x/ hold partner review", "x", "hold", "partner review"),
])
def test_parse_header_rule(text: str, pattern: str, action: str, rule_text: str):
    """/REGEX/ ACTION [text]: the pattern ends at the first / followed by a
    known action, so it may contain / itself; aliases map to the four actions."""
    rule = content.parse_header_rule(text)
    assert (rule.pattern, rule.action, rule.text) == (pattern, action, rule_text)


@pytest.mark.parametrize("text, problem", [
    ("^Subject: x REJECT", "expected /REGEX/"),
    ("/x/ DISCARD", "expected /REGEX/"),
    ("/(/ REJECT", "bad regular expression"),
    ("/x/ TAG no colon", "TAG needs a header field"),
    ("/x/ TAG : value", "TAG needs a header field"),
    ("/x/ REJECT caf\u00e9", "printable ASCII"),
])
def test_parse_header_rule_refuses_mistakes(text: str, problem: str):
    """Malformed rules are errors naming the problem."""
    with pytest.raises(ValueError, match=problem):
        content.parse_header_rule(text)


def test_bad_options_are_config_errors(tmp_path: Path):
    """Options are validated when the config is read."""
    path = str(tmp_path / "gateway.toml")
    with pytest.raises(ConfigError, match="header_rules"):
        build_options(content.factory, {"header_rules": ["/x/ NOPE"]}, path)
    with pytest.raises(ConfigError, match="media type"):
        build_options(content.factory, {"blocked_types": ["exe"]}, path)
    with pytest.raises(ConfigError, match="max_headers"):
        build_options(content.factory, {"max_headers": -1}, path)


# -- header rules ---------------------------------------------------------------------------

MESSAGE = (b"Received: from a\r\nFrom: Someone <a@example.org>\r\nSubject: Cheap\r\n\tViagra here\r\n"
           b"X-Mailer: MassMailer 2.0\r\n\r\nbody\r\n")


def test_reject_rule_matches_unfolded_line_case_insensitively(tmp_path: Path):
    """A REJECT rule sees "Name: value" with folding removed, regardless of
    case, and answers 550 5.7.1 with its text."""
    plugin = make(tmp_path, header_rules=[r"/^subject:.*cheap\sviagra/ REJECT Looks like spam"])
    verdict, txn = check_headers(plugin, MESSAGE)
    assert (verdict.action, verdict.reply.code, verdict.reply.status, verdict.reply.text) == (
        Action.REJECT, 550, "5.7.1", "Looks like spam")
    assert [(r.result, r.detail) for r in txn.results] == [("reject", r"/^subject:.*cheap\sviagra/")]


def test_case_sensitive_part_with_inline_flag(tmp_path: Path):
    """(?-i:...) makes a part of the pattern case-sensitive."""
    plugin = make(tmp_path, header_rules=["/^X-Mailer: (?-i:massmailer)/ REJECT"])
    assert check_headers(plugin, MESSAGE)[0] is CONTINUE


def test_tempfail_rule(tmp_path: Path):
    """TEMPFAIL answers 451 4.7.1 (default text when none given)."""
    verdict, _ = check_headers(make(tmp_path, header_rules=["/^X-Mailer: Mass/ TEMPFAIL"]), MESSAGE)
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.1")
    assert verdict.reply.text == "Message content deferred, try again later"


def test_tag_and_hold_add_header_fields_once(tmp_path: Path):
    """TAG adds its field once however many fields match; HOLD accepts and
    tags with X-Hold-Reason (the queue has no hold-on-request yet)."""
    plugin = make(tmp_path, header_rules=["/^(From|Subject):/ TAG X-Spam-Flag: YES",
                                          "/^X-Mailer:/ HOLD mass mail is reviewed"])
    verdict, txn = check_headers(plugin, MESSAGE)
    assert verdict.action is Action.CONTINUE
    assert verdict.add_headers == (("X-Spam-Flag", "YES"), ("X-Hold-Reason", "mass mail is reviewed"))
    assert [r.result for r in txn.results] == ["tag", "tag", "hold"]


def test_first_matching_rule_decides_per_field(tmp_path: Path):
    """For one field only the first matching rule applies: a TAG listed
    before a REJECT for the same field wins; other fields still run."""
    plugin = make(tmp_path, header_rules=["/^Subject:/ TAG X-Seen: subject", "/^Subject:/ REJECT"])
    verdict, _ = check_headers(plugin, MESSAGE)
    assert verdict.add_headers == (("X-Seen", "subject"),)


def test_encoded_words_are_matched_decoded(tmp_path: Path):
    """A field with RFC 2047 encoded words matches on its decoded text too."""
    raw = b"Subject: =?utf-8?b?Q2hlYXAgVmlhZ3Jh?=\r\n\r\nbody\r\n"
    plugin = make(tmp_path, header_rules=["/^Subject: cheap viagra/ REJECT"])
    assert check_headers(plugin, raw)[0].action is Action.REJECT


def test_raw_8bit_header_does_not_break_rules(tmp_path: Path):
    """A header with raw 8-bit bytes is matched without raising."""
    raw = b"Subject: caf\xc3\xa9 \xff\r\n\r\nbody\r\n"
    plugin = make(tmp_path, header_rules=["/^Subject: caf/ TAG X-Cafe: yes"])
    assert check_headers(plugin, raw)[0].add_headers == (("X-Cafe", "yes"),)


def test_too_many_header_fields(tmp_path: Path):
    """More fields than max_headers is 552 5.3.4; 0 turns the limit off."""
    raw = b"".join(b"X-N: %d\r\n" % i for i in range(11)) + b"\r\nbody\r\n"
    verdict, _ = check_headers(make(tmp_path, max_headers=10), raw)
    assert (verdict.reply.code, verdict.reply.status) == (552, "5.3.4")
    assert "too many fields (limit 10)" in verdict.reply.text
    assert check_headers(make(tmp_path, max_headers=11), raw)[0] is CONTINUE
    assert check_headers(make(tmp_path, max_headers=0), raw)[0] is CONTINUE


def test_too_long_header_field(tmp_path: Path):
    """One field (folded lines included) longer than max_field_size is
    552 5.3.4 naming the field."""
    raw = b"References: " + b"\r\n <id@example.org>" * 100 + b"\r\n\r\nbody\r\n"
    verdict, _ = check_headers(make(tmp_path, max_field_size=1000), raw)
    assert (verdict.reply.code, verdict.reply.text) == (
        552, "Message header field References is too long (limit 1000 octets)")
    assert check_headers(make(tmp_path, max_field_size=0), raw)[0] is CONTINUE


# -- the MIME walker ----------------------------------------------------------------------------


def parts_of(raw: bytes, **kwargs: Any) -> list[content.Part]:
    return list(content.iter_parts(io.BytesIO(raw), **kwargs))


def test_walker_finds_nested_parts_and_names():
    """Nested multiparts, message/rfc822 and multipart/digest (whose parts
    default to message/rfc822) are walked; file names come from both
    Content-Disposition and Content-Type, RFC 2231 and RFC 2047 decoded."""
    inner = (b"Subject: forwarded\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
             b"--inner\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
             b"--inner\r\nContent-Type: application/octet-stream; name=\"=?utf-8?B?aW52b2ljZS5leGU=?=\"\r\n"
             b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\nAAAA\r\n"
             b"--inner--\r\n")
    digest = b"--d\r\n\r\nSubject: item\r\n\r\nbody\r\n--d--"
    raw = mime(TEXT, ("Content-Type: message/rfc822", inner),
               ("Content-Type: multipart/digest; boundary=d", digest))
    found = [(p.content_type, p.filenames, p.depth) for p in parts_of(raw)]
    assert found == [
        ("multipart/mixed", (), 0),
        ("text/plain", (), 1),
        ("message/rfc822", (), 1),
        ("multipart/alternative", (), 1),
        ("text/html", (), 2),
        ("application/octet-stream", ("résumé.pdf", "invoice.exe"), 2),
        ("multipart/digest", (), 1),
        ("message/rfc822", (), 2),
        ("text/plain", (), 2),
    ]


def test_walker_does_not_look_inside_bodies():
    """Header-like lines and unknown boundaries inside a body are body;
    a base64 message/rfc822 is not parsed as headers; a delimiter with
    trailing blanks still ends the part."""
    body = b"Content-Type: application/x-msdownload\r\n--OTHER\r\nnot a header"
    raw = mime(("Content-Type: text/plain", body),
               ("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64", b"U3ViamVjdDogeA=="))
    raw = raw.replace(b"--BOUNDARY--", b"--BOUNDARY--  ")
    found = [p.content_type for p in parts_of(raw)]
    assert found == ["multipart/mixed", "text/plain", "message/rfc822"]


def test_walker_handles_headers_only_and_single_part_messages():
    """A message that is all header (or a part with no blank line before
    the next delimiter) is still reported; a plain message is one part."""
    assert [p.content_type for p in parts_of(b"Subject: x\r\n")] == ["text/plain"]
    raw = mime(("Content-Type: application/pdf; name=a.pdf", b"x"))
    raw = raw.replace(b"name=a.pdf\r\n\r\n\r\nx", b"name=a.pdf")
    assert [p.filenames for p in parts_of(raw)][-1] == ("a.pdf",)
    single = b"Content-Type: application/octet-stream; name=run.exe\r\n\r\nMZ\r\n"
    assert [p.filenames for p in parts_of(single)] == [("run.exe",)]


def test_walker_limits_parts_and_depth():
    """Beyond max_parts or the nesting limit the walker raises
    MIMEStructureError instead of walking on."""
    raw = mime(*[TEXT] * 5)
    with pytest.raises(content.MIMEStructureError, match="more than 3"):
        parts_of(raw, max_parts=3)
    nested = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(1, 6):
        nested += f"--b{level - 1}\r\nContent-Type: multipart/mixed; boundary=b{level}\r\n\r\n".encode()
    with pytest.raises(content.MIMEStructureError, match="deeper than 3"):
        parts_of(nested, max_depth=3)


@pytest.mark.parametrize("filename, ext", [
    ("invoice.exe", "exe"), ("Invoice.PDF.EXE", "exe"), ("invoice.exe.", "exe"), ("invoice.exe . ", "exe"),
    ("C:\\temp\\run.JS", "js"), ("dir/run.vbs", "vbs"), ("run.exe\x00.pdf", "exe"), ("README", ""),
    (".exe", "exe"), ("invoice\u202efdp.exe", "exe"),
])
def test_extension_as_windows_sees_it(filename: str, ext: str):
    """The last extension, after paths, trailing dots and blanks, and NUL."""
    assert content.extension(filename) == ext


# -- attachment checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["invoice.pdf.exe", "SCRIPT.JS", "disk.iso.", "=?utf-8?B?cnVuLnNjcg==?="])
def test_default_extensions_are_blocked(tmp_path: Path, filename: str):
    """Dangerous extensions from the default list are refused with
    550 5.7.1 naming the file (encoded names decoded first)."""
    verdict = check_message(make(tmp_path), mime(TEXT, attachment(filename)))
    assert (verdict.action, verdict.reply.code, verdict.reply.status) == (Action.REJECT, 550, "5.7.1")
    assert verdict.reply.text.startswith("Message rejected: attachment \"")


def test_harmless_attachments_pass(tmp_path: Path):
    """A PDF and a text part pass, recorded as pass."""
    txn = Transaction(sender=None)
    plugin = make(tmp_path)
    verdict = plugin.check_message(session(), txn, view(mime(TEXT, attachment("report.pdf", "application/pdf"))))
    assert fired(verdict) is CONTINUE
    assert [r.result for r in txn.results] == ["pass"]


def test_name_in_content_type_counts_too(tmp_path: Path):
    """A harmless Content-Disposition name does not hide a dangerous
    Content-Type name."""
    part = ('Content-Type: application/octet-stream; name="run.exe"\r\n'
            'Content-Disposition: attachment; filename="report.pdf"', b"MZ")
    assert check_message(make(tmp_path), mime(TEXT, part)).action is Action.REJECT


def test_blocked_types_and_filename_globs(tmp_path: Path):
    """Media types match blocked_types globs; names match blocked_filenames
    globs case-insensitively; an empty extension list lets .exe through."""
    plugin = make(tmp_path, blocked_extensions=[], blocked_types=["application/x-ms*"])
    verdict = check_message(plugin, mime(TEXT, ("Content-Type: application/x-msdownload", b"MZ")))
    assert verdict.reply.text == "Message rejected: attachments of type application/x-msdownload are not allowed"
    assert check_message(plugin, mime(TEXT, attachment("run.exe"))) is CONTINUE
    plugin = make(tmp_path, blocked_extensions=[], blocked_types=[], blocked_filenames=["*.pdf.*"])
    assert check_message(plugin, mime(TEXT, attachment("Invoice.PDF.zip"))).action is Action.REJECT


def test_nothing_to_check_reads_nothing(tmp_path: Path):
    """With every attachment list empty the message is not opened."""
    plugin = make(tmp_path, blocked_extensions=[], blocked_types=[])
    opened = []
    message = MessageView(headers_of(MESSAGE), len(MESSAGE), lambda: opened.append(1) or io.BytesIO(MESSAGE))
    assert plugin.check_message(session(), Transaction(sender=None), message) is CONTINUE
    assert opened == []


def test_too_complex_structure_is_refused(tmp_path: Path):
    """More parts than max_mime_parts is 550 5.6.0."""
    verdict = check_message(make(tmp_path, max_mime_parts=3), mime(*[TEXT] * 5))
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.6.0")


def test_file_is_closed_after_the_scan(tmp_path: Path):
    """The spool file opened for the scan is closed, found or not."""
    files = []

    def opener():
        files.append(io.BytesIO(mime(TEXT, attachment("run.exe"))))
        return files[-1]

    message = MessageView(headers_of(MESSAGE), 0, opener)
    make(tmp_path).check_message(session(), Transaction(sender=None), message)
    assert files and files[0].closed


@pytest_twisted.ensureDeferred
async def test_scan_runs_in_a_thread_through_the_pipeline(tmp_path: Path):
    """Through the real Pipeline, with run_in_thread a real thread: the
    headers stage tags, the message stage refuses the .exe."""
    plugin = make(tmp_path, run_in_thread=threads.deferToThread,
                  header_rules=["/^Subject: test/ TAG X-Checked: yes"])
    pipe = Pipeline("mx", [PluginSlot("content", plugin, timeout=WAIT)], reactor)
    raw = mime(TEXT, attachment("run.exe"))
    txn = Transaction(sender=None)
    outcome = pipe.run("headers", session(), txn, headers_of(raw))
    assert outcome.add_headers == (("X-Checked", "yes"),)
    pending = pipe.run("message", session(), txn, view(raw))
    assert isinstance(pending, defer.Deferred)
    outcome = await pending.addTimeout(WAIT, reactor)
    assert (outcome.action, outcome.reply.code, outcome.plugin) == (Action.REJECT, 550, "content")


def test_large_attachment_body_is_not_kept(tmp_path: Path):
    """The walker keeps header blocks only: a 2 MB attachment produces a
    Part without its body, and reading goes line by line (each readline
    is bounded)."""
    big = b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB\r\n" * 26000
    raw = mime(TEXT, ("Content-Type: application/pdf; name=big.pdf", big))

    class Recorder(io.BytesIO):
        biggest = 0

        def readline(self, size=-1):
            assert 0 < size <= 65536
            line = super().readline(size)
            Recorder.biggest = max(Recorder.biggest, len(line))
            return line

    parts = list(content.iter_parts(Recorder(raw)))
    assert [p.filenames for p in parts][-1] == ("big.pdf",)
    assert Recorder.biggest < 200
    assert check_message(make(tmp_path), raw) is CONTINUE
