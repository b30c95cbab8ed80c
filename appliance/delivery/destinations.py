"""Destination state: per recipient domain limits, counters and adaptive back-off.

Owned by the delivery scheduler (one instance per process, on the event loop; nothing
here blocks or does I/O except `publish`, which writes a small JSON file). A
"destination" is a recipient domain: the `[destinations]` table that applies to it (the
domain, its nearest ".parent" pattern, or "*") gives its settings, but every domain keeps
its own connection count, rate and state, as IronPort applies destination controls per
domain.

Adaptive back-off, in the manner of a circuit breaker: an attempt at a domain fails when
none of its hosts could be used (refused, timeout, greeting/EHLO/TLS refused) or the next
hop deferred the whole transaction (421, dropped connection, 4xx to MAIL or to the
message); it succeeds when a next hop handled a transaction, whatever it said to each
recipient (a 4xx to one RCPT - mailbox full, greylisting - says nothing about the host;
Postfix's dead-destination feedback makes the same distinction). While failures follow
one another the domain gets fewer connections (the limit halves with each, down to
one); after `pause_after` of them it is paused for
`pause_initial`, doubling with each further pause up to `pause_max`. While paused no
connection is made: the scheduler defers its recipients with their next attempt at the
pause end. When the pause ends the next attempt is a probe: success resets everything,
failure pauses again for twice as long. Nothing here sleeps, so a paused destination costs
no CPU and loses no mail.

The state is published for `sluice hosts` (another process) as `<data_dir>/hosts.json`,
written to a temporary file and renamed over the old one, so a reader sees either the
previous snapshot or the new one, never half of one. Counts are since the process started.
With several delivery processes (`[delivery] processes = N`) each has its own state and
file, `hosts-<k>.json` for shard k; `read_snapshot` merges the files of the running
`sluice run` into one view (`merge_snapshots`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import Config, DestinationConfig

HOSTS_FILE = "hosts.json"
SNAPSHOT_VERSION = 1
# Counters summed over the delivery processes when their snapshots are merged.
_SUMMED = ("active_connections", "connection_limit", "delivered", "deferred", "bounced")


def hosts_file(shard: tuple[int, int] | None) -> str:
    """The snapshot file of one delivery process: `hosts.json` when it is the only one,
    `hosts-<k>.json` for shard k of several."""
    if shard is None or shard[1] <= 1:
        return HOSTS_FILE
    return f"hosts-{shard[0]}.json"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class DestinationState:
    domain: str
    pattern: str  # the [destinations] key whose settings apply
    settings: DestinationConfig
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    last_reply: str = ""
    last_reply_at: float = 0.0
    failures: int = 0  # consecutive failed attempts
    pauses: int = 0  # consecutive pauses (the next one is 2**pauses times as long)
    paused_until: float = 0.0
    pause_reason: str = ""
    next_slot: float = 0.0  # messages_per_minute: the earliest time of the next message

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def connection_limit(self, default: int) -> int:
        """Connections allowed now: the configured limit, halved per consecutive failure."""
        limit = self.settings.max_connections or default
        return max(1, limit >> min(self.failures, 30))

    def rate_wait(self, now: float) -> float:
        """Seconds until the next message may start (0: now)."""
        if self.settings.messages_per_minute <= 0:
            return 0.0
        return max(0.0, self.next_slot - now)

    def reserve(self, now: float) -> float:
        """Take the next message slot; returns how long to wait for it. Messages are
        spaced evenly, 60 / messages_per_minute seconds apart."""
        rate = self.settings.messages_per_minute
        if rate <= 0:
            return 0.0
        start = max(now, self.next_slot)
        self.next_slot = start + 60.0 / rate
        return start - now

    def note_reply(self, reply: str, now: float) -> None:
        self.last_reply, self.last_reply_at = reply, now

    def success(self) -> bool:
        """A next hop answered; returns True when this ended a failure streak."""
        recovered = self.failures > 0 or self.pauses > 0
        self.failures = self.pauses = 0
        self.paused_until, self.pause_reason = 0.0, ""
        return recovered

    def failure(self, reason: str, now: float) -> float | None:
        """Count a failed attempt; returns the pause length when it starts a pause."""
        if self.paused(now):
            return None  # attempts that were under way when the pause began
        self.failures += 1
        s = self.settings
        if self.failures < s.pause_after:
            return None
        length = min(s.pause_initial * 2.0 ** min(self.pauses, 40), s.pause_max)
        self.pauses += 1
        self.paused_until = now + length
        self.pause_reason = f"{self.failures} consecutive failures, last: {reason}"
        return length

    def snapshot(self, now: float, active: int, default_limit: int) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "settings": self.pattern,
            "active_connections": active,
            "connection_limit": self.connection_limit(default_limit),
            "delivered": self.delivered,
            "deferred": self.deferred,
            "bounced": self.bounced,
            "last_reply": self.last_reply,
            "last_reply_at": iso(self.last_reply_at) if self.last_reply_at else None,
            "consecutive_failures": self.failures,
            "paused_until": iso(self.paused_until) if self.paused(now) else None,
            "pause_reason": self.pause_reason if self.paused(now) else "",
        }


class Destinations:
    """Every destination seen since start, created on first use."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._states: dict[str, DestinationState] = {}

    def get(self, domain: str) -> DestinationState:
        key = domain.lower().rstrip(".")
        state = self._states.get(key)
        if state is None:
            pattern, settings = self._config.destination(key)
            state = DestinationState(key, pattern, settings)
            self._states[key] = state
        return state

    def __iter__(self) -> Any:
        return iter(self._states.values())

    def snapshot(
        self,
        now: float,
        started: float,
        active: Callable[[str], int],
        pid: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """`pid`: the `sluice run` process (the parent of the delivery process); `shard`:
        (index, count) of the delivery process, None when it is the only one."""
        default = self._config.delivery.max_connections
        return {
            "version": SNAPSHOT_VERSION,
            "pid": pid if pid is not None else os.getpid(),
            "shard": list(shard) if shard is not None else None,
            "started": iso(started),
            "updated": iso(now),
            "updated_ts": now,
            "destinations": {
                s.domain: s.snapshot(now, active(s.domain), default)
                for s in sorted(self._states.values(), key=lambda s: s.domain)
            },
        }


def write_snapshot(
    data_dir: Path, snapshot: Mapping[str, Any], shard: tuple[int, int] | None = None
) -> None:
    """Replace the process's snapshot file (`hosts_file(shard)` in `data_dir`) atomically
    (temporary file, fsync-free rename)."""
    data = json.dumps(snapshot, indent=1, ensure_ascii=False).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".hosts.", suffix=".tmp", dir=data_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, data_dir / hosts_file(shard))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_one(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None  # replaced or removed between listing and reading
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object")
    return doc


def read_snapshot(data_dir: Path) -> dict[str, Any] | None:
    """The last published state, or None when there is none (never started).

    Every snapshot file (`hosts.json`, `hosts-<k>.json`) is read; those of the `sluice run`
    (pid) that published last are merged, so files left by an earlier run with another
    number of delivery processes are passed over."""
    docs = []
    for path in sorted(data_dir.glob("hosts*.json")):
        if path.name == HOSTS_FILE or path.name.startswith("hosts-"):
            doc = _read_one(path)
            if doc is not None:
                docs.append(doc)
    if not docs:
        return None
    latest = max(docs, key=lambda d: float(d.get("updated_ts") or 0))
    return merge_snapshots([d for d in docs if d.get("pid") == latest.get("pid")])


def merge_snapshots(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One view of the snapshots of several delivery processes of one `sluice run`.

    Per destination the counters, open connections and connection limits (each process
    has its share) are summed; the latest reply (by time) is kept; the destination is
    paused if any process paused it (until the latest end, with that reason), and its
    consecutive failures are the most any process counted. `started` is the earliest
    start, `updated` the latest snapshot."""
    if len(snapshots) == 1:
        return dict(snapshots[0])
    first = snapshots[0]
    rows: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for domain, row in (snap.get("destinations") or {}).items():
            merged = rows.get(domain)
            if merged is None:
                rows[domain] = dict(row)
                continue
            for key in _SUMMED:
                if isinstance(row.get(key), int):
                    merged[key] = (merged.get(key) or 0) + row[key]
            if (row.get("last_reply_at") or "") > (merged.get("last_reply_at") or ""):
                merged["last_reply"] = row.get("last_reply", "")
                merged["last_reply_at"] = row["last_reply_at"]
            merged["consecutive_failures"] = max(
                merged.get("consecutive_failures") or 0, row.get("consecutive_failures") or 0
            )
            if (row.get("paused_until") or "") > (merged.get("paused_until") or ""):
                merged["paused_until"] = row["paused_until"]
                merged["pause_reason"] = row.get("pause_reason", "")
    started = [s["started"] for s in snapshots if s.get("started")]
    updated = max(snapshots, key=lambda s: float(s.get("updated_ts") or 0))
    return {
        "version": SNAPSHOT_VERSION,
        "pid": first.get("pid"),
        "shards": len(snapshots),
        "started": min(started) if started else None,
        "updated": updated.get("updated"),
        "updated_ts": updated.get("updated_ts"),
        "destinations": dict(sorted(rows.items())),
    }
