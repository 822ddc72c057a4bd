#!/usr/bin/env python3
"""Receive-side SMTP benchmark: mailgateway vs. aiosmtpd vs. Postfix.

The load comes from Postfix's own ``smtp-source`` (Debian package
``postfix``), so the load generator is not code of ours:

    smtp-source -s SESSIONS -m MESSAGES -l SIZE ... 127.0.0.1:PORT

Every round starts each peer fresh, warms it up, then runs the load and, at
the same time, a small latency probe (a few Python threads doing complete
timed smtplib transactions), while a sampler thread reads VmRSS/VmHWM of the
server's process(es) from /proc.  Rounds alternate between the peers (the
start order rotates every round) and the report gives medians over rounds
and the throughput ratios gateway/aiosmtpd and gateway/postfix.

Peers:
  gateway   ``twistd -n mailgateway -c CONFIG`` with a config written here
  aiosmtpd  benchmarks/aiosmtpd_peer.py (write + fsync file + fsync dir)
  postfix   a private Postfix instance (own config_directory, queue_directory
            and data_directory under the temp dir, 127.0.0.1 only, a high
            port) that keeps every message in its hold queue

``--big`` instead sends one large message (default 50 MiB) with smtplib to
each peer and reports how much the server's RSS grew.

Only the standard library is used here; aiosmtpd is needed by the peer only.
Run as root for the Postfix peer (Postfix's master must start as root).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

LOCAL_DOMAIN = "example.test"
SENDER = "sender@example.org"
RECIPIENT = "user@" + LOCAL_DOMAIN
CLIENT_HELO = "client.example.org"
ALL_PEERS = ("gateway", "aiosmtpd", "postfix")
TARGETS = {"aiosmtpd": 1.5, "postfix": 1.0}  # gateway msgs/s ratio targets
BIG_TARGET_MB = 10.0  # gateway RSS growth target for --big

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_banner(port: int, deadline: float, alive=lambda: True) -> None:
    """Wait until a 220 banner is read on 127.0.0.1:port (bounded)."""
    last = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server process exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return
                last = banner
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError("no 220 banner on port %d in time (last: %r)" % (port, last))


# --------------------------------------------------------------------------
# /proc helpers


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (kB) of a process; {} when it is gone."""
    out: dict[str, int] = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def proc_stat(pid: int) -> tuple[int, str, int, int] | None:
    """(ppid, comm, utime+stime, cutime+cstime) in clock ticks, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    lpar, rpar = data.find("("), data.rfind(")")
    comm = data[lpar + 1 : rpar]
    fields = data[rpar + 2 :].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11.
    return (int(fields[1]), comm, int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))


def proc_pss_kb(pid: int) -> int:
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def reset_hwm(pids) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, writing 5 to
    /proc/PID/clear_refs; needs to own the process or root).  Without this,
    VmHWM would still hold a peak from start-up."""
    ok = True
    for pid in pids:
        try:
            with open("/proc/%d/clear_refs" % pid, "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def process_tree(root: int) -> dict[int, str]:
    """{pid: comm} of root and all its descendants."""
    parents: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st is None:
            continue
        comms[int(name)] = st[1]
        parents.setdefault(st[0], []).append(int(name))
    out: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = comms.get(pid, "?")
        todo.extend(parents.get(pid, ()))
    return out


def tree_cpu_seconds(root: int, multi: bool) -> float:
    """CPU seconds used so far by root, its live descendants and its reaped
    children (cutime/cstime of root)."""
    pids = process_tree(root) if multi else {root: ""}
    total = 0
    for pid in pids:
        st = proc_stat(pid)
        if st is None:
            continue
        total += st[2]
        if pid == root:
            total += st[3]
    return total / CLK_TCK


def gateway_code_version() -> str:
    """A short hash of the gateway's source files as they are on disk now,
    so that rounds run against different code (a tree being edited) show."""
    import hashlib

    h = hashlib.sha256()
    for top in ("gateway", "plugins", os.path.join("twisted", "plugins")):
        base = os.path.join(REPO, top)
        for dirpath, dirs, files in sorted(os.walk(base)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, REPO).encode())
                    try:
                        with open(path, "rb") as f:
                            h.update(f.read())
                    except OSError:
                        pass
    return h.hexdigest()[:12]


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all cpus, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process (the probe threads) and of its reaped
    children (the smtp-source runs)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class RssSampler(threading.Thread):
    """Samples the RSS of a server process (tree) until stopped."""

    def __init__(self, root: int, multi: bool, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root = root
        self.multi = multi
        self.interval = interval if not multi else max(interval, 0.2)
        self._stop_event = threading.Event()
        self.samples = 0
        self.peak_total_kb = 0
        self.peak_root_kb = 0
        self.peak_pss_kb = 0
        self.peak_by_comm: dict[str, int] = {}
        self.max_procs = 0
        self.hwm_by_pid: dict[int, tuple[str, int]] = {}

    def sample(self) -> int:
        pids = process_tree(self.root) if self.multi else {self.root: "root"}
        total = 0
        by_comm: dict[str, int] = {}
        live = 0
        for pid, comm in pids.items():
            st = proc_status(pid)
            if not st:
                continue
            live += 1
            rss = st.get("VmRSS", 0)
            total += rss
            by_comm[comm] = by_comm.get(comm, 0) + rss
            self.hwm_by_pid[pid] = (comm, max(st.get("VmHWM", 0), self.hwm_by_pid.get(pid, ("", 0))[1]))
            if pid == self.root:
                self.peak_root_kb = max(self.peak_root_kb, rss)
        if self.multi and self.samples % 5 == 0:
            self.peak_pss_kb = max(self.peak_pss_kb, sum(proc_pss_kb(p) for p in pids))
        self.samples += 1
        self.max_procs = max(self.max_procs, live)
        self.peak_total_kb = max(self.peak_total_kb, total)
        for comm, kb in by_comm.items():
            self.peak_by_comm[comm] = max(self.peak_by_comm.get(comm, 0), kb)
        return total

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> dict:
        self.sample()
        self._stop_event.set()
        self.join(5)
        root_hwm = self.hwm_by_pid.get(self.root, ("", 0))[1]
        out = {
            "peak_rss_kb": self.peak_total_kb,
            "peak_root_rss_kb": self.peak_root_kb,
            "root_hwm_kb": root_hwm,
            "samples": self.samples,
        }
        if self.multi:
            out["peak_pss_kb"] = self.peak_pss_kb
            out["peak_rss_by_comm_kb"] = dict(sorted(self.peak_by_comm.items()))
            out["max_processes"] = self.max_procs
        return out


# --------------------------------------------------------------------------
# peers


class Peer:
    name = "?"
    multi_process = False
    describe = ""

    def __init__(self, args: argparse.Namespace, workdir: str):
        self.args = args
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.root_pid = 0

    def start(self, big: bool = False) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        return -1

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.root_pid, 0)
            return True
        except OSError:
            return False

    def log_tail(self) -> str:
        return ""

    def _stop_popen(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _count_files(path: str) -> int:
    n = 0
    for _dirpath, _dirs, files in os.walk(path):
        n += len(files)
    return n


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return ""


class GatewayPeer(Peer):
    name = "gateway"
    describe = "mailgateway: twistd -n mailgateway -c CONFIG"

    def config_text(self, big: bool) -> str:
        plugins = ", ".join('"%s"' % p for p in self.args.plugins.split(",") if p)
        # The sample etc/gateway.toml's values, with a bigger size limit for --big.
        max_size = max(self.args.big_size_mb * 2, 64) * 1024 * 1024 if big else 10 * 1024 * 1024
        lines = [
            "[server]",
            'hostname = "mx.example.test"',
            'local_domains = ["%s"]' % LOCAL_DOMAIN,
            "max_message_size = %d" % max_size,
            "max_recipients = 1000",
            "max_received_headers = 30",
            "",
            "[[listener]]",
            'name = "mx"',
            'address = "127.0.0.1"',
            "port = %d" % self.port,
            'tls = "none"',
            "plugins = [%s]" % plugins,
            "",
            "[queue]",
            'path = "%s"' % os.path.join(self.workdir, "spool"),
            "",
            "[dns]",
            "# Nothing listens there: no DNS query leaves the machine.  No reverse",
            "# lookup of the client (it would only time out against that server).",
            'servers = ["127.0.0.1:%d"]' % self.args.gateway_dns_port,
            "timeout = 2",
            "reverse_lookup = false",
            "",
            "[relay]",
            "# Receive only: mail stays in the spool, as in the Postfix peer's hold",
            "# queue; no delivery competes with reception for the CPU.",
            "enabled = false",
            "",
        ]
        return "\n".join(lines)

    def start(self, big: bool = False) -> None:
        self.port = free_port()
        cfg = os.path.join(self.workdir, "gateway.toml")
        with open(cfg, "w") as f:
            f.write(self.config_text(big))
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [self.args.twistd, "-n", "--pidfile", os.path.join(self.workdir, "twistd.pid")]
        if self.args.profile_gateway:
            os.makedirs(self.args.profile_gateway, exist_ok=True)
            prof = os.path.join(
                self.args.profile_gateway, "gateway-%s.prof" % os.path.basename(self.workdir)
            )
            cmd += ["--profile", prof, "--profiler", "cprofile", "--savestats"]
        cmd += ["mailgateway", "-c", cfg]
        self.logfile = os.path.join(self.workdir, "gateway.log")
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.root_pid = self.proc.pid
        try:
            wait_for_banner(self.port, time.monotonic() + self.args.start_timeout, self.alive)
        except Exception:
            self.stop()
            raise RuntimeError("gateway did not start; log tail:\n" + self.log_tail())

    def stop(self) -> None:
        self._stop_popen()

    def stored(self) -> int:
        # one committed envelope (<id>.env) per message; data/ holds the content
        spool = os.path.join(self.workdir, "spool")
        return sum(_count_files(os.path.join(spool, d)) for d in ("incoming", "active", "deferred", "hold"))

    def log_tail(self) -> str:
        return _tail(self.logfile)


class AiosmtpdPeer(Peer):
    name = "aiosmtpd"

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "aiosmtpd_peer.py (write+fsync file, fsync dir; fsync-mode=%s)" % self.args.aiosmtpd_fsync_mode

    def start(self, big: bool = False) -> None:
        self.logfile = os.path.join(self.workdir, "aiosmtpd.log")
        cmd = [
            self.args.python, os.path.join(HERE, "aiosmtpd_peer.py"),
            "--dir", os.path.join(self.workdir, "mail"),
            "--local-domain", LOCAL_DOMAIN,
            "--fsync-mode", self.args.aiosmtpd_fsync_mode,
            "--max-size", str(max(self.args.big_size_mb * 2, 64) * 1024 * 1024),
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=subprocess.PIPE, stderr=open(self.logfile, "wb"),
            stdin=subprocess.DEVNULL,
        )
        self.root_pid = self.proc.pid
        line = self._read_line(time.monotonic() + self.args.start_timeout)
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError("aiosmtpd peer did not start: %r\n%s" % (line, self.log_tail()))
        self.port = int(line.split()[2])
        wait_for_banner(self.port, time.monotonic() + self.args.start_timeout, self.alive)

    def _read_line(self, deadline: float) -> str:
        import selectors

        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while b"\n" not in buf and time.monotonic() < deadline:
                if not sel.select(timeout=0.5):
                    if self.proc.poll() is not None:
                        break
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
        finally:
            sel.close()
        return buf.decode("utf-8", "replace").strip()

    def stop(self) -> None:
        self._stop_popen()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stored(self) -> int:
        return _count_files(os.path.join(self.workdir, "mail"))

    def log_tail(self) -> str:
        return _tail(self.logfile)


POSTFIX_MASTER_CF = """\
# private benchmark instance: only what smtpd -> cleanup -> hold queue needs
{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTFIX_MAIN_CF = """\
# private benchmark instance (written by benchmarks/receive.py)
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
myhostname = postfix.example.test
mydomain = example.test
mydestination = {domain}, localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# No delivery: every message accepted by smtpd goes to the hold queue,
# written by cleanup (fsync'ed) and never touched by qmgr.
smtpd_client_restrictions = check_client_access static:HOLD
local_recipient_maps =
alias_maps =
alias_database =
biff = no
message_size_limit = {max_size}
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
syslog_name = postfix-bench
"""


class PostfixPeer(Peer):
    name = "postfix"
    multi_process = True
    describe = "Postfix private instance (smtpd -> cleanup -> hold queue)"

    def _postfix(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.args.postfix, "-c", self.confdir, *cmd],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    def start(self, big: bool = False) -> None:
        self.port = free_port()
        base = self.workdir
        os.chmod(base, 0o755)  # postfix daemons (uid postfix) must traverse it
        self.confdir = os.path.join(base, "etc")
        os.makedirs(self.confdir, exist_ok=True)
        os.makedirs(os.path.join(base, "queue"), exist_ok=True)
        os.makedirs(os.path.join(base, "data"), exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(os.path.join(base, "data"), pw.pw_uid, pw.pw_gid)
        with open(os.path.join(self.confdir, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(
                dir=base, domain=LOCAL_DOMAIN,
                max_size=max(self.args.big_size_mb * 2, 64) * 1024 * 1024,
            ))
        with open(os.path.join(self.confdir, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(port="127.0.0.1:%d" % self.port))
        self.logfile = os.path.join(base, "maillog")
        res = self._postfix("start")
        pidfile = os.path.join(base, "queue", "pid", "master.pid")
        deadline = time.monotonic() + self.args.start_timeout
        while time.monotonic() < deadline and not os.path.exists(pidfile):
            time.sleep(0.1)
        try:
            with open(pidfile) as f:
                self.root_pid = int(f.read().strip())
        except (OSError, ValueError):
            raise RuntimeError(
                "postfix did not start (rc=%d): %s\n%s"
                % (res.returncode, res.stdout.decode(errors="replace"), self.log_tail())
            )
        wait_for_banner(self.port, deadline, self.alive)

    def stop(self) -> None:
        if not self.root_pid:
            return
        tree = process_tree(self.root_pid)
        try:
            self._postfix("stop", timeout=60)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.2)
        if self.alive():
            try:
                self._postfix("abort", timeout=30)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        # Anything of this instance still around (only pids we saw under our
        # own master) is killed.
        for pid, comm in tree.items():
            st = proc_stat(pid)
            if st is not None and st[1] == comm:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.root_pid = 0

    def alive(self) -> bool:
        if not self.root_pid:
            return False
        st = proc_stat(self.root_pid)
        return st is not None and st[1] == "master"

    def stored(self) -> int:
        q = os.path.join(self.workdir, "queue")
        return sum(_count_files(os.path.join(q, d)) for d in ("incoming", "active", "deferred", "hold"))

    def log_tail(self) -> str:
        return _tail(self.logfile)


PEER_CLASSES = {"gateway": GatewayPeer, "aiosmtpd": AiosmtpdPeer, "postfix": PostfixPeer}


# --------------------------------------------------------------------------
# load and probes


def smtp_source(args: argparse.Namespace, port: int, sessions: int, messages: int) -> tuple[bool, float, str]:
    cmd = [
        args.smtp_source, "-s", str(sessions), "-m", str(messages), "-l", str(args.size),
        "-M", CLIENT_HELO, "-f", SENDER, "-t", RECIPIENT, "127.0.0.1:%d" % port,
    ]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, "smtp-source timed out after %ds" % args.timeout
    elapsed = time.perf_counter() - t0
    return res.returncode == 0, elapsed, res.stdout.decode("utf-8", "replace").strip()


def probe_message(size: int) -> bytes:
    head = (
        "From: <%s>\r\nTo: <%s>\r\nSubject: latency probe\r\n"
        "Message-Id: <probe.%d@%s>\r\n\r\n" % (SENDER, RECIPIENT, os.getpid(), CLIENT_HELO)
    ).encode()
    line = b"P" * 78 + b"\r\n"
    body = line * (size // len(line) + 1)
    return head + body[:size]


class Probe:
    """Timed complete SMTP transactions while the load runs.

    Each sample is the wall time from TCP connect until the server's reply to
    the end of DATA (connect, banner, EHLO, MAIL, RCPT, DATA, 2 KB body, '.'),
    i.e. what one smtp-source message costs a client; QUIT is not timed.
    """

    def __init__(self, port: int, threads: int, limit: int, size: int):
        self.port = port
        self.limit = limit
        self.msg = probe_message(size)
        self.samples: list[float] = []
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self._started = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        for _ in range(self.limit):  # bounded
            if self._stop.is_set():
                return
            with self._lock:
                if self._started >= self.limit:
                    return
                self._started += 1
            t0 = time.perf_counter()
            try:
                s = smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_HELO, timeout=60)
                try:
                    s.sendmail(SENDER, [RECIPIENT], self.msg)
                    dt = time.perf_counter() - t0
                    with self._lock:
                        self.samples.append(dt)
                finally:
                    try:
                        s.quit()
                    except (smtplib.SMTPException, OSError):
                        s.close()
            except (smtplib.SMTPException, OSError) as exc:
                with self._lock:
                    self.errors += 1
                    kind = type(exc).__name__
                    self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[int(rank) - 1]


# --------------------------------------------------------------------------
# one measurement


def run_round(args: argparse.Namespace, peer_name: str, workdir: str) -> dict:
    peer = PEER_CLASSES[peer_name](args, workdir)
    result: dict = {"peer": peer_name, "ok": False}
    if peer_name == "gateway":
        result["code_version"] = gateway_code_version()
    peer.start()
    try:
        result["startup_hwm_kb"] = proc_status(peer.root_pid).get("VmHWM", 0)
        pids = process_tree(peer.root_pid) if peer.multi_process else [peer.root_pid]
        result["hwm_reset"] = reset_hwm(pids)
        sampler = RssSampler(peer.root_pid, peer.multi_process)
        sampler.start()
        if args.warmup:
            ok, _el, out = smtp_source(args, peer.port, args.sessions, args.warmup)
            if not ok:
                result["error"] = "warm-up failed: " + out[-500:]
                sampler.stop()
                return result
        cpu0 = tree_cpu_seconds(peer.root_pid, peer.multi_process)
        busy0, own0 = machine_cpu_seconds(), own_cpu_seconds()
        probe = Probe(peer.port, args.probe_threads, args.probe_max, args.size) if args.probe_threads else None
        if probe:
            probe.start()
        ok, elapsed, out = smtp_source(args, peer.port, args.sessions, args.messages)
        if probe:
            probe.stop()
        cpu1 = tree_cpu_seconds(peer.root_pid, peer.multi_process)
        busy1, own1 = machine_cpu_seconds(), own_cpu_seconds()
        # CPU used by anything but the server, smtp-source and the probe:
        # other work on a shared machine, which makes a round less reliable.
        result["background_cores"] = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (own1 - own0)) / elapsed
        result["bench_cores"] = (own1 - own0) / elapsed
        result.update(sampler.stop())
        time.sleep(0.3)
        result["stored_msgs"] = peer.stored()
        result["elapsed_s"] = elapsed
        result["server_cpu_s"] = cpu1 - cpu0
        result["ok"] = ok
        if not ok:
            result["error"] = "smtp-source failed: " + out[-500:]
        result["msgs_per_s"] = args.messages / elapsed if ok else 0.0
        # Little's law: mean time one smtp-source message took (connect to QUIT)
        result["load_mean_ms"] = 1000.0 * args.sessions * elapsed / args.messages
        if probe:
            lat = sorted(probe.samples)
            result["latency_samples"] = len(lat)
            result["latency_errors"] = probe.errors
            if probe.error_kinds:
                result["latency_error_kinds"] = probe.error_kinds
            result["p50_ms"] = (percentile(lat, 50) or 0) * 1000 if lat else None
            result["p99_ms"] = (percentile(lat, 99) or 0) * 1000 if lat else None
            result["latencies_ms"] = [round(x * 1000, 3) for x in lat]
    finally:
        if not result.get("ok"):
            tail = peer.log_tail()
            if tail:
                result["log_tail"] = tail
        peer.stop()
    return result


def big_message(size_mb: int) -> bytes:
    head = (
        "From: <%s>\r\nTo: <%s>\r\nSubject: big message\r\n"
        "Message-Id: <big.%d@%s>\r\n\r\n" % (SENDER, RECIPIENT, os.getpid(), CLIENT_HELO)
    ).encode()
    line = b"B" * 74 + b"\r\n"
    total = size_mb * 1024 * 1024
    return head + line * (total // len(line))


def run_big(args: argparse.Namespace, peer_name: str, workdir: str, msg: bytes) -> dict:
    peer = PEER_CLASSES[peer_name](args, workdir)
    result: dict = {"peer": peer_name, "ok": False, "message_bytes": len(msg)}
    peer.start(big=True)
    try:
        # A few small messages first, so lazily loaded code is in memory.
        ok, _el, out = smtp_source(args, peer.port, 2, 20)
        if not ok:
            result["error"] = "warm-up failed: " + out[-500:]
            return result
        time.sleep(1.0)
        result["startup_hwm_kb"] = proc_status(peer.root_pid).get("VmHWM", 0)
        pids = process_tree(peer.root_pid) if peer.multi_process else [peer.root_pid]
        result["hwm_reset"] = reset_hwm(pids)
        base = RssSampler(peer.root_pid, peer.multi_process)
        baseline = base.sample()
        result["baseline_rss_kb"] = baseline
        sampler = RssSampler(peer.root_pid, peer.multi_process, interval=0.05)
        sampler.start()
        t0 = time.perf_counter()
        try:
            s = smtplib.SMTP("127.0.0.1", peer.port, local_hostname=CLIENT_HELO, timeout=args.timeout)
            try:
                refused = s.sendmail(SENDER, [RECIPIENT], msg)
                result["ok"] = not refused
            finally:
                try:
                    s.quit()
                except (smtplib.SMTPException, OSError):
                    s.close()
        except (smtplib.SMTPException, OSError) as exc:
            result["error"] = "%s: %s" % (type(exc).__name__, exc)
        result["elapsed_s"] = time.perf_counter() - t0
        time.sleep(1.0)
        stats = sampler.stop()
        result.update(stats)
        after = RssSampler(peer.root_pid, peer.multi_process).sample()
        result["after_rss_kb"] = after
        peak = stats["peak_rss_kb"]
        if not peer.multi_process and result["hwm_reset"]:
            # VmHWM (reset just before the baseline) also catches a peak
            # that fell between two samples.
            peak = max(peak, stats["root_hwm_kb"])
        result["growth_kb"] = peak - baseline
        result["retained_kb"] = after - baseline
        time.sleep(0.3)
        result["stored_msgs"] = peer.stored()
    finally:
        if not result.get("ok"):
            tail = peer.log_tail()
            if tail:
                result["log_tail"] = tail
        peer.stop()
    return result


# --------------------------------------------------------------------------
# reporting


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, spec: str = "%.1f") -> str:
    return "-" if v is None else spec % v


def summarize(args: argparse.Namespace, rounds: list[dict]) -> dict:
    summary: dict = {}
    for name in args.peer_list:
        rs = [r for r in rounds if r["peer"] == name and r.get("ok")]
        if not rs:
            summary[name] = {"rounds_ok": 0}
            continue
        versions = sorted({r["code_version"] for r in rs if r.get("code_version")})
        pooled = sorted(x for r in rs for x in r.get("latencies_ms", []))
        summary[name] = {
            "rounds_ok": len(rs),
            "code_versions": versions,
            "msgs_per_s": med([r["msgs_per_s"] for r in rs]),
            "msgs_per_s_all": [round(r["msgs_per_s"], 1) for r in rs],
            "p50_ms": med([r.get("p50_ms") for r in rs]),
            "p99_ms": med([r.get("p99_ms") for r in rs]),
            "load_mean_ms": med([r.get("load_mean_ms") for r in rs]),
            "pooled_p50_ms": percentile(pooled, 50),
            "pooled_p99_ms": percentile(pooled, 99),
            "peak_rss_mb": med([r["peak_rss_kb"] / 1024 for r in rs]),
            "peak_rss_mb_max": max(r["peak_rss_kb"] for r in rs) / 1024,
            "root_hwm_mb": med([r["root_hwm_kb"] / 1024 for r in rs]),
            "startup_hwm_mb": med([r.get("startup_hwm_kb", 0) / 1024 for r in rs]),
            "cpu_ms_per_msg": med([1000 * r["server_cpu_s"] / args.messages for r in rs]),
            "background_cores": med([r.get("background_cores", 0) for r in rs]),
        }
        if name == "postfix":
            summary[name]["peak_pss_mb"] = med([r.get("peak_pss_kb", 0) / 1024 for r in rs])
            summary[name]["peak_smtpd_rss_mb"] = med(
                [r.get("peak_rss_by_comm_kb", {}).get("smtpd", 0) / 1024 for r in rs]
            )
            summary[name]["peak_cleanup_rss_mb"] = med(
                [r.get("peak_rss_by_comm_kb", {}).get("cleanup", 0) / 1024 for r in rs]
            )
    gw = summary.get("gateway", {}).get("msgs_per_s")
    ratios = {}
    for other, target in TARGETS.items():
        o = summary.get(other, {}).get("msgs_per_s")
        if gw and o:
            ratios["gateway/" + other] = {"ratio": gw / o, "target": target, "met": gw / o >= target}
    summary["ratios"] = ratios
    return summary


def print_summary(args: argparse.Namespace, summary: dict) -> None:
    log("")
    log("== summary: medians of %d round(s); %d sessions x %d messages of %d bytes ==" % (
        args.rounds, args.sessions, args.messages, args.size))
    log("%-9s %6s %10s %9s %9s %9s %10s %10s %10s %8s" % (
        "peer", "rounds", "msgs/s", "p50 ms", "p99 ms", "mean ms", "peakRSS MB", "HWM MB", "cpu ms/msg",
        "bg cores"))
    for name in args.peer_list:
        s = summary[name]
        if not s.get("rounds_ok"):
            log("%-9s %6s  (no successful round)" % (name, 0))
            continue
        log("%-9s %6d %10s %9s %9s %9s %10s %10s %10s %8s" % (
            name, s["rounds_ok"], fmt(s["msgs_per_s"]), fmt(s["p50_ms"], "%.2f"),
            fmt(s["p99_ms"], "%.2f"), fmt(s["load_mean_ms"]), fmt(s["peak_rss_mb"]), fmt(s["root_hwm_mb"]),
            fmt(s["cpu_ms_per_msg"], "%.2f"), fmt(s["background_cores"], "%.2f")))
    log("(msgs/s = messages / smtp-source wall time; p50/p99 = latency probe; mean = smtp-source's")
    log(" mean time per message by Little's law, sessions x time / messages; peak RSS = sum of")
    log(" VmRSS over the server's processes, sampled; HWM = VmHWM of its main process, reset after")
    log(" start-up, so warm-up + load only; cpu = server CPU per message; bg cores = CPU used")
    log(" meanwhile by other work on the machine)")
    log("start-up VmHWM of the main process (before the reset): " + ", ".join(
        "%s %s MB" % (n, fmt(summary[n].get("startup_hwm_mb"))) for n in args.peer_list
        if summary[n].get("rounds_ok")))
    if "postfix" in summary and summary["postfix"].get("rounds_ok"):
        s = summary["postfix"]
        log("postfix peak RSS is the sum over all processes of the instance (master, smtpd x N,")
        log("  cleanup, trivial-rewrite, qmgr, ...): smtpd alone %s MB, cleanup %s MB, PSS of all %s MB"
            % (fmt(s["peak_smtpd_rss_mb"]), fmt(s["peak_cleanup_rss_mb"]), fmt(s["peak_pss_mb"])))
    versions = summary.get("gateway", {}).get("code_versions") or []
    if len(versions) > 1:
        log("warning: the gateway's source changed between rounds (versions %s)" % ", ".join(versions))
    elif versions:
        log("gateway source version (sha256 of gateway/, plugins/, twisted/plugins/ *.py): %s" % versions[0])
    for key, r in summary["ratios"].items():
        log("%-17s %.2fx  (target >= %.1fx: %s)" % (key, r["ratio"], r["target"], "met" if r["met"] else "NOT met"))


def print_round(r: dict, messages: int) -> None:
    if not r.get("ok"):
        log("  %-9s FAILED: %s" % (r["peer"], r.get("error", "?")))
        if r.get("log_tail"):
            log("    log tail:\n      " + r["log_tail"].replace("\n", "\n      "))
        return
    log("  %-9s %8.1f msgs/s  %6.2fs  p50 %s ms  p99 %s ms (%d probes, %d errors)  "
        "peak RSS %.1f MB  cpu %.2f ms/msg  stored msgs %d  (background load %.2f cores)" % (
            r["peer"], r["msgs_per_s"], r["elapsed_s"], fmt(r.get("p50_ms"), "%.2f"),
            fmt(r.get("p99_ms"), "%.2f"), r.get("latency_samples", 0), r.get("latency_errors", 0),
            r["peak_rss_kb"] / 1024, 1000 * r["server_cpu_s"] / messages, r["stored_msgs"],
            r.get("background_cores", 0)))


# --------------------------------------------------------------------------
# main


def preflight(args: argparse.Namespace) -> list[str]:
    problems = []
    if not args.smtp_source or not os.access(args.smtp_source, os.X_OK):
        problems.append("smtp-source not found: apt-get install postfix (it is /usr/sbin/smtp-source)")
    if "aiosmtpd" in args.peer_list:
        r = subprocess.run([args.python, "-c", "import aiosmtpd"], capture_output=True)
        if r.returncode != 0:
            problems.append("%s cannot import aiosmtpd: pip install aiosmtpd, or pass --python" % args.python)
    if "gateway" in args.peer_list:
        if not args.twistd or not os.access(args.twistd, os.X_OK):
            problems.append("twistd not found (pass --twistd; pip install -e . in a venv)")
        else:
            env = dict(os.environ, PYTHONPATH=REPO)
            r = subprocess.run([args.python, "-c", "import gateway.tap"], cwd=REPO, env=env, capture_output=True)
            if r.returncode != 0:
                problems.append("cannot import gateway.tap with %s: %s" % (
                    args.python, r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ""))
    if "postfix" in args.peer_list:
        if not args.postfix or not os.access(args.postfix, os.X_OK):
            problems.append("postfix not found: apt-get install postfix")
        if os.geteuid() != 0:
            problems.append("the postfix peer needs root (its master process starts as root)")
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            problems.append("no 'postfix' user: apt-get install postfix")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_python = sys.executable
    p = argparse.ArgumentParser(
        description="Receive-side SMTP benchmark: mailgateway vs aiosmtpd vs Postfix, "
        "load from Postfix's smtp-source. See benchmarks/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--peers", default=",".join(ALL_PEERS), help="comma list of: " + ", ".join(ALL_PEERS))
    p.add_argument("--rounds", type=int, default=3, help="rounds per peer (alternating)")
    p.add_argument("-s", "--sessions", type=int, default=20, help="concurrent smtp-source sessions")
    p.add_argument("-m", "--messages", type=int, default=5000, help="messages per round")
    p.add_argument("-l", "--size", type=int, default=2048, help="message payload bytes")
    p.add_argument("--warmup", type=int, default=200, help="messages sent before each measured run")
    p.add_argument("--probe-threads", type=int, default=2, help="latency probe threads (0 = no probe)")
    p.add_argument("--probe-max", type=int, default=400, help="max probe transactions per round")
    p.add_argument("--big", action="store_true", help="send one big message instead, report RSS growth")
    p.add_argument("--big-size-mb", type=int, default=50, help="size of the --big message in MiB")
    p.add_argument("--plugins", default="relay_guard", help="gateway listener plugin list (comma list)")
    p.add_argument("--gateway-dns-port", type=int, default=53,
                   help="the gateway's [dns] server is 127.0.0.1 on this port")
    p.add_argument("--aiosmtpd-fsync-mode", choices=("thread", "inline"), default="thread",
                   help="where the aiosmtpd peer does write+fsync")
    p.add_argument("--python", default=default_python, help="interpreter for the aiosmtpd peer and checks")
    p.add_argument("--twistd", default=None, help="twistd to run (default: next to --python, else PATH)")
    p.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    p.add_argument("--postfix", default=shutil.which("postfix") or "/usr/sbin/postfix")
    p.add_argument("--timeout", type=int, default=900, help="limit in seconds for one smtp-source run")
    p.add_argument("--start-timeout", type=float, default=60, help="limit in seconds for a server to start")
    p.add_argument("--workdir", default=None, help="parent for temp dirs (default: system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, spools)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--profile-gateway", default=None, metavar="DIR",
                   help="run the gateway under twistd's cProfile; stats files go to DIR")
    args = p.parse_args(argv)
    args.peer_list = [x.strip() for x in args.peers.split(",") if x.strip()]
    for name in args.peer_list:
        if name not in ALL_PEERS:
            p.error("unknown peer %r" % name)
    if args.twistd is None:
        cand = os.path.join(os.path.dirname(args.python), "twistd")
        args.twistd = cand if os.access(cand, os.X_OK) else shutil.which("twistd")
    if args.rounds < 1 or args.messages < 1 or args.sessions < 1:
        p.error("--rounds, --messages and --sessions must be >= 1")
    return args


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def _terminate(signum, frame):  # SIGTERM: clean up like on Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    problems = preflight(args)
    if problems:
        for msg in problems:
            print("error: " + msg, file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="mailgateway-bench-", dir=args.workdir)
    os.chmod(tmp, 0o755)
    info = machine_info()
    log("machine: %s cpus, %s, %s" % (info["cpus"], info.get("cpu_model", "?"), info["platform"]))
    if not args.big:
        log("load: %s -s %d -m %d -l %d (+%d warm-up messages per round)" % (
            args.smtp_source, args.sessions, args.messages, args.size, args.warmup))
    log("temp dir: %s" % tmp)
    results: dict = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    rc = 0
    try:
        if args.big:
            msg = big_message(args.big_size_mb)
            big = []
            for i in range(args.rounds):
                for name in args.peer_list:
                    wd = os.path.join(tmp, "big%d-%s" % (i + 1, name))
                    os.makedirs(wd)
                    log("big round %d: %s (%d bytes)" % (i + 1, name, len(msg)))
                    try:
                        r = run_big(args, name, wd, msg)
                    except Exception as exc:  # a peer that cannot start
                        r = {"peer": name, "ok": False, "error": str(exc)}
                    big.append(r)
                    if r.get("ok"):
                        log("  %-9s accepted in %.2fs; RSS baseline %.1f MB, peak growth %.1f MB, "
                            "retained after %.1f MB, stored msgs %d (start-up VmHWM %.1f MB)" % (
                                name, r["elapsed_s"], r["baseline_rss_kb"] / 1024, r["growth_kb"] / 1024,
                                r["retained_kb"] / 1024, r["stored_msgs"], r["startup_hwm_kb"] / 1024))
                    else:
                        rc = 1
                        log("  %-9s FAILED: %s" % (name, r.get("error", "?")))
                        if r.get("log_tail"):
                            log("    log tail:\n      " + r["log_tail"].replace("\n", "\n      "))
                    if not args.keep:
                        shutil.rmtree(wd, ignore_errors=True)
            results["big"] = big
            gw = [r["growth_kb"] / 1024 for r in big if r["peer"] == "gateway" and r.get("ok")]
            if gw:
                g = max(gw)
                log("gateway RSS growth for one %d MiB message: %.1f MB (target < %.0f MB: %s)" % (
                    args.big_size_mb, g, BIG_TARGET_MB, "met" if g < BIG_TARGET_MB else "NOT met"))
        else:
            rounds = []
            order = list(args.peer_list)
            for i in range(args.rounds):
                log("round %d/%d (order: %s)" % (i + 1, args.rounds, ", ".join(order)))
                for name in order:
                    wd = os.path.join(tmp, "round%d-%s" % (i + 1, name))
                    os.makedirs(wd)
                    try:
                        r = run_round(args, name, wd)
                    except Exception as exc:
                        r = {"peer": name, "ok": False, "error": str(exc)}
                    r["round"] = i + 1
                    rounds.append(r)
                    print_round(r, args.messages)
                    if not r.get("ok"):
                        rc = 1
                    if not args.keep:
                        shutil.rmtree(wd, ignore_errors=True)
                order = order[1:] + order[:1]
            summary = summarize(args, rounds)
            results["rounds"] = rounds
            results["summary"] = summary
            print_summary(args, summary)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
            log("results written to %s" % args.json)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
