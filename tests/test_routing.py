"""Tests for appliance.delivery.routing against a real DNS server (dnsmasq on loopback)."""

from __future__ import annotations

import random
from pathlib import Path

from appliance.config import Config, DeliveryConfig, Route
from appliance.delivery.routing import Router
from tests.conftest import DnsFactory, DnsServer, free_port
from tests.delivery_support import Clock


def make_config(
    tmp_path: Path,
    dns: DnsServer | None = None,
    routes: dict[str, Route] | None = None,
    timeout: float = 2.0,
) -> Config:
    return Config(
        source="test",
        hostname="mta.test",
        data_dir=tmp_path,
        routes=routes or {},
        dns_servers=(dns.address,) if dns else (("127.0.0.1", free_port()),),
        dns_timeout=timeout,
        delivery=DeliveryConfig(mx_port=2525),
    )


def zone(dns_server: DnsFactory, ttl: int = 0) -> DnsServer:
    return dns_server(
        mx=[
            ("two.test", "mx2.two.test", 20),
            ("two.test", "mx1.two.test", 10),
            ("equal.test", "a.equal.test", 5),
            ("equal.test", "b.equal.test", 5),
            ("null.test", ".", 0),
            ("dangling.test", "nowhere.test", 10),
        ],
        hosts=[
            ("mx1.two.test", "127.0.0.11"),
            ("mx2.two.test", "127.0.0.12", "::1"),
            ("a.equal.test", "127.0.0.21"),
            ("b.equal.test", "127.0.0.22"),
            ("implicit.test", "127.0.0.31"),
            ("relay.test", "127.0.0.41"),
        ],
        ttl=ttl,
        extra=[f"--server=/fail.test/127.0.0.1#{free_port()}"],
    )


async def test_mx_preference_order_and_addresses(tmp_path: Path, dns_server: DnsFactory) -> None:
    router = Router(make_config(tmp_path, zone(dns_server)))
    res = await router.resolve("Two.Test")
    assert res.ok and not res.permanent
    assert res.hosts == (("127.0.0.11", 2525), ("127.0.0.12", 2525), ("::1", 2525))
    assert res.names == {
        "127.0.0.11": "mx1.two.test",
        "127.0.0.12": "mx2.two.test",
        "::1": "mx2.two.test",
    }


async def test_equal_preferences_are_shuffled(tmp_path: Path, dns_server: DnsFactory) -> None:
    router = Router(make_config(tmp_path, zone(dns_server)), rng=random.Random(7))
    orders = {(await router.resolve("equal.test")).hosts for _ in range(30)}
    assert orders == {
        (("127.0.0.21", 2525), ("127.0.0.22", 2525)),
        (("127.0.0.22", 2525), ("127.0.0.21", 2525)),
    }


async def test_address_records_when_there_is_no_mx(tmp_path: Path, dns_server: DnsFactory) -> None:
    res = await Router(make_config(tmp_path, zone(dns_server))).resolve("implicit.test")
    assert res.hosts == (("127.0.0.31", 2525),)
    assert res.names["127.0.0.31"] == "implicit.test"


async def test_nxdomain_is_permanent(tmp_path: Path, dns_server: DnsFactory) -> None:
    res = await Router(make_config(tmp_path, zone(dns_server))).resolve("nx.test")
    assert not res.ok and res.permanent
    assert (res.code, res.enhanced) == (550, "5.1.2")
    assert "does not exist" in res.reason


async def test_null_mx_is_permanent(tmp_path: Path, dns_server: DnsFactory) -> None:
    res = await Router(make_config(tmp_path, zone(dns_server))).resolve("null.test")
    assert res.permanent and (res.code, res.enhanced) == (556, "5.1.10")


async def test_mx_without_address_is_temporary(tmp_path: Path, dns_server: DnsFactory) -> None:
    res = await Router(make_config(tmp_path, zone(dns_server))).resolve("dangling.test")
    assert not res.ok and not res.permanent and res.enhanced == "4.4.4"


async def test_refused_and_timeout_are_temporary(tmp_path: Path, dns_server: DnsFactory) -> None:
    router = Router(make_config(tmp_path, zone(dns_server), timeout=0.5))
    refused = await router.resolve("example.org")  # no zone and no upstream: REFUSED
    assert not refused.ok and not refused.permanent and refused.code == 451
    timeout = await router.resolve("fail.test")  # forwarded to a dead server
    assert not timeout.ok and not timeout.permanent


async def test_no_dns_server_at_all_is_temporary(tmp_path: Path) -> None:
    res = await Router(make_config(tmp_path, None, timeout=0.3)).resolve("example.org")
    assert not res.ok and not res.permanent


async def test_answers_are_cached_for_their_ttl(tmp_path: Path, dns_server: DnsFactory) -> None:
    server = zone(dns_server, ttl=300)
    clock = Clock()
    router = Router(make_config(tmp_path, server, timeout=0.3), clock)
    first = await router.resolve("two.test")
    assert first.ok
    server.proc.terminate()
    server.proc.wait()
    clock.now += 299
    assert (await router.resolve("two.test")).hosts == first.hosts
    clock.now += 2
    assert not (await router.resolve("two.test")).ok


async def test_static_routes(tmp_path: Path, dns_server: DnsFactory) -> None:
    routes = {
        "exact.example": Route(hosts=(("192.0.2.1", 25), ("192.0.2.2", 2526))),
        ".sub.example": Route(hosts=(("relay.test", 587),)),
        "*": Route(hosts=(("[::1]".strip("[]"), 25),)),
    }
    router = Router(make_config(tmp_path, zone(dns_server), routes=routes))
    exact = await router.resolve("EXACT.example")
    assert exact.hosts == (("192.0.2.1", 25), ("192.0.2.2", 2526))
    # ".sub.example" covers subdomains, not sub.example itself (that falls to "*").
    deep = await router.resolve("a.b.sub.example")
    assert deep.hosts == (("127.0.0.41", 587),) and deep.names["127.0.0.41"] == "relay.test"
    assert (await router.resolve("sub.example")).hosts == (("::1", 25),)
    assert (await router.resolve("two.test")).hosts == (("::1", 25),)  # "*" beats MX


async def test_route_to_unresolvable_host_is_temporary(
    tmp_path: Path, dns_server: DnsFactory
) -> None:
    routes = {"x.example": Route(hosts=(("gone.test", 25),))}
    res = await Router(make_config(tmp_path, zone(dns_server), routes=routes)).resolve("x.example")
    assert not res.ok and not res.permanent


async def test_address_literals(tmp_path: Path) -> None:
    router = Router(make_config(tmp_path))
    assert (await router.resolve("[192.0.2.7]")).hosts == (("192.0.2.7", 2525),)
    assert (await router.resolve("[IPv6:2001:db8::1]")).hosts == (("2001:db8::1", 2525),)
    bad = await router.resolve("[300.1.1.1]")
    assert bad.permanent
