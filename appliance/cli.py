"""The `sluice` command: run the gateway, inspect its queue, check a configuration file.

Run by the operator (or systemd) as the sluice service user:

    sluice run [--config FILE]            start the gateway (appliance.app.run)
    sluice queue [--config FILE] [--json] list queued messages and per-recipient state
    sluice hosts [--config FILE] [--json] per destination: connections, queued, counts,
                                          last reply, pause (like IronPort's hoststatus)
    sluice config check FILE              validate a configuration file
    sluice --version

`sluice queue` opens the LMDB queue read-only and may run while `sluice run` is writing
to it: LMDB readers in other processes see the last committed state and never block the
writer. `sluice hosts` reads the destination state the running process publishes in
<data_dir>/hosts.json every few seconds (appliance.delivery.destinations) and adds the
recipients queued per domain from the queue (with several delivery processes, each
publishes hosts-<k>.json and they are shown merged). Exit status: 0 success, 1 operational
failure (e.g. no data directory), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from appliance import __version__
from appliance.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _load(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    # Imported here so `sluice queue` and `sluice config check` work without the native
    # module (and without paying for its import).
    from appliance.app import run

    return run(config)


def _local_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _queue_rows(config: Config) -> list[dict[str, Any]] | str:
    """The queue as JSON-ready dicts, or an error message for the operator."""
    from appliance.queue import Queue

    if not config.data_dir.is_dir():
        return f"sluice: data directory {config.data_dir} does not exist"
    try:
        queue = Queue(config.data_dir, readonly=True)
    except FileNotFoundError:
        return []  # the server has not created its queue yet: nothing is queued
    except Exception as exc:  # lmdb.Error and OSError: permissions, a damaged lock file
        return f"sluice: cannot open the queue in {config.data_dir}: {exc}"
    now = time.time()
    rows = []
    try:
        for rec in queue.all():
            rows.append(
                {
                    "qid": rec.qid,
                    "arrived": _local_time(rec.arrived),
                    "sender": rec.sender,
                    "size": rec.size,
                    "attempts": rec.attempts,
                    "is_bounce": rec.is_bounce,
                    "listener": rec.listener,
                    "peer_ip": rec.peer_ip,
                    "recipients": [
                        {
                            "address": r.address,
                            "state": r.state,
                            "attempts": r.attempts,
                            "next_attempt": (
                                None
                                if r.state in ("delivered", "bounced")
                                else "now"
                                if rec.next_attempt <= now
                                else _local_time(rec.next_attempt)
                            ),
                            "last_reply": r.last_reply,
                        }
                        for r in rec.recipients
                    ],
                }
            )
    finally:
        queue.close_sync()
    return rows


_Doc = TypeVar("_Doc", list[dict[str, Any]], dict[str, Any])


def _read_state(args: argparse.Namespace, reader: Callable[[Config], _Doc | str]) -> _Doc | int:
    """What `reader` finds under the configured data directory, or the exit code after
    saying why there is nothing to show (a bad config, no queue, ...)."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    doc = reader(config)
    if isinstance(doc, str):
        print(doc, file=sys.stderr)
        return EXIT_FAILURE
    return doc


def _print_json(doc: object) -> int:
    json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_queue(args: argparse.Namespace) -> int:
    rows = _read_state(args, _queue_rows)
    if isinstance(rows, int):
        return rows
    if args.json:
        return _print_json(rows)
    if not rows:
        print("queue is empty")
        return EXIT_OK
    for row in rows:
        sender = f"<{row['sender']}>"
        bounce = "  (bounce)" if row["is_bounce"] else ""
        print(f"{row['qid']}  {row['arrived']}  {row['size']:>9}  {sender}{bounce}")
        width = max(len(r["address"]) for r in row["recipients"]) if row["recipients"] else 0
        for r in row["recipients"]:
            nxt = r["next_attempt"] or "-"
            reply = f"  {r['last_reply']}" if r["last_reply"] else ""
            print(
                f"    {r['address']:<{width}}  {r['state']:<9}  attempts={r['attempts']}"
                f"  next={nxt}{reply}"
            )
    total = len(rows)
    print(f"-- {total} message{'s' if total != 1 else ''}")
    return EXIT_OK


def _hosts_rows(config: Config) -> dict[str, Any] | str:
    """Destinations as JSON-ready dicts (most queued first), or an error message."""
    from appliance.delivery.destinations import read_snapshot
    from appliance.queue import Queue

    if not config.data_dir.is_dir():
        return f"sluice: data directory {config.data_dir} does not exist"
    try:
        snapshot = read_snapshot(config.data_dir) or {}
    except (OSError, ValueError) as exc:
        return f"sluice: cannot read the host state in {config.data_dir}: {exc}"
    published: dict[str, Any] = snapshot.get("destinations") or {}
    queued: dict[str, int] = {}
    try:
        queue = Queue(config.data_dir, readonly=True)
    except FileNotFoundError:
        queue = None
    except Exception as exc:  # lmdb.Error and OSError
        return f"sluice: cannot open the queue in {config.data_dir}: {exc}"
    if queue is not None:
        try:
            for rec in queue.all():
                for r in rec.pending_recipients():
                    domain = r.address.rpartition("@")[2].lower()
                    queued[domain] = queued.get(domain, 0) + 1
        finally:
            queue.close_sync()
    rows = []
    for domain in sorted(set(published) | set(queued)):
        state = published.get(domain, {})
        rows.append(
            {
                "domain": domain,
                "settings": state.get("settings") or config.destination(domain)[0],
                "active_connections": state.get("active_connections", 0),
                "connection_limit": state.get("connection_limit"),
                "queued": queued.get(domain, 0),
                "delivered": state.get("delivered", 0),
                "deferred": state.get("deferred", 0),
                "bounced": state.get("bounced", 0),
                "last_reply": state.get("last_reply", ""),
                "last_reply_at": state.get("last_reply_at"),
                "consecutive_failures": state.get("consecutive_failures", 0),
                "paused_until": state.get("paused_until"),
                "pause_reason": state.get("pause_reason", ""),
            }
        )
    rows.sort(key=lambda r: (-r["queued"], -r["active_connections"], r["domain"]))
    pid = snapshot.get("pid")
    return {
        "updated": snapshot.get("updated"),
        "started": snapshot.get("started"),
        "pid": pid,
        "running": isinstance(pid, int) and _process_alive(pid),
        "destinations": rows,
    }


def _process_alive(pid: int) -> bool:
    """Whether the sluice that wrote the snapshot still runs (signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def cmd_hosts(args: argparse.Namespace) -> int:
    doc = _read_state(args, _hosts_rows)
    if isinstance(doc, int):
        return doc
    if args.json:
        return _print_json(doc)
    rows = doc["destinations"]
    when = doc["updated"] or "never (no snapshot: sluice has not run here)"
    print(f"state as of {when}; counts since {doc['started'] or '-'}")
    if doc["updated"] and not doc["running"]:
        # The snapshot outlives the process: say so, or its pauses and active
        # connections read as the present.
        print(f"sluice (pid {doc['pid']}) is not running: this is its last state")
    if not rows:
        print("no destinations")
        return EXIT_OK
    width = max(len("destination"), *(len(r["domain"]) for r in rows))
    print(
        f"{'destination':<{width}}  {'active':>6}  {'queued':>6}  {'delivered':>9}"
        f"  {'deferred':>8}  {'bounced':>7}  status"
    )
    for r in rows:
        if r["paused_until"]:
            status = f"paused until {r['paused_until']}: {r['pause_reason']}"
        elif r["consecutive_failures"]:
            status = f"{r['consecutive_failures']} failures; last: {r['last_reply']}"
        else:
            status = f"last: {r['last_reply']}" if r["last_reply"] else "-"
        print(
            f"{r['domain']:<{width}}  {r['active_connections']:>6}  {r['queued']:>6}"
            f"  {r['delivered']:>9}  {r['deferred']:>8}  {r['bounced']:>7}  {status}"
        )
    return EXIT_OK


def _summary(config: Config) -> list[str]:
    lines = [f"  hostname: {config.hostname}", f"  data_dir: {config.data_dir}"]
    for lst in config.listeners:
        relay = ", ".join(str(n) for n in lst.relay_networks) or "nobody"
        domains = ", ".join(lst.accepted_domains) or "none"
        lines.append(
            f"  listener {lst.name}: {lst.address}; relay for {relay}; accepts for {domains}"
        )
    for domain, route in sorted(config.routes.items()):
        hops = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in route.hosts)
        lines.append(f"  route {domain} -> {'MX lookup (dns)' if route.use_dns else hops}")
    if "*" not in config.routes:
        lines.append(f"  route * -> MX lookup (port {config.delivery.mx_port})")
    if config.delivery.processes > 1:
        lines.append(
            f"  delivery: {config.delivery.processes} processes, each with its share of the"
            " connection and rate limits"
        )
    for name, prof in sorted(config.bounce_profiles.items()):
        warn = f"{prof.delay_warning:g}s" if prof.delay_warning else "never"
        lines.append(
            f"  bounce profile {name}: retry {prof.retry_initial:g}s..{prof.retry_max:g}s,"
            f" bounce after {prof.max_queue_time:g}s, delay warning {warn}"
        )
    for pattern, d in sorted(config.destinations.items()):
        limit = d.max_connections or config.delivery.max_connections
        rate = f"{d.messages_per_minute}/min" if d.messages_per_minute else "unlimited"
        lines.append(
            f"  destination {pattern}: {limit} connections, {rate}, tls {d.tls},"
            f" {d.recipients_per_message} recipients per message"
        )
    if not config.durable:
        lines.append("  WARNING: durable = false: messages are acknowledged before fsync")
    return lines


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.file}: ok")
    print("\n".join(_summary(config)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice SMTP gateway")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_run = sub.add_parser("run", help="run the gateway")
    p_run.add_argument("--config", metavar="FILE", help="TOML file (default: built-in)")
    p_run.set_defaults(func=cmd_run)

    p_queue = sub.add_parser("queue", help="list queued messages")
    p_queue.add_argument("--config", metavar="FILE", help="TOML file (default: built-in)")
    p_queue.add_argument("--json", action="store_true", help="print a JSON array")
    p_queue.set_defaults(func=cmd_queue)

    p_hosts = sub.add_parser("hosts", help="per-destination delivery state")
    p_hosts.add_argument("--config", metavar="FILE", help="TOML file (default: built-in)")
    p_hosts.add_argument("--json", action="store_true", help="print a JSON object")
    p_hosts.set_defaults(func=cmd_hosts)

    p_config = sub.add_parser("config", help="configuration tools")
    config_sub = p_config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p_check = config_sub.add_parser("check", help="validate a configuration file")
    p_check.add_argument("file", metavar="FILE")
    p_check.set_defaults(func=cmd_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except BrokenPipeError:
        # `sluice queue | head`: the reader went away, which is not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
