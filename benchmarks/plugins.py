#!/usr/bin/env python3
"""Plugin cost benchmark: mailgateway's msgs/s with and without plugins.

Every configuration is a fresh ``twistd -n mailgateway -c CONFIG`` with one
listener on 127.0.0.1 (tls none, relay disabled: mail stays in the spool,
as in benchmarks/receive.py) and a plugin list; each is measured beside the
baseline ``["relay_guard"]`` on the same kind of listener, in alternating
rounds, and reported as msgs/s and the ratio to that baseline.

  mx          an MX listener, trusted_networks = [] (so that SPF, DNSBL and
              rate limits apply to the 127.0.0.1 client), recipient in
              local_domains.  Configurations: relay_guard alone;
              + spf + dkim_verify + dmarc; each of these alone; and when
              plugins/ratelimit.py, dnsbl.py and content.py exist, each of
              them alone and the full policy pipeline
              relay_guard, spf, dnsbl, ratelimit, content.
  submission  a submission-like listener (tls none, submission = true,
              trusted_networks = 127.0.0.0/8 so that dkim_sign signs):
              relay_guard vs relay_guard + dkim_sign with two keys for the
              From: domain (RSA-2048 and Ed25519, made with
              ``python -m gateway.ctl dkim keygen``), i.e. dual signing.
  big         peak RSS of the gateway while it accepts (and signs) one
              20 MiB message on the submission listener, with and without
              dkim_sign.

DNS: a twisted.names authoritative server (tests/dnsserver.TestDNS from the
repository) runs in a child process of this script on 127.0.0.1 and
publishes, for the sender domain example.org: SPF (v=spf1 ip4:127.0.0.1
-all), the DKIM key the messages are signed with, DMARC (p=reject); SPF for
the HELO name; and a DNSBL zone bl.example.net that does not list
127.0.0.1.  The gateway's [dns] servers points at it.

Load: our own generator, not smtp-source, because every message must carry
a valid DKIM signature made in advance (smtp-source sends a fixed body it
makes itself and cannot sign).  N processes x T threads of smtplib send the
same pre-signed ~2 KB MIME message, one connection per message (connect,
EHLO, MAIL, RCPT, DATA, QUIT), like smtp-source.  Several processes keep the
client's GIL out of the way; the client still competes with the gateway
for the 2 cores, the same for every configuration.

Run as any user; root is not needed.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import receive as rb  # noqa: E402  (benchmarks/receive.py: /proc helpers, gateway peer)

REPO = rb.REPO
log = rb.log

SENDER_DOMAIN = "example.org"
SENDER = "alice@" + SENDER_DOMAIN
RECIPIENT = "user@example.test"
CLIENT_HELO = "client.example.org"
VERIFY_SELECTOR = "bench"
SIGN_SELECTORS = (("s2026a", "rsa"), ("s2026b", "ed25519"))
DNSBL_ZONE = "bl.example.net"

CONTENT_RULES = (
    r"/^Subject:.*\bviagra\b/ REJECT Looks like spam",
    r"/^X-Mailer: MassMailer/ TAG X-Spam-Flag: YES",
    r"/^From:.*@blocked\.example/ REJECT",
)
HIGH = 1_000_000_000

# name -> (listener kind, plugin list, option overrides {plugin: {key: value}})
CONFIGS: dict[str, tuple[str, tuple[str, ...], dict]] = {
    "mx:relay_guard": ("mx", ("relay_guard",), {}),
    "mx:+spf+dkim_verify+dmarc": ("mx", ("relay_guard", "spf", "dkim_verify", "dmarc"), {}),
    "mx:+spf": ("mx", ("relay_guard", "spf"), {}),
    "mx:+spf(no cache)": ("mx", ("relay_guard", "spf"), {"spf": {"cache_ttl": 0}}),
    "mx:+dkim_verify": ("mx", ("relay_guard", "dkim_verify"), {}),
    "mx:+dnsbl": ("mx", ("relay_guard", "dnsbl"), {}),
    "mx:+dnsbl(no cache)": ("mx", ("relay_guard", "dnsbl"), {"dnsbl": {"cache_ttl": 0}}),
    "mx:+ratelimit": ("mx", ("relay_guard", "ratelimit"), {}),
    "mx:+content": ("mx", ("relay_guard", "content"), {}),
    "mx:+spf+dnsbl+ratelimit+content": ("mx", ("relay_guard", "spf", "dnsbl", "ratelimit", "content"), {}),
    "sub:relay_guard": ("submission", ("relay_guard",), {}),
    "sub:+dkim_sign": ("submission", ("relay_guard", "dkim_sign"), {}),
}
BASELINE = {"mx": "mx:relay_guard", "submission": "sub:relay_guard"}
SUITES = {
    "auth": ["mx:relay_guard", "mx:+spf+dkim_verify+dmarc", "mx:+spf", "mx:+dkim_verify"],
    "policy": ["mx:relay_guard", "mx:+spf", "mx:+spf(no cache)", "mx:+dnsbl", "mx:+dnsbl(no cache)",
               "mx:+ratelimit", "mx:+content", "mx:+spf+dnsbl+ratelimit+content"],
    "submission": ["sub:relay_guard", "sub:+dkim_sign"],
}
POLICY_PLUGINS = ("ratelimit", "dnsbl", "content")


# --------------------------------------------------------------------------
# child process: the DNS server


def serve_dns(zone_file: str) -> int:
    """Run tests.dnsserver.TestDNS with the records in zone_file until stdin
    closes (the parent ended) or SIGTERM."""
    sys.path.insert(0, REPO)
    from twisted.internet import reactor

    from tests.dnsserver import TestDNS

    with open(zone_file) as f:
        records = json.load(f)
    server = TestDNS(reactor)
    for name, rtype, value in records:
        server.add(name, rtype, tuple(value) if isinstance(value, list) else value)
    port = server.start()
    print("LISTENING %d" % port, flush=True)

    def watch_stdin() -> None:
        try:
            sys.stdin.read()
        finally:
            reactor.callFromThread(reactor.stop)

    threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    return 0


class DNSServer:
    def __init__(self, args: argparse.Namespace, workdir: str, records: list):
        self.args = args
        self.zone_file = os.path.join(workdir, "zone.json")
        with open(self.zone_file, "w") as f:
            json.dump(records, f, indent=1)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.logfile = os.path.join(workdir, "dns.log")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.args.python, os.path.abspath(__file__), "--serve-dns", self.zone_file],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.logfile, "wb"), cwd=REPO)
        line = read_line(self.proc, time.monotonic() + self.args.start_timeout)
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError("DNS server did not start: %r %s" % (line, rb._tail(self.logfile)))
        self.port = int(line.split()[1])

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    """One line from a child's stdout, waiting at most until deadline."""
    buf = b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if not r:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 1)  # byte by byte: leave the rest for later reads
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace").strip()


# --------------------------------------------------------------------------
# child process: the load generator


def loadgen(port: int, count: int, threads: int, msg_file: str) -> int:
    """Send count messages over threads connections at a time; wait for GO
    on stdin first; print one JSON line with the results."""
    with open(msg_file, "rb") as f:
        msg = f.read()
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "fail": 0, "first_error": None}

    def worker() -> None:
        for _ in range(count):  # bounded
            with lock:
                if state["next"] >= count:
                    return
                state["next"] += 1
            try:
                s = smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=120)
                try:
                    refused = s.sendmail(SENDER, [RECIPIENT], msg)
                    good = not refused
                finally:
                    try:
                        s.quit()
                    except (smtplib.SMTPException, OSError):
                        s.close()
                with lock:
                    state["ok" if good else "fail"] += 1
            except (smtplib.SMTPException, OSError) as exc:
                with lock:
                    state["fail"] += 1
                    if state["first_error"] is None:
                        state["first_error"] = "%s: %s" % (type(exc).__name__, exc)

    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 1
    t0 = time.time()
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(3600)
    t1 = time.time()
    print(json.dumps({"ok": state["ok"], "fail": state["fail"], "first_error": state["first_error"],
                      "t0": t0, "t1": t1}), flush=True)
    return 0


def run_load(args: argparse.Namespace, port: int, total: int, msg_file: str) -> dict:
    """Run the load generator processes; return ok/fail counts and the wall
    time from GO to the last message of the last process."""
    procs = []
    per = [total // args.procs + (1 if i < total % args.procs else 0) for i in range(args.procs)]
    try:
        for n in per:
            if n:
                procs.append(subprocess.Popen(
                    [args.python, os.path.abspath(__file__), "--loadgen", str(port), str(n),
                     str(args.threads), msg_file],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + args.start_timeout
        for p in procs:
            line = read_line(p, deadline)
            if line != "READY":
                raise RuntimeError("load generator did not start: %r" % line)
        t_go = time.time()
        for p in procs:
            p.stdin.write(b"GO\n")
            p.stdin.flush()
        out = {"ok": 0, "fail": 0, "first_error": None, "t_go": t_go, "t_end": t_go}
        deadline = time.monotonic() + args.timeout
        for p in procs:
            line = read_line(p, deadline)
            try:
                r = json.loads(line)
            except ValueError:
                raise RuntimeError("load generator failed: %r" % line)
            out["ok"] += r["ok"]
            out["fail"] += r["fail"]
            out["first_error"] = out["first_error"] or r["first_error"]
            out["t_end"] = max(out["t_end"], r["t1"])
        for p in procs:
            p.wait(30)
        out["elapsed"] = out["t_end"] - t_go
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


# --------------------------------------------------------------------------
# keys, zone and messages


def gatewayctl(args: argparse.Namespace, cfg: str, *argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([args.python, "-m", "gateway.ctl", *argv, "-c", cfg, "--json"], cwd=REPO, env=env,
                         capture_output=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError("gatewayctl %s failed: %s" % (" ".join(argv), res.stderr.decode(errors="replace")))
    return json.loads(res.stdout)


def make_keys(args: argparse.Namespace, tmp: str) -> tuple[str, str, dict, list]:
    """Make the keys with ``python -m gateway.ctl dkim keygen``.

    Returns (keys_dir for dkim_sign, path of the key that pre-signs the MX
    messages, {selector: key row}, zone records)."""
    keys_dir = os.path.join(tmp, "dkim")
    verify_dir = os.path.join(tmp, "dkim-sender")
    rows = {}
    for kdir, selectors in ((keys_dir, SIGN_SELECTORS), (verify_dir, ((VERIFY_SELECTOR, "rsa"),))):
        cfg = os.path.join(tmp, "keygen-%s.toml" % os.path.basename(kdir))
        with open(cfg, "w") as f:
            f.write('[[listener]]\nname = "x"\naddress = "127.0.0.1"\nport = 0\nplugins = ["relay_guard"]\n'
                    '[queue]\npath = "%s"\n[plugins.dkim_sign]\nkeys_dir = "%s"\n' % (
                        os.path.join(tmp, "keygen-spool"), kdir))
        for selector, algorithm in selectors:
            rows[selector] = gatewayctl(args, cfg, "dkim", "keygen", SENDER_DOMAIN, selector,
                                        "--algorithm", algorithm)
    records = [[row["name"], "TXT", row["record"]] for row in rows.values()]
    return keys_dir, rows[VERIFY_SELECTOR]["path"], rows, records


def zone_records(dkim_records: list) -> list:
    return dkim_records + [
        [SENDER_DOMAIN, "TXT", "v=spf1 ip4:127.0.0.1 -all"],
        [SENDER_DOMAIN, "MX", [10, "mx." + SENDER_DOMAIN]],
        ["mx." + SENDER_DOMAIN, "A", "192.0.2.25"],
        [CLIENT_HELO, "TXT", "v=spf1 ip4:127.0.0.1 -all"],
        [CLIENT_HELO, "A", "127.0.0.1"],
        ["_dmarc." + SENDER_DOMAIN, "TXT", "v=DMARC1; p=reject; adkim=r; aspf=r"],
        # the DNSBL: 127.0.0.2 is listed (the RFC 5782 test entry), the
        # client 127.0.0.1 is not (NXDOMAIN)
        ["2.0.0.127." + DNSBL_ZONE, "A", "127.0.0.2"],
        ["2.0.0.127." + DNSBL_ZONE, "TXT", "test entry"],
        [DNSBL_ZONE, "TXT", "bench DNSBL"],
    ]


def make_message(attachment_bytes: int = 900, tag: str = "bench") -> bytes:
    """A MIME message: a short text part and a small base64 PDF-named
    attachment; ~2 KB with the default size."""
    payload = bytes((i * 7 + 3) % 256 for i in range(attachment_bytes))
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    boundary = "=-=-bench-boundary-=-="
    head = (
        "From: Alice <%s>\r\nTo: <%s>\r\nSubject: Quarterly report (%s)\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <%s.1@%s>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n' % (
            SENDER, RECIPIENT, tag, tag, SENDER_DOMAIN, boundary)).encode()
    text = ("Hello,\r\n\r\nplease find the report attached.  " + "Lorem ipsum dolor sit amet. " * 12
            + "\r\n\r\nAlice\r\n").encode()
    body = (b"--" + boundary.encode() + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text
            + b"\r\n--" + boundary.encode()
            + b'\r\nContent-Type: application/pdf; name="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
            + b'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n' + b64
            + b"\r\n--" + boundary.encode() + b"--\r\n")
    return head + body


def big_message(size_mb: int) -> bytes:
    """One message of about size_mb MiB: text part + base64 attachment."""
    raw = os.urandom(int(size_mb * 1024 * 1024 * 3 / 4))
    msg = make_message(0, "big")
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    marker = b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"report.pdf\"\r\n\r\n"
    i = msg.index(marker) + len(marker)
    j = msg.index(b"\r\n--", i)
    return msg[:i] + b64 + msg[j:]


def sign(message: bytes, key_path: str) -> bytes:
    import dkim  # dkimpy, a dependency of the gateway

    with open(key_path, "rb") as f:
        private = f.read()
    sig = dkim.sign(message, VERIFY_SELECTOR.encode(), SENDER_DOMAIN.encode(), private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                                     b"content-type"])
    return sig + message


# --------------------------------------------------------------------------
# the gateway


class PluginGatewayPeer(rb.GatewayPeer):
    dns_port = 0
    keys_dir = ""
    spec: tuple[str, tuple[str, ...], dict] = ("mx", ("relay_guard",), {})

    def config_text(self, big: bool) -> str:
        kind, plugins, overrides = self.spec
        max_size = max(self.args.big_size_mb * 3, 64) * 1024 * 1024 if big else 10 * 1024 * 1024
        trusted = '["127.0.0.0/8"]' if kind == "submission" else "[]"
        lines = [
            "[server]",
            'hostname = "mx.example.test"',
            'local_domains = ["example.test"]',
            "trusted_networks = %s" % trusted,
            "max_message_size = %d" % max_size,
            "",
            "[[listener]]",
            'name = "%s"' % kind,
            'address = "127.0.0.1"',
            "port = %d" % self.port,
            'tls = "none"',
        ]
        if kind == "submission":
            lines.append("submission = true")
        lines += [
            "plugins = [%s]" % ", ".join('"%s"' % p for p in plugins),
            "",
            "[queue]",
            'path = "%s"' % os.path.join(self.workdir, "spool"),
            "",
            "[dns]",
            'servers = ["127.0.0.1:%d"]' % self.dns_port,
            "timeout = 5",
            "reverse_lookup = false",
            "",
            "[relay]",
            "enabled = false",
            "",
            "[mta_sts]",
            "enabled = false",
            "",
        ]
        tables: dict[str, dict] = {}
        if "dkim_sign" in plugins:
            tables["dkim_sign"] = {"keys_dir": self.keys_dir}
        if "dnsbl" in plugins:
            tables["dnsbl"] = {"sites": [DNSBL_ZONE]}
        if "ratelimit" in plugins:
            tables["ratelimit"] = {
                "window": "1h", "connections_per_ip": HIGH, "messages_per_ip": HIGH,
                "recipients_per_ip": HIGH, "messages_per_sender_domain": HIGH,
                "recipients_per_sender_domain": HIGH}
        if "content" in plugins:
            tables["content"] = {"header_rules": list(CONTENT_RULES)}
        for plugin, opts in overrides.items():
            tables.setdefault(plugin, {}).update(opts)
        for plugin, opts in tables.items():
            lines.append("[plugins.%s]" % plugin)
            for k, v in opts.items():
                lines.append("%s = %s" % (k, toml_value(v)))
            lines.append("")
        return "\n".join(lines)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return "'%s'" % v if "\\" in v and "'" not in v else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[%s]" % ", ".join(toml_value(x) for x in v)
    raise TypeError(v)


def first_envelope_headers(spool: str) -> list[str]:
    """prepend_headers of one queued envelope (what the plugins added)."""
    inc = os.path.join(spool, "incoming")
    try:
        names = sorted(os.listdir(inc))
    except OSError:
        return []
    for name in names[-1:]:
        with open(os.path.join(inc, name), "rb") as f:
            data = f.read()
        doc = json.loads(data.split(b"\nEND sha256=")[0])
        return doc.get("prepend_headers", [])
    return []


def describe_results(headers: list[str]) -> str:
    """A short account of what the plugins did to a message."""
    out = []
    for h in headers:
        name = h.split(":", 1)[0].strip().lower()
        flat = " ".join(h.split())
        if name == "authentication-results":
            out.append("A-R: " + "; ".join(p.strip() for p in flat.split(";")[1:])[:160])
        elif name == "received-spf":
            out.append("Received-SPF: " + flat.split(":", 1)[1].split()[0])
        elif name == "dkim-signature":
            tags = dict(p.strip().split("=", 1) for p in flat.split(":", 1)[1].split(";") if "=" in p)
            out.append("DKIM-Signature a=%s d=%s s=%s" % (tags.get("a"), tags.get("d"), tags.get("s")))
    return " | ".join(out) or "(no headers added)"


def run_round(args: argparse.Namespace, name: str, workdir: str, env: dict) -> dict:
    spec = CONFIGS[name]
    result: dict = {"config": name, "ok": False, "code_version": rb.gateway_code_version()}
    peer = PluginGatewayPeer(args, workdir)
    peer.spec = spec
    peer.dns_port = env["dns"].port
    peer.keys_dir = env["keys_dir"]
    msg_file = env["msg_mx"] if spec[0] == "mx" else env["msg_sub"]
    peer.start()
    try:
        if args.warmup:
            w = run_load(args, peer.port, args.warmup, msg_file)
            if w["fail"]:
                result["error"] = "warm-up: %d failed, first: %s" % (w["fail"], w["first_error"])
                return result
        sampler = rb.RssSampler(peer.root_pid, False)
        sampler.start()
        cpu0 = rb.tree_cpu_seconds(peer.root_pid, False)
        dns0 = rb.tree_cpu_seconds(env["dns"].proc.pid, False)
        busy0, own0 = rb.machine_cpu_seconds(), rb.own_cpu_seconds()
        r = run_load(args, peer.port, args.messages, msg_file)
        cpu1 = rb.tree_cpu_seconds(peer.root_pid, False)
        dns1 = rb.tree_cpu_seconds(env["dns"].proc.pid, False)
        busy1, own1 = rb.machine_cpu_seconds(), rb.own_cpu_seconds()
        result.update(sampler.stop())
        el = r["elapsed"]
        result["elapsed_s"] = el
        result["sent_ok"] = r["ok"]
        result["failed"] = r["fail"]
        result["msgs_per_s"] = r["ok"] / el if el > 0 else 0.0
        result["server_cpu_s"] = cpu1 - cpu0
        result["dns_cpu_s"] = dns1 - dns0
        result["client_cores"] = (own1 - own0) / el
        result["background_cores"] = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (dns1 - dns0) - (own1 - own0)) / el
        time.sleep(0.3)
        result["stored_msgs"] = peer.stored()
        result["added_headers"] = describe_results(first_envelope_headers(os.path.join(workdir, "spool")))
        if r["fail"]:
            result["error"] = "%d messages failed, first: %s" % (r["fail"], r["first_error"])
        else:
            result["ok"] = True
    finally:
        if not result.get("ok"):
            tail = peer.log_tail()
            if tail:
                result["log_tail"] = tail
        peer.stop()
    return result


def run_big(args: argparse.Namespace, name: str, workdir: str, env: dict, msg: bytes) -> dict:
    spec = CONFIGS[name]
    result: dict = {"config": name, "ok": False, "message_bytes": len(msg)}
    peer = PluginGatewayPeer(args, workdir)
    peer.spec = spec
    peer.dns_port = env["dns"].port
    peer.keys_dir = env["keys_dir"]
    peer.start(big=True)
    try:
        w = run_load(args, peer.port, 20, env["msg_sub"])  # code paths loaded (and a first signature)
        if w["fail"]:
            result["error"] = "warm-up failed: %s" % w["first_error"]
            return result
        time.sleep(1.0)
        result["startup_hwm_kb"] = rb.proc_status(peer.root_pid).get("VmHWM", 0)
        result["hwm_reset"] = rb.reset_hwm([peer.root_pid])
        baseline = rb.RssSampler(peer.root_pid, False).sample()
        result["baseline_rss_kb"] = baseline
        sampler = rb.RssSampler(peer.root_pid, False, interval=0.02)
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
        peak = stats["peak_rss_kb"]
        if result["hwm_reset"]:
            peak = max(peak, stats["root_hwm_kb"])
        result["peak_kb"] = peak
        result["growth_kb"] = peak - baseline
        result["retained_kb"] = rb.RssSampler(peer.root_pid, False).sample() - baseline
        spool = os.path.join(workdir, "spool", "incoming")
        newest = max((os.path.join(spool, n) for n in os.listdir(spool)), key=os.path.getmtime, default=None)
        if newest:
            with open(newest, "rb") as f:
                doc = json.loads(f.read().split(b"\nEND sha256=")[0])
            result["added_headers"] = describe_results(doc.get("prepend_headers", []))
    finally:
        if not result.get("ok"):
            tail = peer.log_tail()
            if tail:
                result["log_tail"] = tail
        peer.stop()
    return result


# --------------------------------------------------------------------------
# reporting


fmt = rb.fmt


def print_round(r: dict, messages: int) -> None:
    if not r.get("ok"):
        log("  %-34s FAILED: %s" % (r["config"], r.get("error", "?")))
        if r.get("log_tail"):
            log("    log tail:\n      " + r["log_tail"].replace("\n", "\n      "))
        return
    log("  %-34s %7.1f msgs/s  %6.2fs  cpu %.2f ms/msg  dns cpu %.2f ms/msg  client %.2f cores  "
        "peak RSS %.1f MB  bg %.2f cores  stored %d" % (
            r["config"], r["msgs_per_s"], r["elapsed_s"], 1000 * r["server_cpu_s"] / messages,
            1000 * r["dns_cpu_s"] / messages, r["client_cores"], r["peak_rss_kb"] / 1024,
            r["background_cores"], r["stored_msgs"]))


def summarize(args: argparse.Namespace, rounds: list[dict], names: list[str]) -> dict:
    med = rb.med
    summary: dict = {}
    for name in names:
        rs = [r for r in rounds if r["config"] == name and r.get("ok")]
        if not rs:
            summary[name] = {"rounds_ok": 0}
            continue
        summary[name] = {
            "rounds_ok": len(rs),
            "msgs_per_s": med([r["msgs_per_s"] for r in rs]),
            "msgs_per_s_all": [round(r["msgs_per_s"], 1) for r in rs],
            "cpu_ms_per_msg": med([1000 * r["server_cpu_s"] / args.messages for r in rs]),
            "dns_cpu_ms_per_msg": med([1000 * r["dns_cpu_s"] / args.messages for r in rs]),
            "peak_rss_mb": med([r["peak_rss_kb"] / 1024 for r in rs]),
            "client_cores": med([r["client_cores"] for r in rs]),
            "background_cores": med([r["background_cores"] for r in rs]),
            "added_headers": rs[-1].get("added_headers"),
            "code_versions": sorted({r["code_version"] for r in rs}),
        }
    for name in names:
        s = summary[name]
        base = BASELINE[CONFIGS[name][0]]
        b = summary.get(base, {})
        if s.get("rounds_ok") and b.get("rounds_ok"):
            s["ratio"] = s["msgs_per_s"] / b["msgs_per_s"]
            s["cpu_delta_ms"] = s["cpu_ms_per_msg"] - b["cpu_ms_per_msg"]
            # the same ratio, round by round (each round runs both back to back)
            paired = []
            for r in rounds:
                if r["config"] != name or not r.get("ok"):
                    continue
                mate = [x for x in rounds if x["config"] == base and x.get("ok") and x["round"] == r["round"]]
                if mate:
                    paired.append(r["msgs_per_s"] / mate[0]["msgs_per_s"])
            s["paired_ratio"] = med(paired)
    return summary


def print_summary(args: argparse.Namespace, summary: dict, names: list[str]) -> None:
    log("")
    log("== summary: medians of %d round(s); %d messages per round, %d connections (%d procs x %d threads) ==" % (
        args.rounds, args.messages, args.procs * args.threads, args.procs, args.threads))
    log("%-34s %6s %9s %8s %8s %10s %10s %10s %8s %8s" % (
        "config", "rounds", "msgs/s", "ratio", "paired", "cpu ms/msg", "+cpu ms", "dns ms/msg", "RSS MB",
        "bg cores"))
    for name in names:
        s = summary[name]
        if not s.get("rounds_ok"):
            log("%-34s %6s  (no successful round)" % (name, 0))
            continue
        log("%-34s %6d %9s %8s %8s %10s %10s %10s %8s %8s" % (
            name, s["rounds_ok"], fmt(s["msgs_per_s"]), fmt(s.get("ratio"), "%.2fx"),
            fmt(s.get("paired_ratio"), "%.2fx"), fmt(s["cpu_ms_per_msg"], "%.2f"),
            fmt(s.get("cpu_delta_ms"), "%+.2f"), fmt(s["dns_cpu_ms_per_msg"], "%.2f"), fmt(s["peak_rss_mb"]),
            fmt(s["background_cores"], "%.2f")))
    log("(ratio = median msgs/s / median of the listener's relay_guard-only baseline; paired = median of")
    log(" the per-round ratios; +cpu = gateway CPU per message above that baseline; dns = CPU of the")
    log(" test DNS server per message)")
    log("per round msgs/s and what the plugins added to the last message:")
    for name in names:
        s = summary[name]
        if s.get("rounds_ok"):
            log("  %-34s %s" % (name, s["msgs_per_s_all"]))
            log("  %-34s %s" % ("", s["added_headers"]))
    versions = sorted({v for n in names for v in summary[n].get("code_versions", [])})
    if len(versions) > 1:
        log("warning: the gateway's source changed between rounds (versions %s)" % ", ".join(versions))
    elif versions:
        log("gateway source version: %s" % versions[0])


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Plugin cost benchmark for mailgateway. See benchmarks/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suites", default="auth,policy,submission,big",
                   help="comma list of: auth, policy, submission, big")
    p.add_argument("--configs", default=None, help="comma list of configuration names (instead of --suites)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-m", "--messages", type=int, default=2000, help="messages per round")
    p.add_argument("--procs", type=int, default=4, help="load generator processes")
    p.add_argument("--threads", type=int, default=5, help="connections at a time per process")
    p.add_argument("--warmup", type=int, default=100, help="messages before each measured run")
    p.add_argument("--big-size-mb", type=int, default=20, help="size of the big message (MiB)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--twistd", default=None)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--start-timeout", type=float, default=60)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = p.parse_args(argv)
    args.profile_gateway = None
    if args.twistd is None:
        cand = os.path.join(os.path.dirname(args.python), "twistd")
        args.twistd = cand if os.access(cand, os.X_OK) else shutil.which("twistd")
    args.suite_list = [x.strip() for x in args.suites.split(",") if x.strip()]
    for s in args.suite_list:
        if s not in SUITES and s != "big":
            p.error("unknown suite %r" % s)
    if args.rounds < 1 or args.messages < 1:
        p.error("--rounds and --messages must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-dns"]:
        return serve_dns(argv[1])
    if argv[:1] == ["--loadgen"]:
        return loadgen(int(argv[1]), int(argv[2]), int(argv[3]), argv[4])
    args = parse_args(argv)
    if args.list:
        for name, (kind, plugins, over) in CONFIGS.items():
            print("%-34s %-10s %s %s" % (name, kind, list(plugins), over or ""))
        return 0
    signal.signal(signal.SIGTERM, rb._terminate)
    missing = [p for p in POLICY_PLUGINS if not os.path.exists(os.path.join(REPO, "plugins", p + ".py"))]
    if args.configs:
        names = [x.strip() for x in args.configs.split(",") if x.strip()]
    else:
        names = []
        for s in args.suite_list:
            for n in SUITES.get(s, []):
                if n not in names:
                    names.append(n)
    for n in names:
        if n not in CONFIGS:
            print("error: unknown configuration %r (see --list)" % n, file=sys.stderr)
            return 2
    skipped = [n for n in names if set(CONFIGS[n][1]) & set(missing)]
    names = [n for n in names if n not in skipped]
    for n in names:  # every ratio needs its baseline
        base = BASELINE[CONFIGS[n][0]]
        if base not in names:
            names.insert(0, base)
    tmp = tempfile.mkdtemp(prefix="mailgateway-plugins-", dir=args.workdir)
    info = rb.machine_info()
    log("machine: %s cpus, %s, %s" % (info["cpus"], info.get("cpu_model", "?"), info["platform"]))
    log("temp dir: %s" % tmp)
    if skipped:
        log("skipped (plugins/%s missing): %s" % (", ".join(missing), ", ".join(skipped)))
    results: dict = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    env: dict = {}
    rc = 0
    try:
        keys_dir, verify_key, key_rows, dkim_records = make_keys(args, tmp)
        env["keys_dir"] = keys_dir
        log("keys (python -m gateway.ctl dkim keygen): " + ", ".join(
            "%s %s %s bits" % (r["name"], r["signature_algorithm"], r["bits"]) for r in key_rows.values()))
        msg = make_message()
        env["msg_sub"] = os.path.join(tmp, "message.eml")
        with open(env["msg_sub"], "wb") as f:
            f.write(msg)
        signed = sign(msg, verify_key)
        env["msg_mx"] = os.path.join(tmp, "message-signed.eml")
        with open(env["msg_mx"], "wb") as f:
            f.write(signed)
        log("message: %d bytes (MX: %d bytes with its rsa-sha256 DKIM-Signature, d=%s s=%s)" % (
            len(msg), len(signed), SENDER_DOMAIN, VERIFY_SELECTOR))
        env["dns"] = DNSServer(args, tmp, zone_records(dkim_records))
        env["dns"].start()
        log("test DNS server (tests/dnsserver.TestDNS) on 127.0.0.1:%d" % env["dns"].port)
        log("load: %d procs x %d threads of smtplib, %d messages per round (+%d warm-up)" % (
            args.procs, args.threads, args.messages, args.warmup))
        if names:
            rounds = []
            order = list(names)
            for i in range(args.rounds):
                log("round %d/%d" % (i + 1, args.rounds))
                for name in order:
                    wd = os.path.join(tmp, "round%d-%s" % (i + 1, name.replace(":", "_").replace("+", "_")
                                                          .replace("(", "").replace(")", "").replace(" ", "")))
                    os.makedirs(wd)
                    try:
                        r = run_round(args, name, wd, env)
                    except Exception as exc:
                        r = {"config": name, "ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
                    r["round"] = i + 1
                    rounds.append(r)
                    print_round(r, args.messages)
                    if not r.get("ok"):
                        rc = 1
                    if not args.keep:
                        shutil.rmtree(wd, ignore_errors=True)
                order = order[1:] + order[:1]
            summary = summarize(args, rounds, names)
            results["rounds"] = rounds
            results["summary"] = summary
            print_summary(args, summary, names)
        if "big" in args.suite_list and not args.configs:
            bigmsg = big_message(args.big_size_mb)
            log("")
            log("big: one %d-byte message (text + base64 attachment) on the submission listener" % len(bigmsg))
            big = []
            for i in range(args.rounds):
                for name in ("sub:relay_guard", "sub:+dkim_sign"):
                    wd = os.path.join(tmp, "big%d-%s" % (i + 1, name.replace(":", "_").replace("+", "_")))
                    os.makedirs(wd)
                    try:
                        r = run_big(args, name, wd, env, bigmsg)
                    except Exception as exc:
                        r = {"config": name, "ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
                    r["round"] = i + 1
                    big.append(r)
                    if r.get("ok"):
                        log("  %-20s accepted in %.2fs; baseline RSS %.1f MB, peak %.1f MB, growth %.1f MB, "
                            "retained %.1f MB; %s" % (
                                name, r["elapsed_s"], r["baseline_rss_kb"] / 1024, r["peak_kb"] / 1024,
                                r["growth_kb"] / 1024, r["retained_kb"] / 1024, r.get("added_headers", "")))
                    else:
                        rc = 1
                        log("  %-20s FAILED: %s" % (name, r.get("error")))
                        if r.get("log_tail"):
                            log("    log tail:\n      " + r["log_tail"].replace("\n", "\n      "))
                    if not args.keep:
                        shutil.rmtree(wd, ignore_errors=True)
            results["big"] = big
            for name in ("sub:relay_guard", "sub:+dkim_sign"):
                rs = [r for r in big if r["config"] == name and r.get("ok")]
                if rs:
                    log("big %-20s median: peak RSS %.1f MB, growth %.1f MB (rounds: %s), accepted in %.2fs" % (
                        name, rb.med([r["peak_kb"] / 1024 for r in rs]), rb.med([r["growth_kb"] / 1024 for r in rs]),
                        ", ".join("%.1f" % (r["growth_kb"] / 1024) for r in rs),
                        rb.med([r["elapsed_s"] for r in rs])))
    finally:
        if env.get("dns"):
            env["dns"].stop()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
            log("results written to %s" % args.json)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
