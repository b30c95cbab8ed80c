"""`sluice run`: wires the listener, policy, queue and delivery together on uvloop.

Start-up order follows the path of a message backwards, so nothing is accepted before
it can be kept and sent: queue, policy, the delivery process (the scheduler runs in a
child process on the same queue, appliance/delivery/worker.py), then the listeners.
Shutdown (SIGTERM or SIGINT) runs forwards: stop accepting connections, let messages
already in their group commit finish (their clients get the 250), answer everyone else
421 4.3.2, stop delivery (SIGTERM to the child, whose exit is awaited), close the queue.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import IO

import uvloop

from appliance import eventlog
from appliance._native import ListenerSpec, Server
from appliance.config import Config, ListenerConfig
from appliance.delivery.worker import DeliveryProcess
from appliance.eventlog import log_event
from appliance.inbound import Inbound, MessageAcceptor
from appliance.policy import Policy
from appliance.queue import Queue

# How long in-flight messages may take to reach the disk once shutdown starts.
SHUTDOWN_GRACE_SECONDS = 30.0


def listener_spec(
    listener: ListenerConfig, hostname: str, tls_dir: Path | None = None
) -> ListenerSpec:
    """The native listener settings; `tls_dir` keeps the self-signed certificate made when
    STARTTLS is on and no certificate is configured (`<data_dir>/tls`)."""
    return ListenerSpec(
        listener.name,
        listener.address,
        hostname,
        max_line_length=listener.max_line_length,
        max_message_size=listener.max_message_size,
        max_recipients=listener.max_recipients,
        require_helo=listener.require_helo,
        bare_lf_ends_command=listener.bare_lf_ends_command,
        bare_linefeed=listener.bare_linefeed,
        address_mode=listener.address_parsing,
        max_bad_commands=listener.max_bad_commands,
        command_timeout=listener.command_timeout,
        data_timeout=listener.data_timeout,
        max_connections=listener.max_connections,
        max_connections_per_ip=listener.max_connections_per_ip,
        starttls=listener.starttls,
        tls_certificate=listener.tls_certificate,
        tls_key=listener.tls_key,
        tls_dir=tls_dir,
    )


class StartupError(Exception):
    """Start-up cannot go on; the message says what and where, for the operator."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Take the data directory for this process alone (two writers on one LMDB queue
    would deliver every message twice). The lock lives as long as the returned file."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / "sluice.lock", "a+", encoding="ascii")
    except OSError as exc:
        raise StartupError(f"data directory {data_dir}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise StartupError(
            f"data directory {data_dir} is in use by sluice pid {owner}; "
            "only one sluice may run on a data directory"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


async def serve(config: Config) -> int:
    try:
        return await _serve(config)
    except StartupError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 1


async def _serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    try:
        eventlog.configure(config.log_file)
    except OSError as exc:
        raise StartupError(f"log_file {config.log_file}: {exc.strerror or exc}") from exc
    lock = lock_data_dir(config.data_dir)
    try:
        queue = Queue(config.data_dir, durable=config.durable)
    except Exception as exc:  # lmdb.Error is not an OSError
        raise StartupError(f"queue in {config.data_dir}: {exc}") from exc
    policy = Policy(config)
    specs = [listener_spec(lc, config.hostname, config.data_dir / "tls") for lc in config.listeners]
    try:
        server = Server(specs)
    except OSError as exc:
        await queue.close()
        raise StartupError(str(exc)) from exc
    if config.metrics_address:
        from appliance import metrics

        try:
            metrics.start(config.metrics_address, queue, server)
        except OSError as exc:
            server.shutdown()
            await queue.close()
            raise StartupError(
                f"metrics_address {config.metrics_address}: {exc.strerror or exc}"
            ) from exc
    # Delivery runs in its own process on the same queue (appliance/delivery/worker.py),
    # so sending mail out does not compete with accepting it for this process's GIL.
    delivery = DeliveryProcess(config)
    try:
        await delivery.start()
    except OSError as exc:
        server.shutdown()
        await queue.close()
        raise StartupError(f"cannot start the delivery process: {exc}") from exc
    acceptor = MessageAcceptor(config, queue, delivery.notify)
    inbound = Inbound(server, policy, acceptor, loop)
    inbound.start()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # SIGHUP: reopen the event log (after logrotate moved it); nothing else changes.
    def reopen() -> None:
        eventlog.reopen()
        delivery.reopen_log()

    loop.add_signal_handler(signal.SIGHUP, reopen)

    for name, ip, port in server.bound_addresses():
        log_event(
            "startup",
            listener=name,
            address=f"{ip}:{port}",
            data_dir=str(config.data_dir),
            durable=config.durable,
            queued=queue.count(),
        )
    if not config.durable:
        log_event("warning", text="durable = false: messages are NOT fsync'ed before the 250")

    await stop.wait()
    log_event("shutdown", phase="stop-accepting", active_sessions=server.active_sessions())
    server.stop_accepting()
    await inbound.drain(SHUTDOWN_GRACE_SECONDS)
    inbound.stop()
    # Blocks (GIL released) until every session has said 421 and closed.
    await loop.run_in_executor(None, server.shutdown)
    await delivery.stop()
    await queue.close()
    log_event("shutdown", phase="done")
    lock.close()
    return 0


def run(config: Config) -> int:
    """Run Sluice until SIGTERM/SIGINT; returns the process exit code."""
    return uvloop.run(serve(config))
