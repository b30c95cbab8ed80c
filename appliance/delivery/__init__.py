"""Outbound delivery: where the next hop is, how to talk to it, and when to try again.

The stage after the queue on the path of a message. Three modules, read in this order:

- `routing`: static routes from the configuration, else DNS MX (RFC 5321 section 5.1,
  RFC 7505 null MX) -> an ordered list of hosts, or a permanent / temporary failure.
- `smtp_client`: one outbound SMTP connection (RFC 5321, RFC 2920 pipelining, RFC 3463
  enhanced status codes) with an outcome per recipient.
- `destinations`: per recipient domain limits, counters, adaptive back-off (pauses) and
  the hosts.json snapshot read by `sluice hosts`.
- `scheduler`: takes due messages from the queue, groups recipients by domain, reuses and
  limits connections, records per-recipient outcomes, retries with backoff by bounce
  profile, and hands permanent failures and DSN requests to `appliance.bounce`.

Runs inside the unprivileged Python process; it talks to the queue and to remote MTAs and
never to the inbound Rust side except through `DeliveryScheduler.notify()`.
"""

from __future__ import annotations

from appliance.delivery.routing import Resolution, Router
from appliance.delivery.scheduler import DeliveryScheduler
from appliance.delivery.smtp_client import (
    DeliveryResult,
    Reply,
    SmtpConnectError,
    SmtpConnection,
    Timeouts,
)

__all__ = [
    "DeliveryResult",
    "DeliveryScheduler",
    "Reply",
    "Resolution",
    "Router",
    "SmtpConnectError",
    "SmtpConnection",
    "Timeouts",
]
