"""End to end: delivery by DNS MX (RFC 5321 5.1) against dnsmasq and smtp-sinks.

Every next hop listens on its own 127.x.y.z address and on one shared port, which the
configuration names as `[delivery] mx_port`; no `[routes]` entry covers these domains,
so Sluice must look them up in the dnsmasq server named in `[dns] servers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.e2e.harness import Sluice, SluiceFactory, free_port, loopback_hosts

if TYPE_CHECKING:
    from tests.conftest import DnsFactory, Sink, SinkFactory


def send(server: Sluice, rcpt: str) -> None:
    with server.smtp() as client:
        refused = client.sendmail("sender@src.test", [rcpt], b"Subject: mx\r\n\r\nvia MX\r\n")
        assert refused == {}


def start_mx_world(
    sluice: SluiceFactory,
    smtp_sink: SinkFactory,
    dns_server: DnsFactory,
    *,
    mx: list[tuple[str, str, int]],
    hosts: list[tuple[str, str]],
    listening: list[str],
) -> tuple[Sluice, dict[str, Sink]]:
    """dnsmasq with `mx`/`hosts`; sinks on the `listening` addresses, one common port."""
    addresses = sorted({record[1] for record in hosts})
    port = free_port(*addresses)
    sinks = {host: smtp_sink(host=host, port=port) for host in listening}
    dns = dns_server(mx=mx, hosts=hosts)
    server = sluice(
        dns={"servers": [f"{dns.host}:{dns.port}"], "timeout": 3},
        delivery={"mx_port": port},
    )
    return server, sinks


def test_lowest_preference_mx_gets_the_mail(
    sluice: SluiceFactory, smtp_sink: SinkFactory, dns_server: DnsFactory
) -> None:
    primary, backup = loopback_hosts(2)
    server, sinks = start_mx_world(
        sluice,
        smtp_sink,
        dns_server,
        # The backup is listed first: order must come from the preference, not the answer.
        mx=[("pref.test", "mx-b.pref.test", 20), ("pref.test", "mx-a.pref.test", 10)],
        hosts=[("mx-a.pref.test", primary), ("mx-b.pref.test", backup)],
        listening=[primary, backup],
    )
    send(server, "user@pref.test")
    [msg] = sinks[primary].wait_for(1, timeout=20)
    assert msg.recipients == ["user@pref.test"]
    [delivered] = server.wait_event("delivered", recipient="user@pref.test")
    assert primary in delivered["host"]
    assert sinks[backup].messages() == []


def test_next_mx_when_preferred_host_is_down(
    sluice: SluiceFactory, smtp_sink: SinkFactory, dns_server: DnsFactory
) -> None:
    down, backup = loopback_hosts(2)
    server, sinks = start_mx_world(
        sluice,
        smtp_sink,
        dns_server,
        mx=[("down.test", "mx-a.down.test", 10), ("down.test", "mx-b.down.test", 20)],
        hosts=[("mx-a.down.test", down), ("mx-b.down.test", backup)],
        listening=[backup],  # nothing listens on the preferred exchange's address
    )
    send(server, "user@down.test")
    [msg] = sinks[backup].wait_for(1, timeout=20)
    assert msg.recipients == ["user@down.test"]
    [delivered] = server.wait_event("delivered", recipient="user@down.test")
    assert backup in delivered["host"]
    # It did try the preferred one first.
    attempts = [e for e in server.events() if e["event"] in ("connect_failed", "delivery_attempt")]
    assert down in attempts[0]["host"], attempts


def test_a_record_fallback_without_mx(
    sluice: SluiceFactory, smtp_sink: SinkFactory, dns_server: DnsFactory
) -> None:
    (address,) = loopback_hosts(1)
    server, sinks = start_mx_world(
        sluice,
        smtp_sink,
        dns_server,
        mx=[],
        hosts=[("aonly.test", address)],
        listening=[address],
    )
    send(server, "user@aonly.test")
    [msg] = sinks[address].wait_for(1, timeout=20)
    assert msg.recipients == ["user@aonly.test"]
    assert msg.sender == "sender@src.test"
    server.wait_event("delivered", recipient="user@aonly.test")
