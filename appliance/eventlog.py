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

import asyncio
import atexit
import json
import os
import sys
import threading
import time
from typing import IO, Any

_lock = threading.Lock()
_stream: IO[str] = sys.stderr
_path: str | None = None
# Lines of the current loop iteration, written together by flush().
_lines: list[str] = []
_flush_scheduled = False


def configure(path: str | None) -> None:
    """Send event lines to `path` (appended, line-buffered), or to stderr when None."""
    global _stream, _path
    flush()
    _stream = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr
    _path = path


def reopen() -> None:
    """Reopen the log file (SIGHUP after logrotate moved it). Keeps the old stream when
    the new file cannot be opened, and says so in it."""
    global _stream
    if _path is None:
        return
    try:
        fresh = open(_path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        log_event("log_reopen_failed", path=_path, error=str(exc))
        return
    with _lock:
        old, _stream = _stream, fresh
    old.close()
    log_event("log_reopened", path=_path, pid=os.getpid())


# The "YYYY-MM-DDTHH:MM:SS" part changes once a second: computed once per second, not
# per line (strftime and gmtime were a visible share of the hot path).
_second = -1
_second_prefix = ""
# One encoder for every line (json.dumps with options builds a new encoder per call).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def _timestamp(now: float) -> str:
    global _second, _second_prefix
    secs = int(now)
    if secs != _second:
        _second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _second = secs
    millis = int((now - secs) * 1000)
    return f"{_second_prefix}.{millis:03d}Z"


def log_event(event: str, **fields: Any) -> None:
    """Write one event line. Field values must be JSON-serialisable (str, int, list, ...).

    On an event loop thread the line is written at the end of the current loop iteration,
    together with the others of that iteration (one write(2) instead of one per line);
    anywhere else at once. Either way it reaches the kernel before anything the loop does
    next, such as sending the reply the line is about.
    """
    global _flush_scheduled
    # `ts` and `event` are plain ASCII we made: no escaping needed for them.
    head = f'{{"ts":"{_timestamp(time.time())}","event":{_encode(event)}'
    line = f"{head},{_encode(fields)[1:]}\n" if fields else head + "}\n"
    loop = asyncio._get_running_loop()
    with _lock:
        _lines.append(line)
        if loop is None:
            _write_pending()
        elif not _flush_scheduled:
            _flush_scheduled = True
            loop.call_soon(flush)


def flush() -> None:
    """Write out lines buffered by log_event() (also run at exit)."""
    global _flush_scheduled
    with _lock:
        _flush_scheduled = False
        _write_pending()


def _write_pending() -> None:
    # Called with _lock held.
    if _lines:
        text = "".join(_lines)
        _lines.clear()
        _stream.write(text)
        _stream.flush()


atexit.register(flush)
