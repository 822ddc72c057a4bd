#!/usr/bin/env python3
"""A plain aiosmtpd server used as a comparison peer by benchmarks/receive.py.

It accepts mail for the configured local domains, writes each message (a
small envelope header followed by the raw content) to its own file in
``--dir``, fsyncs the file and then fsyncs the directory before answering
``250``.  That is the minimum a server must do before it may claim a message
is queued, so it is a fair baseline for the gateway's spool.

By default the blocking write+fsync runs in asyncio's default thread pool
(``--fsync-mode thread``) so that the event loop keeps serving other
sessions while the disk works -- the idiomatic way to do blocking I/O in an
asyncio handler.  ``--fsync-mode inline`` does it on the event loop thread.

Once listening it prints one line ``LISTENING <host> <port>`` on stdout.
It stops on SIGTERM or SIGINT.

Requires: aiosmtpd (``pip install aiosmtpd``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time

from aiosmtpd.smtp import SMTP


class SpoolHandler:
    def __init__(self, directory: str, local_domains: list[str], fsync_mode: str):
        self.directory = directory
        self.local_domains = {d.lower() for d in local_domains}
        self.fsync_mode = fsync_mode
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.counter = itertools.count(1)
        self.prefix = "%d.%d" % (int(time.time()), os.getpid())

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        domain = address.rpartition("@")[2].lower()
        if self.local_domains and domain not in self.local_domains:
            return "550 5.7.1 Relaying denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def _store(self, name: str, header: bytes, content: bytes) -> None:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(header + content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(self.dir_fd)

    async def handle_DATA(self, server, session, envelope):
        name = "%s.%d.eml" % (self.prefix, next(self.counter))
        header = (
            "X-Envelope-From: <%s>\r\nX-Envelope-To: %s\r\n"
            % (envelope.mail_from, ", ".join("<%s>" % r for r in envelope.rcpt_tos))
        ).encode("utf-8", "surrogateescape")
        content = envelope.original_content or b""
        try:
            if self.fsync_mode == "thread":
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, self._store, name, header, content)
            else:
                self._store(name, header, content)
        except OSError as exc:
            return "451 4.3.0 Local error in processing: %s" % exc.strerror
        return "250 2.0.0 OK queued as %s" % name


async def main_async(args: argparse.Namespace) -> None:
    os.makedirs(args.dir, exist_ok=True)
    handler = SpoolHandler(args.dir, args.local_domain, args.fsync_mode)
    loop = asyncio.get_running_loop()

    def factory():
        # hostname is given explicitly: otherwise aiosmtpd calls
        # socket.getfqdn() for every connection.
        return SMTP(
            handler,
            hostname=args.hostname,
            data_size_limit=args.max_size,
            loop=loop,
        )

    server = await loop.create_server(factory, host=args.host, port=args.port, backlog=512)
    host, port = server.sockets[0].getsockname()[:2]
    print("LISTENING %s %d" % (host, port), flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--dir", required=True, help="directory the messages are written to")
    parser.add_argument("--hostname", default="aiosmtpd.example.test")
    parser.add_argument(
        "--local-domain",
        action="append",
        default=[],
        help="accept only recipients in this domain (repeatable; none = accept all)",
    )
    parser.add_argument("--max-size", type=int, default=128 * 1024 * 1024)
    parser.add_argument("--fsync-mode", choices=("thread", "inline"), default="thread")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
