#!/usr/bin/env python3
"""End-to-end relay benchmark: mailgateway vs. Postfix, load -> MTA -> sink.

    smtp-source -> MTA (receive, fsync, queue) -> relay -> smtp-sink

The load comes from Postfix's ``smtp-source`` and the mail ends in Postfix's
``smtp-sink`` (both Debian package ``postfix``), so neither end is code of
ours.  Two peers run in the middle, in alternating rounds:

  gateway   ``twistd -n mailgateway -c CONFIG``, relay enabled, a [routes]
            entry "example.test" = "[127.0.0.1]:SINKPORT", [relay] tls =
            "none", no DNS (servers = 127.0.0.1:1, reverse_lookup = false),
            MTA-STS off
  postfix   a private Postfix instance (own config/queue/data directories
            under the temp dir, 127.0.0.1 and a high port) with relay_domains
            = example.test and relayhost = [127.0.0.1]:SINKPORT,
            smtp_tls_security_level = none

Each round starts a fresh ``smtp-sink -d DIR/%H%M%S.`` that writes every
message it receives to its own file in DIR (on tmpfs, /dev/shm, by
default), then the peer.  Figures:

  delivered msgs/s   messages that reached the sink during the measured run
                     / (last arrival at the sink - start of the load)
  accepted msgs/s    M / wall time of the smtp-source run (the receive side)
  delay p50/p99      a probe sends messages with smtplib, each with a unique
                     Subject, and notes the time of the 250 reply to its
                     DATA; the arrival time is the mtime of the sink's dump
                     file holding that Subject.  delay = mtime - t(250).

Only the standard library is used, plus helpers from benchmarks/receive.py.
Run as root for the Postfix peer.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import receive as rb  # noqa: E402  (benchmarks/receive.py: /proc helpers, peers)

REPO = rb.REPO
LOCAL_DOMAIN = rb.LOCAL_DOMAIN
SENDER = rb.SENDER
RECIPIENT = rb.RECIPIENT
CLIENT_HELO = rb.CLIENT_HELO
ALL_PEERS = ("gateway", "postfix")
log = rb.log


# --------------------------------------------------------------------------
# the sink


class Sink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each message to a file.

    ``-d DIR/%H%M%S.`` makes one file per transaction, named by the time
    and a random hex number; the file's mtime is the time of the last
    write, i.e. when the final dot arrived.  ``-c`` prints running counters
    (sessions, QUITs, messages) to stdout, kept as a cross-check.
    """

    def __init__(self, args: argparse.Namespace, workdir: str, tag: str):
        self.args = args
        self.workdir = workdir
        base = args.sink_dir or workdir
        self.dir = tempfile.mkdtemp(prefix="sink-%s-" % tag, dir=base)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.outfile = os.path.join(workdir, "smtp-sink.out")

    def start(self) -> None:
        self.port = rb.free_port()
        cmd = [self.args.smtp_sink, "-c"]
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without -u; it drops to nobody
            # after opening the socket, so the dump dir must be nobody's.
            pw = pwd.getpwnam(self.args.sink_user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            cmd += ["-u", self.args.sink_user]
        cmd += ["-d", os.path.join(self.dir, "%H%M%S."), "127.0.0.1:%d" % self.port, "1000"]
        with open(self.outfile, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        rb.wait_for_banner(self.port, time.monotonic() + self.args.start_timeout,
                           lambda: self.proc is not None and self.proc.poll() is None)
        # the banner check was one session without a message; forget nothing else

    def count(self) -> int:
        try:
            return len(os.listdir(self.dir))
        except OSError:
            return 0

    def names(self) -> set[str]:
        try:
            return set(os.listdir(self.dir))
        except OSError:
            return set()

    def counters(self) -> dict[str, int]:
        """The last 'sess=N quit=N mesg=N' line smtp-sink printed."""
        try:
            with open(self.outfile, "rb") as f:
                data = f.read().decode("ascii", "replace")
        except OSError:
            return {}
        parts = [p for p in data.replace("\n", "\r").split("\r") if "mesg=" in p]
        if not parts:
            return {}
        out = {}
        for item in parts[-1].split():
            k, _, v = item.partition("=")
            if v.isdigit():
                out[k] = int(v)
        return out

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def scan_dump(dirpath: str, skip: set[str], probe_tag: str) -> tuple[list[float], dict[str, float]]:
    """mtimes (s) of every dump file not in ``skip``, and {probe subject:
    mtime} for the probe messages among them."""
    mtimes: list[float] = []
    probes: dict[str, float] = {}
    marker = ("Subject: " + probe_tag).encode()
    with os.scandir(dirpath) as it:
        for entry in it:
            if entry.name in skip:
                continue
            try:
                mt = entry.stat().st_mtime_ns / 1e9
                with open(entry.path, "rb") as f:
                    head = f.read(16384)
            except OSError:
                continue
            mtimes.append(mt)
            i = head.find(marker)
            if i >= 0:
                j = head.find(b"\n", i)
                subject = head[i + len("Subject: "): j].decode("ascii", "replace").strip()
                probes[subject] = mt
    return mtimes, probes


# --------------------------------------------------------------------------
# peers


class RelayGatewayPeer(rb.GatewayPeer):
    describe = "mailgateway: twistd -n mailgateway -c CONFIG, relay to the sink by [routes]"
    sink_port = 0

    def config_text(self, big: bool) -> str:
        lines = [
            "[server]",
            'hostname = "mx.example.test"',
            'local_domains = ["%s"]' % LOCAL_DOMAIN,
            "",
            "[[listener]]",
            'name = "mx"',
            'address = "127.0.0.1"',
            "port = %d" % self.port,
            'tls = "none"',
            'plugins = ["relay_guard"]',
            "",
            "[queue]",
            'path = "%s"' % os.path.join(self.workdir, "spool"),
            "",
            "[dns]",
            "# Nothing listens there: no query leaves the machine; the route below",
            "# is an IP literal, so delivery needs no DNS.",
            'servers = ["127.0.0.1:1"]',
            "timeout = 2",
            "reverse_lookup = false",
            "",
            "[relay]",
            "enabled = true",
            'tls = "none"',
        ]
        if self.args.gateway_per_destination:
            lines.append("max_per_destination = %d" % self.args.gateway_per_destination)
        lines += [
            "",
            "[routes]",
            '"%s" = "[127.0.0.1]:%d"' % (LOCAL_DOMAIN, self.sink_port),
            "",
            "[mta_sts]",
            "enabled = false",
            "",
        ]
        return "\n".join(lines)


POSTFIX_MASTER_CF = rb.POSTFIX_MASTER_CF.replace(
    "# private benchmark instance: only what smtpd -> cleanup -> hold queue needs",
    "# private benchmark instance: smtpd -> cleanup -> qmgr -> smtp -> sink",
) + """\
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
"""

POSTFIX_MAIN_CF = """\
# private benchmark instance (written by benchmarks/relay.py)
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
myhostname = postfix.example.net
mydomain = example.net
mydestination =
# example.test is relayed (like the gateway's local_domains + [routes]) to
# the sink; relayhost with [] means no MX lookup.
relay_domains = {domain}
relayhost = [127.0.0.1]:{sink_port}
relay_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_tls_security_level = none
smtpd_tls_security_level = none
local_recipient_maps =
alias_maps =
alias_database =
biff = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
syslog_name = postfix-bench
{extra}
"""


class RelayPostfixPeer(rb.PostfixPeer):
    describe = "Postfix private instance (smtpd -> cleanup -> qmgr -> smtp -> sink)"
    sink_port = 0

    def start(self, big: bool = False) -> None:
        self.port = rb.free_port()
        base = self.workdir
        os.chmod(base, 0o755)
        self.confdir = os.path.join(base, "etc")
        os.makedirs(self.confdir, exist_ok=True)
        os.makedirs(os.path.join(base, "queue"), exist_ok=True)
        os.makedirs(os.path.join(base, "data"), exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(os.path.join(base, "data"), pw.pw_uid, pw.pw_gid)
        extra = ""
        if self.args.postfix_concurrency:
            extra = "default_destination_concurrency_limit = %d" % self.args.postfix_concurrency
        with open(os.path.join(self.confdir, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(dir=base, domain=LOCAL_DOMAIN, sink_port=self.sink_port, extra=extra))
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
            raise RuntimeError("postfix did not start (rc=%d): %s\n%s" % (
                res.returncode, res.stdout.decode(errors="replace"), self.log_tail()))
        rb.wait_for_banner(self.port, deadline, self.alive)


PEER_CLASSES = {"gateway": RelayGatewayPeer, "postfix": RelayPostfixPeer}


# --------------------------------------------------------------------------
# the delay probe


class DelayProbe:
    """Sends timed messages with a unique Subject while the load runs.

    Each thread sends one message every ``interval`` seconds (one
    connection per message, like smtp-source) and notes the wall-clock time
    (time.time()) at which smtplib returned from the 250 after the final
    dot.  The arrival is found later in the sink's dump files.
    """

    def __init__(self, port: int, threads: int, interval: float, limit: int, size: int, tag: str):
        self.port = port
        self.interval = interval
        self.limit = limit
        self.tag = tag
        self.size = size
        self.sent: dict[str, float] = {}
        self.errors = 0
        self._n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def message(self, subject: str) -> bytes:
        head = ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-Id: <%s@%s>\r\n\r\n" % (
            SENDER, RECIPIENT, subject, subject.replace(" ", "."), CLIENT_HELO)).encode()
        line = b"P" * 78 + b"\r\n"
        return head + (line * (self.size // len(line) + 1))[: self.size]

    def _run(self) -> None:
        for _ in range(self.limit):  # bounded
            if self._stop.is_set():
                return
            with self._lock:
                if self._n >= self.limit:
                    return
                self._n += 1
                subject = "%s-%d" % (self.tag, self._n)
            t_start = time.monotonic()
            try:
                s = smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_HELO, timeout=60)
                try:
                    s.sendmail(SENDER, [RECIPIENT], self.message(subject))
                    t250 = time.time()
                    with self._lock:
                        self.sent[subject] = t250
                finally:
                    try:
                        s.quit()
                    except (smtplib.SMTPException, OSError):
                        s.close()
            except (smtplib.SMTPException, OSError):
                with self._lock:
                    self.errors += 1
            rest = self.interval - (time.monotonic() - t_start)
            if rest > 0:
                self._stop.wait(rest)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


# --------------------------------------------------------------------------
# one round


def wait_count(sink: Sink, target: int, timeout: float) -> tuple[bool, float]:
    """Poll the sink's dump dir until it holds ``target`` files (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink.count() >= target:
            return True, time.time()
        time.sleep(0.1)
    return sink.count() >= target, time.time()


def run_round(args: argparse.Namespace, peer_name: str, workdir: str, round_no: int) -> dict:
    result: dict = {"peer": peer_name, "ok": False, "round": round_no}
    if peer_name == "gateway":
        result["code_version"] = rb.gateway_code_version()
    sink = Sink(args, workdir, "%s%d" % (peer_name, round_no))
    sink.start()
    peer = PEER_CLASSES[peer_name](args, workdir)
    peer.sink_port = sink.port
    try:
        peer.start()
        try:
            # warm-up, fully delivered before the measured run starts
            if args.warmup:
                ok, _el, out = rb.smtp_source(args, peer.port, args.sessions, args.warmup)
                if not ok:
                    result["error"] = "warm-up failed: " + out[-500:]
                    return result
                ok, _t = wait_count(sink, args.warmup, args.drain_timeout)
                if not ok:
                    result["error"] = "warm-up not delivered in %ds (sink has %d)" % (
                        args.drain_timeout, sink.count())
                    return result
            before = sink.names()
            sampler = rb.RssSampler(peer.root_pid, peer.multi_process)
            sampler.start()
            cpu0 = rb.tree_cpu_seconds(peer.root_pid, peer.multi_process)
            busy0, own0 = rb.machine_cpu_seconds(), rb.own_cpu_seconds()
            tag = "relay-probe-" + uuid.uuid4().hex[:12]
            probe = DelayProbe(peer.port, args.probe_threads, args.probe_interval, args.probe_max,
                               args.size, tag) if args.probe_threads else None
            t0 = time.time()
            if probe:
                probe.start()
            ok, elapsed, out = rb.smtp_source(args, peer.port, args.sessions, args.messages)
            if probe:
                probe.stop()
            t_accepted = time.time()
            n_probes = len(probe.sent) if probe else 0
            expect = len(before) + args.messages + n_probes
            drained, t_seen = wait_count(sink, expect, args.drain_timeout)
            cpu1 = rb.tree_cpu_seconds(peer.root_pid, peer.multi_process)
            busy1, own1 = rb.machine_cpu_seconds(), rb.own_cpu_seconds()
            result.update(sampler.stop())
            mtimes, arrivals = scan_dump(sink.dir, before, tag)
            result["accept_ok"] = ok
            result["drained"] = drained
            if not ok:
                result["error"] = "smtp-source failed: " + out[-500:]
            elif not drained:
                result["error"] = "not all delivered within %ds: sink has %d of %d" % (
                    args.drain_timeout, len(mtimes), args.messages + n_probes)
            result["delivered"] = len(mtimes)
            result["expected"] = args.messages + n_probes
            result["accept_s"] = elapsed
            result["accepted_msgs_per_s"] = args.messages / elapsed
            last = max(mtimes) if mtimes else t_seen
            span = last - t0
            result["span_s"] = span
            result["drain_after_accept_s"] = last - t_accepted
            result["delivered_msgs_per_s"] = len(mtimes) / span if span > 0 else 0.0
            window = max(t_seen - t0, 1e-9)
            result["server_cpu_s"] = cpu1 - cpu0
            result["background_cores"] = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (own1 - own0)) / window
            if probe:
                delays = sorted(arrivals[s] - t for s, t in probe.sent.items() if s in arrivals)
                result["probes_sent"] = n_probes
                result["probe_errors"] = probe.errors
                result["probes_arrived"] = len(delays)
                result["delays_ms"] = [round(d * 1000, 2) for d in delays]
                result["delay_p50_ms"] = (rb.percentile(delays, 50) or 0) * 1000 if delays else None
                result["delay_p99_ms"] = (rb.percentile(delays, 99) or 0) * 1000 if delays else None
                result["delay_max_ms"] = delays[-1] * 1000 if delays else None
            time.sleep(0.5)
            result["left_in_queue"] = peer.stored()
            result["sink_counters"] = sink.counters()
            result["ok"] = bool(ok and drained)
        finally:
            if not result.get("ok"):
                tail = peer.log_tail()
                if tail:
                    result["log_tail"] = tail
            peer.stop()
    finally:
        sink.stop()
        if not args.keep:
            sink.cleanup()
    return result


# --------------------------------------------------------------------------
# reporting


def fmt(v, spec="%.1f"):
    return rb.fmt(v, spec)


def print_round(r: dict) -> None:
    if not r.get("ok"):
        log("  %-8s FAILED: %s" % (r["peer"], r.get("error", "?")))
        if r.get("log_tail"):
            log("    log tail:\n      " + r["log_tail"].replace("\n", "\n      "))
        return
    log("  %-8s delivered %7.1f msgs/s (%d in %.2fs; drain after accept %.2fs)  accepted %7.1f msgs/s  "
        "delay p50 %s ms p99 %s ms max %s ms (%d/%d probes)  cpu %.2f ms/msg  peak RSS %.1f MB  "
        "left %d  bg %.2f cores" % (
            r["peer"], r["delivered_msgs_per_s"], r["delivered"], r["span_s"], r["drain_after_accept_s"],
            r["accepted_msgs_per_s"], fmt(r.get("delay_p50_ms")), fmt(r.get("delay_p99_ms")),
            fmt(r.get("delay_max_ms")), r.get("probes_arrived", 0), r.get("probes_sent", 0),
            1000 * r["server_cpu_s"] / max(1, r["delivered"]), r["peak_rss_kb"] / 1024,
            r.get("left_in_queue", -1), r.get("background_cores", 0)))


def summarize(args: argparse.Namespace, rounds: list[dict]) -> dict:
    med = rb.med
    summary: dict = {}
    for name in args.peer_list:
        rs = [r for r in rounds if r["peer"] == name and r.get("ok")]
        if not rs:
            summary[name] = {"rounds_ok": 0}
            continue
        pooled = sorted(x for r in rs for x in r.get("delays_ms", []))
        summary[name] = {
            "rounds_ok": len(rs),
            "code_versions": sorted({r["code_version"] for r in rs if r.get("code_version")}),
            "delivered_msgs_per_s": med([r["delivered_msgs_per_s"] for r in rs]),
            "delivered_all": [round(r["delivered_msgs_per_s"], 1) for r in rs],
            "accepted_msgs_per_s": med([r["accepted_msgs_per_s"] for r in rs]),
            "drain_after_accept_s": med([r["drain_after_accept_s"] for r in rs]),
            "delay_p50_ms": med([r.get("delay_p50_ms") for r in rs]),
            "delay_p99_ms": med([r.get("delay_p99_ms") for r in rs]),
            "delay_p99_all": [fmt(r.get("delay_p99_ms")) for r in rs],
            "delay_max_ms": med([r.get("delay_max_ms") for r in rs]),
            "pooled_delay_p50_ms": rb.percentile(pooled, 50),
            "pooled_delay_p99_ms": rb.percentile(pooled, 99),
            "probes": sum(r.get("probes_arrived", 0) for r in rs),
            "cpu_ms_per_msg": med([1000 * r["server_cpu_s"] / max(1, r["delivered"]) for r in rs]),
            "peak_rss_mb": med([r["peak_rss_kb"] / 1024 for r in rs]),
            "background_cores": med([r.get("background_cores", 0) for r in rs]),
        }
    gw, pf = summary.get("gateway", {}), summary.get("postfix", {})
    ratios = {}
    if gw.get("rounds_ok") and pf.get("rounds_ok"):
        ratios["rate gateway/postfix"] = {
            "ratio": gw["delivered_msgs_per_s"] / pf["delivered_msgs_per_s"], "target": ">= 1.0",
            "met": gw["delivered_msgs_per_s"] >= pf["delivered_msgs_per_s"]}
        if gw.get("delay_p99_ms") and pf.get("delay_p99_ms"):
            ratios["p99 delay gateway/postfix"] = {
                "ratio": gw["delay_p99_ms"] / pf["delay_p99_ms"], "target": "<= 1.0",
                "met": gw["delay_p99_ms"] <= pf["delay_p99_ms"]}
        ratios["accept rate gateway/postfix"] = {
            "ratio": gw["accepted_msgs_per_s"] / pf["accepted_msgs_per_s"], "target": "-", "met": None}
    summary["ratios"] = ratios
    return summary


def print_summary(args: argparse.Namespace, summary: dict) -> None:
    log("")
    log("== summary: medians of %d round(s); %d sessions x %d messages of %d bytes, end to end ==" % (
        args.rounds, args.sessions, args.messages, args.size))
    log("%-8s %6s %12s %12s %10s %10s %10s %10s %10s %10s %8s" % (
        "peer", "rounds", "deliv msgs/s", "accept msg/s", "drain s", "delay p50", "delay p99", "delay max",
        "cpu ms/msg", "peakRSS MB", "bg cores"))
    for name in args.peer_list:
        s = summary[name]
        if not s.get("rounds_ok"):
            log("%-8s %6s  (no successful round)" % (name, 0))
            continue
        log("%-8s %6d %12s %12s %10s %10s %10s %10s %10s %10s %8s" % (
            name, s["rounds_ok"], fmt(s["delivered_msgs_per_s"]), fmt(s["accepted_msgs_per_s"]),
            fmt(s["drain_after_accept_s"], "%.2f"), fmt(s["delay_p50_ms"]), fmt(s["delay_p99_ms"]),
            fmt(s["delay_max_ms"]), fmt(s["cpu_ms_per_msg"], "%.2f"), fmt(s["peak_rss_mb"]),
            fmt(s["background_cores"], "%.2f")))
        log("%-8s delivered per round %s; p99 per round %s; pooled probes %d: p50 %s ms, p99 %s ms" % (
            "", s["delivered_all"], s["delay_p99_all"], s["probes"], fmt(s["pooled_delay_p50_ms"]),
            fmt(s["pooled_delay_p99_ms"])))
    log("(delivered = messages that reached smtp-sink / (last arrival - start of load); accept = M /")
    log(" smtp-source wall time; drain = last arrival - end of smtp-source; delay = sink file mtime -")
    log(" time of the 250 to the probe's DATA, ms; cpu = MTA CPU per delivered message, including its")
    log(" relay/smtp processes; peak RSS = sum over the MTA's processes)")
    versions = summary.get("gateway", {}).get("code_versions") or []
    if len(versions) > 1:
        log("warning: the gateway's source changed between rounds (versions %s)" % ", ".join(versions))
    elif versions:
        log("gateway source version: %s" % versions[0])
    for key, r in summary["ratios"].items():
        met = "" if r["met"] is None else ("  (target %s: %s)" % (r["target"], "met" if r["met"] else "NOT met"))
        log("%-28s %.2fx%s" % (key, r["ratio"], met))


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End-to-end relay benchmark: smtp-source -> mailgateway or Postfix -> smtp-sink. "
        "See benchmarks/README.md.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--peers", default=",".join(ALL_PEERS), help="comma list of: " + ", ".join(ALL_PEERS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-s", "--sessions", type=int, default=20, help="concurrent smtp-source sessions")
    p.add_argument("-m", "--messages", type=int, default=5000, help="messages per round")
    p.add_argument("-l", "--size", type=int, default=2048, help="message payload bytes")
    p.add_argument("--warmup", type=int, default=200, help="messages sent (and delivered) before each run")
    p.add_argument("--probe-threads", type=int, default=2, help="delay probe threads (0 = none)")
    p.add_argument("--probe-interval", type=float, default=0.1, help="seconds between one thread's probes")
    p.add_argument("--probe-max", type=int, default=600, help="max probe messages per round")
    p.add_argument("--gateway-per-destination", type=int, default=0,
                   help="set the gateway's [relay] max_per_destination (0: its default, 4)")
    p.add_argument("--postfix-concurrency", type=int, default=0,
                   help="set Postfix's default_destination_concurrency_limit (0: its default, 20)")
    p.add_argument("--sink-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where smtp-sink dumps messages (tmpfs keeps the sink off the disk)")
    p.add_argument("--sink-user", default="nobody", help="user smtp-sink drops to when run as root")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--twistd", default=None)
    p.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    p.add_argument("--smtp-sink", default=shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    p.add_argument("--postfix", default=shutil.which("postfix") or "/usr/sbin/postfix")
    p.add_argument("--timeout", type=int, default=900, help="limit for one smtp-source run (s)")
    p.add_argument("--drain-timeout", type=int, default=300, help="limit for the queue to drain to the sink (s)")
    p.add_argument("--start-timeout", type=float, default=60)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.profile_gateway = None
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, rb._terminate)
    problems = rb.preflight(args)
    if not os.access(args.smtp_sink, os.X_OK):
        problems.append("smtp-sink not found: apt-get install postfix (it is /usr/sbin/smtp-sink)")
    if problems:
        for msg in problems:
            print("error: " + msg, file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="mailgateway-relay-", dir=args.workdir)
    os.chmod(tmp, 0o755)
    info = rb.machine_info()
    log("machine: %s cpus, %s, %s" % (info["cpus"], info.get("cpu_model", "?"), info["platform"]))
    log("load: %s -s %d -m %d -l %d (+%d warm-up messages per round); sink: %s -c -d %s/sink-*/%%H%%M%%S." % (
        args.smtp_source, args.sessions, args.messages, args.size, args.warmup, args.smtp_sink, args.sink_dir or tmp))
    log("temp dir: %s" % tmp)
    results: dict = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    rc = 0
    try:
        rounds = []
        order = list(args.peer_list)
        for i in range(args.rounds):
            log("round %d/%d (order: %s)" % (i + 1, args.rounds, ", ".join(order)))
            for name in order:
                wd = os.path.join(tmp, "round%d-%s" % (i + 1, name))
                os.makedirs(wd)
                os.chmod(wd, 0o755)
                try:
                    r = run_round(args, name, wd, i + 1)
                except Exception as exc:
                    r = {"peer": name, "ok": False, "round": i + 1, "error": "%s: %s" % (type(exc).__name__, exc)}
                rounds.append(r)
                print_round(r)
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
