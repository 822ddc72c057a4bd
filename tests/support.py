"""Shared test helpers: write a config, start the real gateway on loopback,
talk to it with the stdlib smtplib from a thread, read the spool back.

Every wait is bounded: thread calls get a reactor timeout, sockets get a
socket timeout.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import sys
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor, threads

from gateway.queue import Spool
from gateway.queuefile import Envelope, load_envelope

REPO = Path(__file__).resolve().parent.parent
WAIT = 30


def toml_value(value: Any) -> str:
    """Render a Python value as TOML (strings, numbers, bools, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def render_toml(doc: dict[str, Any]) -> str:
    """A small TOML writer for test configs: top-level tables, arrays of
    tables (lists of dicts) and one level of nested tables (plugins.X)."""
    out = []
    for name, table in doc.items():
        if isinstance(table, list):
            for item in table:
                out.append(f"[[{name}]]")
                out.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
                out.append("")
            continue
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
        out.append(f"[{name}]")
        out.extend(f"{toml_value(k) if '.' in k else k} = {toml_value(v)}" for k, v in plain.items())
        out.append("")
        for sub, subtable in nested.items():
            out.append(f"[{name}.{sub}]")
            out.extend(f"{k} = {toml_value(v)}" for k, v in subtable.items())
            out.append("")
    return "\n".join(out)


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A working config on loopback, port 0, spool and TLS files in tmp_path."""
    doc: dict[str, Any] = {
        "server": {
            "hostname": "mx.example.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
        },
        "listener": [{"name": "mx", "address": "127.0.0.1", "port": 0, "tls": "starttls",
                      "plugins": ["relay_guard"]}],
        "tls": {"cert": str(tmp_path / "tls" / "cert.pem"), "key": str(tmp_path / "tls" / "key.pem")},
        "queue": {"path": str(tmp_path / "spool")},
        "dns": {"servers": ["127.0.0.1:1"], "timeout": 2, "reverse_lookup": False},
        # Receiving tests look at the spool; delivery tests turn this on.
        "relay": {"enabled": False},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(name), dict):
            doc[name] = {**doc[name], **value}
        else:
            doc[name] = value
    return doc


def write_config(tmp_path: Path, doc: dict[str, Any], name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(render_toml(doc))
    return path


def in_thread(function: Callable[..., Any], *args: Any, timeout: float = WAIT):
    """Run blocking client code in a thread; the Deferred times out."""
    d = threads.deferToThread(function, *args)
    d.addTimeout(timeout, reactor)
    return d


def client(port: int, **kwargs: Any) -> smtplib.SMTP:
    """A connected stdlib SMTP client (call from a thread)."""
    return smtplib.SMTP("127.0.0.1", port, timeout=10, **kwargs)


def insecure_tls() -> ssl.SSLContext:
    """A client context that accepts the gateway's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def queued(spool_path: Path | str, state: str = "incoming") -> list[tuple[Envelope, bytes]]:
    """Every committed message in C{state}: (envelope, content bytes)."""
    spool_path = Path(spool_path)
    out = []
    directory = spool_path / state
    if not directory.is_dir():
        return out
    for entry in sorted(directory.glob("*.env")):
        envelope = load_envelope(entry.read_bytes())
        content = (spool_path / "data" / f"{envelope.queue_id}.eml").read_bytes()
        out.append((envelope, content))
    return out


def raw_session(port: int, payload: bytes, *, read_until: bytes | None = None,
                timeout: float = 10.0) -> bytes:
    """Send raw bytes on a plain socket and read replies until the server
    closes, C{read_until} appears, or the timeout (blocking; use in_thread)."""
    import socket
    import time

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    deadline = time.monotonic() + timeout
    received = b""
    try:
        received += sock.recv(4096)
        sock.sendall(payload)
        while time.monotonic() < deadline:
            if read_until is not None and read_until in received:
                break
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return received


def twistd_command(config: Path) -> list[str]:
    """The command line that runs the gateway in the foreground."""
    twistd = Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "mailgateway", "-c", str(config)]
    return [str(twistd), "-n", "--pidfile=", "mailgateway", "-c", str(config)]


def subprocess_env() -> dict[str, str]:
    """Environment for a gateway subprocess: the working tree's code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spool_of(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", run_in_thread=lambda f, *a: f(*a), clock=None)
