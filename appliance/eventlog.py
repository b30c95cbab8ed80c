"""Per-message event log: one line per event, greppable by queue id.

Every line is a JSON object with `ts` (RFC 3339, UTC), `event`, and the event's fields;
message events always carry `qid`. Lines go to stderr (and so to journald under systemd)
unless `configure()` names a file. JSON lines were chosen over key=value because
recipients and replies contain spaces and quotes that key=value would have to escape.

Events: connect, reject, accepted, delivery_attempt, delivered, deferred, bounced,
bounce_queued, dropped, expired, bounce_received, bounce_error, destination_paused,
destination_recovered, shutdown, startup.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

_lock = threading.Lock()
_stream: IO[str] = sys.stderr


def configure(path: str | None) -> None:
    """Send event lines to `path` (appended, line-buffered), or to stderr when None."""
    global _stream
    _stream = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr


def _timestamp(now: float) -> str:
    secs = int(now)
    millis = int((now - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def log_event(event: str, **fields: Any) -> None:
    """Write one event line. Field values must be JSON-serialisable (str, int, list, ...)."""
    record = {"ts": _timestamp(time.time()), "event": event, **fields}
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    with _lock:
        _stream.write(line + "\n")
        _stream.flush()
