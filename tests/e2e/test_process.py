"""The gateway as an operator runs it: C{twistd -n mailgateway -c FILE} and
C{gatewayctl check-config FILE} in real processes, on real sockets.

Covers what only the process boundary shows: the twistd plugin is found,
bad configurations end start-up with one line (file and key) and no
traceback, the sample config runs with its self-signed certificate, SIGTERM
stops cleanly without losing an acknowledged message, and the crash test:
SIGKILL in the middle of concurrent traffic, restart, and a byte-for-byte
check that every message that got "250 ... queued as ID" is in the spool.

Every process is started by these tests and killed by them at the end;
every wait is bounded (process timeouts, socket timeouts, Event waits).
Ports are 0 in the configs and read back from the log line
"listener NAME on 127.0.0.1:PORT".
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support import (
    REPO,
    base_config,
    insecure_tls,
    queued,
    subprocess_env,
    twistd_command,
    write_config,
)

# Bounds for every wait, in seconds.
START_TIMEOUT = 30
STOP_TIMEOUT = 20
RUN_TIMEOUT = 60

# twistd ends a SIGTERM'd process by re-raising the signal after the clean
# shutdown (twisted.application.app._exitWithSignal), so the status is
# -SIGTERM, not 0; see test_sigterm_exit_status_is_zero.
CLEAN_SIGTERM_EXIT = (0, -signal.SIGTERM)

_QUEUED_AS = re.compile(rb"queued as ([0-9A-V]{16})")
_RECOVERED = re.compile(
    r"Spool (?P<path>.+) recovered: (?P<queued>\d+) queued, (?P<requeued>\d+) requeued, "
    r"(?P<corrupt>\d+) corrupt, (?P<orphans>\d+) orphans removed, "
    r"(?P<tmp>\d+) temporary files removed")


def _env() -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _twistd_prefix(config: Path) -> list[str]:
    """The command that runs twistd itself (what comes before C{-n})."""
    command = twistd_command(config)
    return command[:command.index("-n")]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run to completion (bounded), stdout and stderr merged."""
    return subprocess.run(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace",
                          timeout=RUN_TIMEOUT)


def _check_config(path: Path | str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "gateway.ctl", "check-config", str(path), *extra], cwd)


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


class GatewayProcess:
    """One C{twistd -n mailgateway} subprocess and its collected output."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            twistd_command(config), cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        """The first output line matching C{pattern}, waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "exited" if self._eof else f"timed out after {timeout}s"
                    raise AssertionError(
                        f"gateway {why} before logging {pattern!r}; output:\n" + "\n".join(self.lines))
                self._changed.wait(remaining)

    def port(self, listener: str) -> int:
        return int(self.wait_for(rf"listener {re.escape(listener)} on 127\.0\.0\.1:(\d+)").group(1))

    def started(self) -> None:
        self.wait_for(r"mailgateway started: spool ")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send C{sig}, wait (bounded) for the exit and the end of output."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            raise AssertionError(f"gateway did not exit within {timeout}s of signal {sig}; output:\n"
                                 + self.output)
        self._reader.join(STOP_TIMEOUT)
        return status

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        self.proc.stdout.close()


@pytest.fixture
def launch() -> Callable[..., GatewayProcess]:
    """Start gateways; every one still running at the end is killed."""
    started: list[GatewayProcess] = []

    def start(config: Path, cwd: Path) -> GatewayProcess:
        gateway = GatewayProcess(config, cwd)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.cleanup()


@pytest.fixture
def busy_port() -> int:
    """A port on 127.0.0.1 held by a listening socket of ours."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def _plain_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A working config with one plaintext listener "mx" on port 0."""
    doc = base_config(tmp_path, **sections)
    if "listener" not in sections:
        doc["listener"] = [{"name": "mx", "address": "127.0.0.1", "port": 0, "tls": "none",
                            "plugins": ["relay_guard"]}]
    return doc


def _simple_message(token: str) -> bytes:
    return (f"From: <sender@clients.test>\r\nTo: <user@example.test>\r\n"
            f"Subject: {token}\r\n\r\nHello {token}.\r\n").encode("ascii")


# -- 1. the twistd plugin -------------------------------------------------------


def test_twistd_help_lists_mailgateway(tmp_path: Path) -> None:
    """C{twistd --help} lists the mailgateway plugin, and C{twistd mailgateway
    --help} documents C{--config} and C{-c}."""
    prefix = _twistd_prefix(tmp_path / "unused.toml")
    result = _run(prefix + ["--help"], tmp_path)
    assert result.returncode == 0, result.stdout
    assert re.search(r"^\s+mailgateway\s+\S", result.stdout, re.MULTILINE), result.stdout

    result = _run(prefix + ["mailgateway", "--help"], tmp_path)
    assert result.returncode == 0, result.stdout
    assert re.search(r"^\s*-c, --config=", result.stdout, re.MULTILINE), result.stdout
    assert "Traceback" not in result.stdout


# -- 2. start, accept, stop -----------------------------------------------------


def test_accepts_mail_and_stops_cleanly_on_sigterm(tmp_path: Path, launch) -> None:
    """The gateway started by C{twistd -n mailgateway -c FILE} queues a
    message sent with smtplib, and SIGTERM stops it cleanly: the process
    exits in bounded time and logs "mailgateway stopped"."""
    config = write_config(tmp_path, base_config(tmp_path))
    gateway = launch(config, tmp_path)
    port = gateway.port("mx")
    gateway.started()

    content = _simple_message("process-test-1")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("sender@clients.test")[0] == 250
        assert client.rcpt("user@example.test")[0] == 250
        code, text = client.data(content)
    assert code == 250, text
    queue_id = _QUEUED_AS.search(text).group(1).decode()

    status = gateway.stop(signal.SIGTERM)
    assert status in CLEAN_SIGTERM_EXIT, gateway.output
    assert "mailgateway stopped" in gateway.output
    assert "Traceback" not in gateway.output

    [(envelope, stored)] = queued(tmp_path / "spool")
    assert envelope.queue_id == queue_id
    assert envelope.sender == "sender@clients.test"
    assert [r.address for r in envelope.recipients] == ["user@example.test"]
    assert stored == content


def _idle_client(port: int) -> socket.socket:
    """A raw connection that has been greeted and said EHLO, now idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    received = b""
    for command in (b"", b"EHLO client.test\r\n"):
        sock.sendall(command)
        while not re.search(rb"(^|\r\n)2\d\d [^\r\n]*\r\n$", received):
            chunk = sock.recv(4096)
            assert chunk, f"closed early: {received!r}"
            received += chunk
        received = b""
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except OSError as exc:
        received += f"<{exc!r}>".encode()
    return received


def test_sigterm_says_421_to_idle_clients(tmp_path: Path, launch) -> None:
    """On SIGTERM every idle client is told "421 4.3.2" before its
    connection is closed (GatewaySMTP.shutdown)."""
    config = write_config(tmp_path, _plain_config(tmp_path))
    gateway = launch(config, tmp_path)
    port = gateway.port("mx")
    gateway.started()
    clients = [_idle_client(port) for _ in range(3)]
    try:
        assert gateway.stop(signal.SIGTERM) in CLEAN_SIGTERM_EXIT, gateway.output
        replies = [_read_to_eof(sock) for sock in clients]
    finally:
        for sock in clients:
            sock.close()
    assert all(reply.startswith(b"421 4.3.2 ") for reply in replies), replies


def test_minimal_config_with_defaults_starts(tmp_path: Path, launch) -> None:
    """A config that leaves every [server] limit and [dns] timeout at its
    default starts and advertises the default SIZE (10 MiB)."""
    doc = {
        "server": {"hostname": "mx.example.test", "local_domains": ["example.test"]},
        "listener": [{"name": "mx", "port": 0}],
        "queue": {"path": str(tmp_path / "spool")},
    }
    config = write_config(tmp_path, doc)
    gateway = launch(config, tmp_path)
    port = gateway.port("mx")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.esmtp_features.get("size") == str(10 * 1024 * 1024)
    assert gateway.stop(signal.SIGTERM) in CLEAN_SIGTERM_EXIT, gateway.output


# -- 3. bad configurations ------------------------------------------------------


def _set_listener(**values: Any) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        doc["listener"][0].update(values)
    return change


def _set(section: str, **values: Any) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        doc.setdefault(section, {}).update(values)
    return change


def _add_plugin_table(doc: dict) -> None:
    doc["plugins"] = {"relay_guard": {"frobnicate": 1}}


# (id, change to a good config, what the one line must say after "FILE: ")
BAD_CONFIGS = [
    ("unknown-server-key", _set("server", frobnicate=True),
     "[server] frobnicate: unknown key"),
    ("wrong-type", _set("server", max_recipients="many"),
     "[server] max_recipients: expected an integer"),
    ("bad-address", _set_listener(address="300.1.1.1"),
     "[[listener]] 'mx' address: not an IP address: '300.1.1.1'"),
    ("bad-tls-mode", _set_listener(tls="sometimes"),
     "[[listener]] 'mx' tls: must be one of"),
    ("unknown-plugin", _set_listener(plugins=["relay_guard", "no_such_plugin"]),
     "[[listener]] 'mx' plugins: no plugin named 'no_such_plugin'"),
    ("unknown-plugin-option", _add_plugin_table,
     "[plugins.relay_guard] frobnicate: unknown key"),
    ("no-relay-guard", _set_listener(plugins=[]),
     "[[listener]] 'mx' plugins: must include \"relay_guard\""),
]


def _assert_one_line_error(result: subprocess.CompletedProcess, prefix: str, path: Path,
                           expected: str) -> None:
    output = result.stdout
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = _lines(output)
    assert len(lines) == 1, output
    assert lines[0].startswith(f"{prefix}: {path}: {expected}"), output


def _bad_config(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    doc = _plain_config(tmp_path)
    change(doc)
    return write_config(tmp_path, doc)


@pytest.mark.parametrize("change, expected", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_twistd_bad_config_one_line(tmp_path: Path, change, expected: str) -> None:
    """A bad configuration stops C{twistd -n mailgateway} with a non-zero
    status and one line naming the file and the key, no traceback."""
    config = _bad_config(tmp_path, change)
    result = _run(twistd_command(config), tmp_path)
    _assert_one_line_error(result, "mailgateway", config, expected)


@pytest.mark.parametrize("change, expected", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_check_config_bad_config_one_line(tmp_path: Path, change, expected: str) -> None:
    """C{gatewayctl check-config} refuses the same bad configurations with a
    non-zero status and the same one line, no traceback."""
    config = _bad_config(tmp_path, change)
    result = _check_config(config, tmp_path)
    _assert_one_line_error(result, "gatewayctl", config, expected)


def test_missing_config_file(tmp_path: Path) -> None:
    """A missing config file is one line ("FILE: file: not found") and a
    non-zero status, from twistd and from check-config."""
    config = tmp_path / "nowhere.toml"
    _assert_one_line_error(_run(twistd_command(config), tmp_path), "mailgateway", config,
                           "file: not found")
    _assert_one_line_error(_check_config(config, tmp_path), "gatewayctl", config,
                           "file: not found")


def test_twistd_port_in_use(tmp_path: Path, busy_port: int) -> None:
    """A listener port that is already taken stops start-up with one line
    naming the file, the listener's port key and the address."""
    config = write_config(tmp_path, _plain_config(tmp_path, listener=[
        {"name": "mx", "address": "127.0.0.1", "port": busy_port, "tls": "none"}]))
    result = _run(twistd_command(config), tmp_path)
    _assert_one_line_error(
        result, "mailgateway", config,
        f"[[listener]] 'mx' port: cannot listen on 127.0.0.1:{busy_port}: already in use")


def test_check_config_good_file(tmp_path: Path) -> None:
    """check-config on a good file exits 0 and prints the effective values,
    with relative paths made absolute against the working directory;
    C{--json} prints the same as JSON."""
    doc = _plain_config(tmp_path)
    doc["queue"] = {"path": "var/spool"}
    config = write_config(tmp_path, doc)
    spool = tmp_path.resolve() / "var" / "spool"

    result = _check_config(config.name, tmp_path)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"{config.name}: OK"
    assert f"queue.path = {json.dumps(str(spool))}" in lines
    assert "server.max_recipients = 1000" in lines
    assert "Traceback" not in result.stdout

    result = _check_config(config.name, tmp_path, "--json")
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["queue"]["path"] == str(spool)
    assert data["server"]["local_domains"] == ["example.test"]
    assert [l["name"] for l in data["listeners"]] == ["mx"]
    assert data["listeners"][0]["plugins"] == ["relay_guard"]
    assert not spool.exists(), "check-config must not create the spool"


# -- 4. the sample configuration ------------------------------------------------


def test_sample_config_checks(tmp_path: Path) -> None:
    """C{gatewayctl check-config etc/gateway.toml}, run from the repository
    root as the README says, succeeds."""
    result = _check_config("etc/gateway.toml", REPO)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[0] == "etc/gateway.toml: OK"
    assert f"queue.path = {json.dumps(str(REPO / 'var' / 'spool'))}" in result.stdout.splitlines()


def _sample_with_port_zero(target: Path) -> dict[str, Any]:
    """Copy etc/gateway.toml to C{target} with every listener port set to 0,
    changing nothing else; returns the parsed copy."""
    text = (REPO / "etc" / "gateway.toml").read_text()
    out, section = [], ""
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[[listener]]":
            line = re.sub(r"^port\s*=\s*\d+", "port = 0", line)
        elif section == "[metrics]":
            line = re.sub(r'^listen\s*=\s*"127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', line)
        out.append(line)
    target.write_text("".join(out))
    original = tomllib.loads(text)
    copy = tomllib.loads(target.read_text())
    assert [l["port"] for l in copy["listener"]] == [0] * len(original["listener"])
    for listener in original["listener"]:
        listener["port"] = 0
    if "metrics" in original:
        original["metrics"]["listen"] = "127.0.0.1:0"
    assert copy == original
    return copy


def test_sample_config_runs(tmp_path: Path, launch) -> None:
    """The sample config (listener ports rewritten to 0, started in a
    temporary working directory) makes a self-signed certificate under
    var/tls/ with a warning, offers STARTTLS on "mx", requires it on
    "submission" and speaks implicit TLS on "smtps"."""
    config = tmp_path / "etc" / "gateway.toml"
    config.parent.mkdir()
    sample = _sample_with_port_zero(config)
    assert {l["name"] for l in sample["listener"]} >= {"mx", "submission", "smtps"}
    cwd = tmp_path.resolve()
    gateway = launch(Path("etc/gateway.toml"), cwd)
    ports = {name: gateway.port(name) for name in ("mx", "submission", "smtps")}
    gateway.started()

    cert, key = cwd / "var" / "tls" / "cert.pem", cwd / "var" / "tls" / "key.pem"
    assert cert.is_file() and key.is_file()
    warning = gateway.wait_for(r"#warn\] no certificate at (\S+): made a self-signed one")
    assert warning.group(1) == str(cert)
    served = ssl.PEM_cert_to_DER_cert(cert.read_text())

    sent: dict[str, tuple[str, bytes]] = {}

    def send(client: smtplib.SMTP, listener: str) -> None:
        content = _simple_message(f"sample-{listener}")
        assert client.mail("sender@clients.test")[0] == 250
        assert client.rcpt("user@example.test")[0] == 250
        code, text = client.data(content)
        assert code == 250, text
        sent[listener] = (_QUEUED_AS.search(text).group(1).decode(), content)

    with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=insecure_tls())
        assert code == 220
        assert client.sock.getpeercert(binary_form=True) == served
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        send(client, "mx")

    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.mail("sender@clients.test")
        assert code == 530, text
        client.starttls(context=insecure_tls())
        client.ehlo("client.test")
        send(client, "submission")

    with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], timeout=10, context=insecure_tls()) as client:
        assert client.sock.getpeercert(binary_form=True) == served
        client.ehlo("client.test")
        send(client, "smtps")

    # The sample relays example.test to [127.0.0.1]:2626, so the messages may
    # already have left incoming/; the transaction log shows each one was
    # received over TLS on its listener.
    for listener, (queue_id, content) in sent.items():
        gateway.wait_for(rf"{queue_id} listener={listener} client=127\.0\.0\.1 .* "
                         rf"size={len(content)} tls=TLSv1\.[23] .*reply=\"250 ")
    assert gateway.stop(signal.SIGTERM) in CLEAN_SIGTERM_EXIT, gateway.output
    assert "Traceback" not in gateway.output


# -- 5. and 6. crash and stop under load ----------------------------------------

WORKERS = 8
MAX_MESSAGE_SIZE = 24 * 1024   # bodies are 1-30 KiB: some get 552 after DATA
TRAFFIC_TIMEOUT = 25


@dataclass
class Sent:
    """One message a client tried to send, and what it heard back.

    @ivar status: "pending", "queued" (250 queued as ID), "rejected" (a 4xx
        or 5xx reply) or "no answer" (the connection broke or timed out).
    """

    token: str
    sender: str
    recipients: list[str]
    content: bytes
    status: str = "pending"
    queue_id: str | None = None
    reply: Any = None


def _make_message(rng: random.Random, worker: int, seq: int) -> Sent:
    """A message whose bytes are exactly what smtplib will send as content:
    CRLF line ends, a final CRLF, no line starting with ".", and a unique
    token in the Subject."""
    token = f"w{worker}n{seq}x{rng.getrandbits(48):012x}"
    sender = f"sender{worker}@clients.test"
    recipients = [f"r{k}.{token}@example.test" for k in range(rng.randint(1, 3))]
    size = rng.randint(1024, 30 * 1024)
    text = base64.b64encode(rng.randbytes(size)).decode("ascii")[:size]
    body = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    headers = [f"From: <{sender}>", f"To: {', '.join(recipients)}",
               f"Subject: load test {token}", f"Message-ID: <{token}@clients.test>"]
    content = ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode("ascii")
    assert not re.search(rb"(^|\n)\.", content)
    return Sent(token, sender, recipients, content)


def _send(client: smtplib.SMTP, message: Sent) -> bool:
    """One transaction; records the outcome.  True if the connection can
    carry another transaction."""
    try:
        code, text = client.mail(message.sender)
        if code != 250:
            message.status, message.reply = "rejected", (code, text)
            return False
        for recipient in message.recipients:
            code, text = client.rcpt(recipient)
            if code != 250:
                message.status, message.reply = "rejected", (code, text)
                return False
        code, text = client.data(message.content)
    except smtplib.SMTPResponseException as exc:
        message.status, message.reply = "rejected", (exc.smtp_code, exc.smtp_error)
        return False
    except (OSError, smtplib.SMTPException) as exc:
        message.status, message.reply = "no answer", repr(exc)
        return False
    message.reply = (code, text)
    if code == 250:
        match = _QUEUED_AS.search(text)
        message.status = "queued" if match else "unexpected"
        message.queue_id = match.group(1).decode() if match else None
        return True
    message.status = "rejected" if 400 <= code < 600 else "unexpected"
    return code < 400


class Traffic:
    """WORKERS client threads sending messages in a loop until stopped, or
    until the gateway stops accepting connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: list[list[Sent]] = [[] for _ in range(WORKERS)]
        self.stop = threading.Event()
        self._count_lock = threading.Lock()
        self._queued = 0
        self._target = 0
        self.reached = threading.Event()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._worker, args=(n,), daemon=True)
                        for n in range(WORKERS)]

    def start(self, target: int) -> None:
        self._target = target
        for thread in self.threads:
            thread.start()

    def _count(self) -> None:
        with self._count_lock:
            self._queued += 1
            if self._queued >= self._target:
                self.reached.set()

    def _worker(self, worker: int) -> None:
        rng = random.Random()
        seq = 0
        deadline = time.monotonic() + TRAFFIC_TIMEOUT + STOP_TIMEOUT
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                except (OSError, smtplib.SMTPException):
                    return  # the gateway is gone or going
                try:
                    if client.ehlo(f"client{worker}.test")[0] != 250:
                        return
                    for _ in range(rng.randint(1, 6)):
                        if self.stop.is_set():
                            break
                        message = _make_message(rng, worker, seq)
                        seq += 1
                        self.sent[worker].append(message)
                        usable = _send(client, message)
                        if message.status == "queued":
                            self._count()
                        if not usable:
                            break
                    try:
                        client.quit()
                    except (OSError, smtplib.SMTPException):
                        pass
                except (OSError, smtplib.SMTPException):
                    pass  # lost during EHLO or QUIT: no message pending
                finally:
                    client.close()
        except BaseException as exc:  # report, never hang the test
            self.failures.append(f"worker {worker}: {exc!r}")

    def join(self) -> list[Sent]:
        self.stop.set()
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "client threads did not finish"
        assert not self.failures, self.failures
        return [message for messages in self.sent for message in messages]


_TOKEN = re.compile(rb"^Subject: load test (\S+)\r$", re.MULTILINE)


def _check_spool(spool: Path, messages: list[Sent]) -> dict[str, int]:
    """The byte-for-byte check: every 250 is there with its queue id and
    envelope; nothing refused is there; whatever is there is intact."""
    by_token = {m.token: m for m in messages}
    statuses = {m.status for m in messages}
    assert statuses <= {"queued", "rejected", "no answer"}, \
        [(m.token, m.status, m.reply) for m in messages if m.status not in ("queued", "rejected", "no answer")]
    for state in ("active", "deferred", "hold", "corrupt", "tmp"):
        assert not list((spool / state).iterdir()), f"{state}/ is not empty"

    stored = queued(spool)
    found: dict[str, tuple[Any, bytes]] = {}
    for envelope, content in stored:
        match = _TOKEN.search(content)
        assert match, f"{envelope.queue_id}: no token in stored content"
        token = match.group(1).decode()
        assert token in by_token, f"{envelope.queue_id}: unknown message {token}"
        assert token not in found, f"message {token} queued twice"
        found[token] = (envelope, content)
    data_files = {p.stem for p in (spool / "data").iterdir()}
    assert data_files == {envelope.queue_id for envelope, _ in stored}, "content without envelope"

    for message in messages:
        if message.status == "queued":
            assert message.token in found, f"lost after 250: {message.token} {message.queue_id}"
        elif message.status == "rejected":
            assert message.token not in found, f"queued despite {message.reply}: {message.token}"
        if message.token not in found:
            continue
        envelope, content = found[message.token]
        if message.status == "queued":
            assert envelope.queue_id == message.queue_id
        assert content == message.content, f"{message.token}: content differs"
        assert envelope.size == len(message.content)
        assert envelope.sender == message.sender
        assert [r.address for r in envelope.recipients] == message.recipients
    counts = {status: sum(m.status == status for m in messages) for status in statuses}
    counts["stored"] = len(found)
    return counts


def _load_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, _plain_config(tmp_path, server={"max_message_size": MAX_MESSAGE_SIZE}))


def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path: Path, launch) -> None:
    """Crash test: SIGKILL while 8 clients are sending, then restart on the
    same spool.  Every message that got "250 queued as ID" is in incoming/
    byte for byte with that id and its envelope; none that got 4xx/5xx is;
    a message that got no answer is absent or intact; recovery is logged
    and leaves active/, tmp/ and corrupt/ empty."""
    config = _load_config(tmp_path)
    spool = tmp_path / "spool"
    gateway = launch(config, tmp_path)
    traffic = Traffic(gateway.port("mx"))
    gateway.started()
    traffic.start(target=100)
    assert traffic.reached.wait(TRAFFIC_TIMEOUT), "fewer than 100 messages queued in time"
    status = gateway.stop(signal.SIGKILL)
    messages = traffic.join()
    assert status == -signal.SIGKILL

    in_flight = [m for m in messages if m.status == "no answer"]
    assert in_flight, "the kill did not interrupt any transaction"
    assert any(m.status == "rejected" for m in messages), "no 552 seen (size limit)"

    restarted = launch(config, tmp_path)
    restarted.started()
    recovered = restarted.wait_for(_RECOVERED.pattern)
    assert recovered.group("path") == str(spool)
    assert recovered.group("corrupt") == "0"
    assert restarted.stop(signal.SIGTERM) in CLEAN_SIGTERM_EXIT, restarted.output

    counts = _check_spool(spool, messages)
    assert int(recovered.group("queued")) == counts["stored"]
    assert counts["queued"] >= 100


def test_sigterm_under_load_loses_no_acknowledged_message(tmp_path: Path, launch) -> None:
    """SIGTERM while 8 clients are mid-transaction: the gateway exits
    cleanly in bounded time, every message that got a 250 is in the spool
    byte for byte, none that got 4xx/5xx (421 at shutdown, 552) is, and
    nothing is left in tmp/ or active/."""
    config = _load_config(tmp_path)
    spool = tmp_path / "spool"
    gateway = launch(config, tmp_path)
    traffic = Traffic(gateway.port("mx"))
    gateway.started()
    traffic.start(target=60)
    assert traffic.reached.wait(TRAFFIC_TIMEOUT), "fewer than 60 messages queued in time"
    status = gateway.stop(signal.SIGTERM)
    messages = traffic.join()
    assert status in CLEAN_SIGTERM_EXIT, gateway.output
    assert "mailgateway stopped" in gateway.output
    assert "Traceback" not in gateway.output

    assert any(m.status == "rejected" and m.reply[0] == 421 for m in messages), \
        "no client was told 421 4.3.2: the stop did not meet a transaction"
    counts = _check_spool(spool, messages)
    assert counts["queued"] >= 60
