"""`sluice run`: wires the listener, policy, queue and delivery together on uvloop.

Start-up order follows the path of a message backwards, so nothing is accepted before
it can be kept and sent: queue, delivery scheduler, policy, then the listeners. Shutdown
(SIGTERM or SIGINT) runs forwards: stop accepting connections, let messages already in
their group commit finish (their clients get the 250), answer everyone else 421 4.3.2,
stop delivery, close the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import uvloop

from appliance import eventlog
from appliance._native import ListenerSpec, Server
from appliance.config import Config, ListenerConfig
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DeliveryScheduler
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


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    eventlog.configure(config.log_file)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    queue = Queue(config.data_dir, durable=config.durable)
    router = Router(config)
    scheduler = DeliveryScheduler(queue, router, config)
    policy = Policy(config)
    specs = [listener_spec(lc, config.hostname, config.data_dir / "tls") for lc in config.listeners]
    try:
        server = Server(specs)
    except OSError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        await queue.close()
        return 1
    acceptor = MessageAcceptor(config, queue, scheduler.notify)
    inbound = Inbound(server, policy, acceptor, loop)
    inbound.start()

    if config.metrics_address:
        from appliance import metrics

        metrics.start(config.metrics_address, queue, server)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    delivery = loop.create_task(scheduler.run())
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
    scheduler.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await delivery
    await queue.close()
    log_event("shutdown", phase="done")
    return 0


def run(config: Config) -> int:
    """Run Sluice until SIGTERM/SIGINT; returns the process exit code."""
    return uvloop.run(serve(config))
