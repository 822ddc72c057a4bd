"""A real redis-server for tests: started on 127.0.0.1 at a free port,
without persistence (C{--save '' --appendonly no}), stopped after the test.

Only a missing C{redis-server} binary skips a test (with the reason and the
package to install); a server that is installed but does not start is a
failure.  Every wait is bounded.

Use the C{redis_server} fixture (import it into the test module), or
L{RedisServer} directly; C{stop()} and C{start()} again on the same port
simulate an outage.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str | None:
    """The path of C{redis-server}, or None when it is not installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ping(port: int, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING on C{port}."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on loopback.

    @ivar port: the TCP port (kept across L{stop} and L{start}).
    @ivar url: C{redis://127.0.0.1:<port>/0} for C{[store] redis_url}.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait (at most START_TIMEOUT) until it answers."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
             "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if ping(self.port):
                return
            time.sleep(0.05)
        self.stop()
        log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}:\n{log}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after STOP_TIMEOUT)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> object:
        """Send one command and return its reply (blocking; simple RESP:
        status, error, integer, bulk and arrays of bulks)."""
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(payload)
            reader = sock.makefile("rb")
            return _read_reply(reader)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _read_reply(reader) -> object:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line!r}")


@pytest.fixture
def redis_server(tmp_path: Path):
    """A started L{RedisServer}; stopped after the test.  Skips only when
    redis-server is not installed."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary, tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
