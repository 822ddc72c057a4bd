"""Log output configured by C{[log]}: text or one JSON object per line,
a level, and a file.

Why beside twistd's own log: twistd picks its observer before the config
is read.  The gateway adds its own observer for C{[log] file}, in the
chosen format and level, so JSON lines (with stable field names such as
C{queue_id}, C{client}, C{sender}, C{rcpt}, C{reply}) can be shipped to a
log system, and C{gatewayctl log ID} can follow one message.

See also: twisted.logger (jsonFileLogObserver, FilteringLogObserver).
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, formatEvent,
                            textFileLogObserver)

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}
#: Fields copied into JSON lines when an event carries them.
FIELDS = ("queue_id", "listener", "client", "helo", "sender", "rcpt", "size", "tls", "auth", "plugins",
          "reply", "relay", "verified", "mta_sts", "delay", "next_attempt", "user", "domain", "plugin")


def json_line(event: dict[str, Any]) -> str:
    """One event as a flat JSON object: time, level, system, message and
    the stable fields it carries."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": round(event.get("log_time", 0.0), 6),
        "level": getattr(level, "name", "info"),
        "system": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for name in FIELDS:
        if name in event:
            value = event[name]
            record[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, sort_keys=True)


class JSONLineObserver:
    """Writes L{json_line} for each event to a text file."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        self.stream.write(json_line(event) + "\n")
        self.stream.flush()


def make_observer(config: Any) -> tuple[Any, Any] | None:
    """The observer for C{[log]} (a L{gateway.config.LogConfig}) and the
    file it writes, or None when no file is configured."""
    if not config.file:
        return None
    import os

    os.makedirs(os.path.dirname(config.file) or ".", exist_ok=True)
    stream = open(config.file, "a", encoding="utf-8")
    inner = JSONLineObserver(stream) if config.format == "json" else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[config.level])
    return FilteringLogObserver(inner, [predicate]), stream
