"""Destination controls, bounce profiles, adaptive back-off, TLS policy and 8BITMIME.

Retry timing and pause/recover run on a fake clock (no sleeps); connection limits, rate
limits and TLS are observed at a real next hop on loopback (smtp-sink, or the scripted
recorder in tests/smtp_recorder.py when the test needs to see concurrency or TLS).
"""

from __future__ import annotations

import itertools
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import (
    BounceProfile,
    ConfigError,
    DestinationConfig,
    Route,
    load_config,
)
from appliance.delivery.destinations import read_snapshot
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DeliveryScheduler
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id
from tests.conftest import SinkFactory, free_port, loopback_hosts
from tests.delivery_support import T0, Clock, hop, make_config, scheduler
from tests.smtp_recorder import (
    Recorder,
    make_ca,
    make_server_cert,
    server_context,
    start_recorder,
)

BODY = b"Subject: test\r\nFrom: alice@example.org\r\n\r\nline\r\n"


async def submit(
    queue: Queue, rcpts: list[str], arrived: float, body: bytes = BODY, **kw: Any
) -> MessageRecord:
    record = MessageRecord(
        qid=new_queue_id(),
        arrived=arrived,
        sender=kw.pop("sender", "alice@example.org"),
        mail_params=kw.pop("mail_params", []),
        recipients=[RecipientRecord(r, []) for r in rcpts],
        size=len(body),
        next_attempt=arrived,
        **kw,
    )
    await queue.submit(record, body)
    return record


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sluice.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# -- configuration ----------------------------------------------------------------------------


def test_destinations_inherit_from_star_and_match_by_pattern(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [delivery]
            max_connections = 40
            [bounce_profiles.slow]
            retry_initial = "10m"
            [destinations."*"]
            max_connections = 10
            tls = "required"
            [destinations."example.com"]
            messages_per_minute = 30
            bounce_profile = "slow"
            [destinations.".example.net"]
            recipients_per_message = 5
            """,
        )
    )
    pattern, d = config.destination("EXAMPLE.com")
    assert pattern == "example.com"
    assert (d.max_connections, d.tls, d.messages_per_minute) == (10, "required", 30)
    assert d.bounce_profile == "slow"
    pattern, d = config.destination("mx.sub.example.net")
    assert pattern == ".example.net" and d.recipients_per_message == 5 and d.tls == "required"
    pattern, d = config.destination("other.org")
    assert pattern == "*" and d.max_connections == 10 and d.recipients_per_message == 100
    assert d.pause_after == 5 and d.messages_per_minute == 0
    # Without any table: the built-in defaults (the [delivery] limits apply).
    bare = load_config(write(tmp_path, "[delivery]\n"))
    assert bare.destination("x.org") == ("*", DestinationConfig())


def test_bounce_profiles_default_from_top_level_keys(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            max_queue_time = "2d"
            [delivery]
            retry_initial = "2m"
            retry_max = "30m"
            [bounce_profiles.fast]
            retry_max = "5m"
            delay_warning = "4h"
            [[listeners]]
            name = "in"
            bounce_profile = "fast"
            """,
        )
    )
    default = config.profile(None)
    assert (default.retry_initial, default.retry_max, default.max_queue_time) == (
        120,
        1800,
        2 * 86400,
    )
    assert default.delay_warning == 0
    fast = config.profile("fast")
    assert (fast.retry_initial, fast.retry_max, fast.delay_warning) == (120, 300, 4 * 3600)
    assert fast.max_queue_time == 2 * 86400
    assert config.listeners[0].bounce_profile == "fast"
    assert config.profile("gone") == default  # a record from an older configuration
    # An explicit [bounce_profiles.default] replaces the top-level keys.
    own = load_config(write(tmp_path, '[bounce_profiles.default]\nmax_queue_time = "1h"\n'))
    assert own.profile("").max_queue_time == 3600 and own.max_queue_time == 3600


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[destinations."x.org"]\nmax_conections = 3\n', 'destinations."x.org".max_conections'),
        ('[destinations."*"]\ntls = "always"\n', 'destinations."*".tls'),
        ('[destinations."x.org"]\nbounce_profile = "nope"\n', "bounce_profile"),
        ('[[listeners]]\nbounce_profile = "nope"\n', "listeners[0].bounce_profile"),
        ('[bounce_profiles.p]\nretry_initial = "1h"\nretry_max = "1m"\n', "retry_max"),
        ('[destinations."x.org"]\npause_initial = "1h"\npause_max = "1m"\n', "pause_max"),
        ('[destinations."x.org"]\ntls_ca_file = "missing.pem"\n', "tls_ca_file"),
        ('[routes]\n"x.org" = ["dns", "10.0.0.1"]\n', 'routes."x.org"'),
    ],
)
def test_configuration_errors_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert where in str(err.value)


def test_route_dns_overrides_a_broader_route(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [routes]
            "*" = ["smarthost.example.net:587"]
            ".example.com" = ["10.0.0.1"]
            "direct.example.com" = ["dns"]
            """,
        )
    )
    assert config.routes["direct.example.com"] == Route(use_dns=True)
    router = Router(config)
    assert router.static_route("direct.example.com") is None  # MX lookup
    assert router.static_route("other.example.com") == (("10.0.0.1", 25),)
    assert router.static_route("example.org") == (("smarthost.example.net", 587),)


# -- bounce profiles and adaptive back-off on a fake clock ------------------------------------


async def test_listener_profile_and_destination_override_set_retry_times(
    tmp_path: Path, smtp_sink: SinkFactory
) -> None:
    busy = smtp_sink(soft=["RCPT"])
    profiles = {
        "fast": BounceProfile("fast", retry_initial=10, retry_max=20, max_queue_time=1000),
        "slow": BounceProfile("slow", retry_initial=500, retry_max=500, max_queue_time=9000),
    }
    routes = {"a.test": hop(busy.host, busy.port), "b.test": hop(busy.host, busy.port)}
    dests = {"b.test": DestinationConfig(bounce_profile="slow", pause_after=100)}
    dests["*"] = DestinationConfig(pause_after=100)
    config = make_config(tmp_path, routes, dests, profiles)
    clock = Clock()
    async with scheduler(tmp_path, config, clock) as (sched, queue):
        a = await submit(queue, ["x@a.test"], clock.now, bounce_profile="fast")
        b = await submit(queue, ["y@b.test"], clock.now, bounce_profile="fast")
        await sched.run_once()
        a1, b1 = queue.get(a.qid), queue.get(b.qid)
        assert a1 is not None and b1 is not None
        assert 9 <= a1.next_attempt - clock.now <= 11  # the listener's "fast" profile
        assert 450 <= b1.next_attempt - clock.now <= 550  # b.test overrides with "slow"
        clock.now = a1.next_attempt
        await sched.run_once()
        a2 = queue.get(a.qid)
        assert a2 is not None and 18 <= a2.next_attempt - clock.now <= 20  # capped
        # "fast" gives up after 1000 s although the default profile would wait 5 days.
        clock.now = T0 + 1000
        await sched.run_once()
        assert queue.get(a.qid) is None
        assert queue.get(b.qid) is not None


async def test_pause_after_consecutive_failures_then_recover(
    tmp_path: Path, smtp_sink: SinkFactory, events: Any
) -> None:
    (host,) = loopback_hosts(1)
    port = free_port(host)
    dests = {"down.test": DestinationConfig(pause_after=2, pause_initial=100, pause_max=300)}
    config = make_config(tmp_path, {"down.test": hop(host, port)}, dests, retry_initial=10)
    clock = Clock()
    async with scheduler(tmp_path, config, clock) as (sched, queue):
        rec = await submit(queue, ["a@down.test"], clock.now)
        await sched.run_once()  # failure 1: refused, ordinary back-off
        state = sched.destinations.get("down.test")
        assert state.failures == 1 and not state.paused(clock.now)
        assert state.connection_limit(50) == 25  # fewer connections while failing
        current = queue.get(rec.qid)
        assert current is not None
        clock.now = current.next_attempt
        await sched.run_once()  # failure 2: paused for 100 s
        assert state.paused(clock.now) and state.paused_until == clock.now + 100
        assert "2 consecutive failures" in state.pause_reason
        assert "connect to" in state.pause_reason
        current = queue.get(rec.qid)
        assert current is not None and current.next_attempt == state.paused_until
        (paused,) = events("destination_paused")
        assert paused["destination"] == "down.test" and paused["seconds"] == 100

        # New mail during the pause is held without a connection, until the pause end.
        opened = sched.connections_opened
        later = await submit(queue, ["b@down.test"], clock.now + 30)
        clock.now += 30
        assert await sched.run_once() == 1
        held = queue.get(later.qid)
        assert held is not None and held.next_attempt == state.paused_until
        (rcpt,) = held.recipients
        assert rcpt.state == "deferred" and rcpt.attempts == 0
        assert rcpt.last_reply.startswith("451 4.4.5 destination down.test paused until")
        assert held.attempts == 0
        assert sched.connections_opened == opened
        # Nothing is due until the pause ends: no busy loop.
        clock.now += 50
        assert await sched.run_once() == 0

        # Still down at the pause end: the probe fails and the pause doubles.
        clock.now = state.paused_until
        await sched.run_once()
        assert state.paused_until == clock.now + 200
        snapshot = sched.hosts_snapshot()["destinations"]["down.test"]
        assert snapshot["paused_until"] is not None and snapshot["consecutive_failures"] == 3

        # The host comes back: the next probe delivers both and the pause is forgotten.
        sink = smtp_sink(host, port)
        clock.now = state.paused_until
        await sched.run_once()
        assert queue.count() == 0
        assert state.failures == 0 and not state.paused(clock.now) and state.pauses == 0
        assert state.delivered == 2
        assert events("destination_recovered")
    assert sorted(r for m in sink.wait_for(2) for r in m.recipients) == [
        "a@down.test",
        "b@down.test",
    ]


@pytest.mark.parametrize(
    ("kind", "pauses"),
    [("soft_rcpt", False), ("soft_mail", True), ("close421_data", True), ("drop_rcpt", True)],
)
async def test_what_counts_as_a_failure_of_the_destination(
    tmp_path: Path, smtp_sink: SinkFactory, kind: str, pauses: bool
) -> None:
    # A 4xx to one RCPT (mailbox full, greylisting) says nothing about the host; a 4xx
    # to MAIL, a 421 or a dropped connection defers the whole transaction and counts.
    flag, command = kind.split("_")
    options = {"soft": "soft", "close421": "close421", "drop": "disconnect"}[flag]
    sink = smtp_sink(**{options: [command.upper()]})
    dests = {"d.test": DestinationConfig(pause_after=1)}
    config = make_config(tmp_path, {"d.test": hop(sink.host, sink.port)}, dests)
    clock = Clock()
    async with scheduler(tmp_path, config, clock) as (sched, queue):
        rec = await submit(queue, ["a@d.test"], clock.now)
        await sched.run_once()
        current = queue.get(rec.qid)
        assert current is not None and current.recipients[0].state == "deferred"
        assert sched.destinations.get("d.test").paused(clock.now) is pauses


async def test_hosts_snapshot_is_published_as_json(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    config = make_config(tmp_path, {"ok.test": hop(sink.host, sink.port)})
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, ["a@ok.test", "b@ok.test"], time.time())
        await sched.run_once()
        sched.publish()
        leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".hosts.")]
    snapshot = read_snapshot(tmp_path)
    assert snapshot is not None
    state = snapshot["destinations"]["ok.test"]
    assert state["delivered"] == 2 and state["deferred"] == 0 and state["bounced"] == 0
    assert state["last_reply"].startswith(f"{sink.host}: 250")
    assert state["paused_until"] is None and state["settings"] == "*"
    assert leftovers == []  # no temporary file left behind


# -- limits observed at the next hop (real time) ---------------------------------------------


async def test_max_connections_per_destination_and_messages_per_connection(
    tmp_path: Path,
) -> None:
    rec = await start_recorder(data_delay=0.1)
    other = await start_recorder(data_delay=0.1)
    dests = {
        "limited.test": DestinationConfig(max_connections=2, messages_per_connection=2),
        "*": DestinationConfig(max_connections=3),
    }
    routes = {"limited.test": hop(rec.host, rec.port), "other.test": hop(other.host, other.port)}
    config = make_config(tmp_path, routes, dests)
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            for i in range(8):
                await submit(queue, [f"r{i}@limited.test"], time.time())
                await submit(queue, [f"s{i}@other.test"], time.time())
            await sched.run_once()
            assert queue.count() == 0
            assert sched._pool.peak_by["limited.test"] == 2
    finally:
        await rec.stop()
        await other.stop()
    assert len(rec.transactions) == 8 and rec.peak == 2
    assert rec.sessions == 4  # two messages per connection
    assert other.peak == 3 and len(other.transactions) == 8


async def test_bytes_in_flight_bound_how_many_large_messages_are_sent_at_once(
    tmp_path: Path,
) -> None:
    rec = await start_recorder(data_delay=0.2)
    config = make_config(tmp_path, {"big.test": hop(rec.host, rec.port)}, {})
    body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 1250  # 100 KB in short lines
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            sched._max_bytes_in_flight = 250_000  # two such messages at a time
            for i in range(6):
                await submit(queue, [f"r{i}@big.test"], time.time(), body=body)
            for _ in range(6):
                if not queue.count():
                    break
                await sched.run_once()
            assert queue.count() == 0, [r.recipients for r in queue.all()]
    finally:
        await rec.stop()
    assert len(rec.transactions) == 6
    assert rec.peak == 2


async def test_recipients_per_message_splits_transactions(
    tmp_path: Path, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    dests = {"many.test": DestinationConfig(recipients_per_message=2)}
    config = make_config(tmp_path, {"many.test": hop(sink.host, sink.port)}, dests)
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, [f"u{i}@many.test" for i in range(5)], time.time())
        await sched.run_once()
        assert queue.count() == 0
    assert [len(m.recipients) for m in sink.wait_for(3)] == [2, 2, 1]


async def test_messages_per_minute_spaces_messages_at_the_sink(tmp_path: Path) -> None:
    rec = await start_recorder()
    dests = {"slow.test": DestinationConfig(messages_per_minute=300)}  # one per 0.2 s
    config = make_config(tmp_path, {"slow.test": hop(rec.host, rec.port)}, dests)
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            for i in range(5):
                await submit(queue, [f"r{i}@slow.test"], time.time())
            await sched.run_once()
            assert queue.count() == 0
    finally:
        await rec.stop()
    times = sorted(t.at for t in rec.transactions)
    assert len(times) == 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.15 for g in gaps), gaps
    assert times[-1] - times[0] >= 0.75


async def test_rate_limit_beyond_a_short_wait_goes_back_to_the_queue(tmp_path: Path) -> None:
    rec = await start_recorder()
    dests = {"slow.test": DestinationConfig(messages_per_minute=2)}  # one per 30 s
    config = make_config(tmp_path, {"slow.test": hop(rec.host, rec.port)}, dests)
    t0 = time.time()
    clock = Clock(t0)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)  # the clock stays: the others decide at t0

    queue = Queue(tmp_path, durable=False, clock=clock)
    sched = DeliveryScheduler(queue, Router(config, clock), config, clock, fake_sleep)
    try:
        msgs = [await submit(queue, [f"r{i}@slow.test"], t0) for i in range(3)]
        await sched.run_once()
        # The first goes at once, the second waits in memory for its slot 30 s later,
        # the third (60 s away) goes back to the queue until its slot.
        assert slept == [30]
        left = [m for m in (queue.get(x.qid) for x in msgs) if m is not None]
        (held,) = left
        assert held.next_attempt == pytest.approx(t0 + 60)
        assert held.recipients[0].last_reply.startswith("451 4.4.5 rate limit of slow.test")
        assert held.recipients[0].attempts == 0
        clock.now = held.next_attempt
        await sched.run_once()
        assert queue.count() == 0 and slept == [30]
    finally:
        await sched.close()
        await queue.close()
        await rec.stop()
    assert len(rec.transactions) == 3


# -- TLS policy -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A test CA and its directory."""
    directory = tmp_path_factory.mktemp("pki")
    cert, _ = make_ca(directory)
    return cert, directory


async def tls_run(
    tmp_path: Path, rec: Recorder, settings: DestinationConfig
) -> tuple[MessageRecord | None, Recorder]:
    config = make_config(tmp_path, {"tls.test": hop(rec.host, rec.port)}, {"tls.test": settings})
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            msg = await submit(queue, ["a@tls.test"], time.time())
            await sched.run_once()
            return queue.get(msg.qid), rec
    finally:
        await rec.stop()


def tls_recorder_context(pki: tuple[Path, Path], host: str, name: str = "") -> Any:
    ca_cert, directory = pki
    cert, key = make_server_cert(directory, (ca_cert, directory / "ca.key"), name or host)
    return server_context(cert, key)


async def test_opportunistic_tls_is_used_when_offered(
    tmp_path: Path, pki: tuple[Path, Path], events: Any
) -> None:
    (host,) = loopback_hosts(1)
    rec = Recorder(host, free_port(host), tls_context=tls_recorder_context(pki, host))
    left, rec = await tls_run(tmp_path, await rec.start(), DestinationConfig())
    assert left is None and rec.tls_sessions == 1
    assert rec.transactions[0].tls
    (attempt,) = events("delivery_attempt")
    assert attempt["tls"].startswith("TLSv1.")


async def test_opportunistic_tls_falls_back_to_plain_after_a_failed_handshake(
    tmp_path: Path, events: Any
) -> None:
    rec = await start_recorder(broken_tls=True)
    left, rec = await tls_run(tmp_path, rec, DestinationConfig(tls="opportunistic"))
    assert left is None  # delivered in clear text on a second connection
    assert rec.sessions == 2 and not rec.transactions[0].tls
    assert events("delivery_attempt")[0]["tls"] == "fallback-plain"


async def test_tls_none_never_says_starttls(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    (host,) = loopback_hosts(1)
    rec = Recorder(host, free_port(host), tls_context=tls_recorder_context(pki, host))
    left, rec = await tls_run(tmp_path, await rec.start(), DestinationConfig(tls="none"))
    assert left is None and rec.tls_sessions == 0
    assert "STARTTLS" not in rec.commands


@pytest.mark.parametrize("policy", ["required", "required-verified"])
async def test_required_tls_defers_when_starttls_is_missing_or_broken(
    tmp_path: Path, policy: str
) -> None:
    for broken in (False, True):
        rec = await start_recorder(broken_tls=broken)
        work = tmp_path / f"broken{broken}"
        work.mkdir()
        left, rec = await tls_run(work, rec, DestinationConfig(tls=policy))  # type: ignore[arg-type]
        assert left is not None and not rec.transactions
        (rcpt,) = left.recipients
        assert rcpt.state == "deferred"
        assert rcpt.last_reply.startswith(f"{rec.host}: 451 4.7.5 TLS"), rcpt.last_reply
        if not broken:
            assert "does not offer STARTTLS" in rcpt.last_reply
            assert "MAIL" not in " ".join(rec.commands)


async def test_required_verified_checks_chain_and_name(
    tmp_path: Path, pki: tuple[Path, Path]
) -> None:
    ca_cert, _ = pki
    (host,) = loopback_hosts(1)
    good = Recorder(host, free_port(host), tls_context=tls_recorder_context(pki, host))
    settings = DestinationConfig(tls="required-verified", tls_ca_file=ca_cert)
    (tmp_path / "ok").mkdir()
    left, rec = await tls_run(tmp_path / "ok", await good.start(), settings)
    assert left is None and rec.transactions[0].tls

    # The same CA, but a certificate for another name: not verified, deferred.
    (host2,) = loopback_hosts(1)
    wrong = Recorder(host2, free_port(host2), tls_context=tls_recorder_context(pki, "x", "x.test"))
    (tmp_path / "name").mkdir()
    left, rec = await tls_run(tmp_path / "name", await wrong.start(), settings)
    assert left is not None and not rec.transactions
    assert "451 4.7.5" in left.recipients[0].last_reply
    assert "certificate not verified" in left.recipients[0].last_reply

    # The right name, but the system store instead of the test CA: not verified.
    (host3,) = loopback_hosts(1)
    other = Recorder(host3, free_port(host3), tls_context=tls_recorder_context(pki, host3))
    (tmp_path / "ca").mkdir()
    left, rec = await tls_run(
        tmp_path / "ca", await other.start(), DestinationConfig(tls="required-verified")
    )
    assert left is not None and "certificate not verified" in left.recipients[0].last_reply


# -- 8BITMIME and addresses on the wire -------------------------------------------------------

EIGHT_BIT = "Subject: caf\u00e9\r\nFrom: a@example.org\r\n\r\nna\u00efve\r\n".encode()


async def test_8bit_message_to_a_hop_without_8bitmime_bounces_5_6_3(tmp_path: Path) -> None:
    rec = await start_recorder(extensions=("PIPELINING",))
    home = await start_recorder()
    routes = {"old.test": hop(rec.host, rec.port), "example.org": hop(home.host, home.port)}
    config = make_config(tmp_path, routes)
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            await submit(queue, ["a@old.test"], time.time(), body=EIGHT_BIT)
            await submit(queue, ["b@old.test"], time.time(), body=BODY)  # 7-bit: fine
            await sched.run_once()
            (bounce,) = list(queue.all())
            assert bounce.is_bounce
            assert b"Status: 5.6.3" in queue.body(bounce.qid)
    finally:
        await rec.stop()
        await home.stop()
    assert [t.rcpts for t in rec.transactions] == [["RCPT TO:<b@old.test>"]]


async def test_8bit_message_is_declared_body_8bitmime(tmp_path: Path) -> None:
    rec = await start_recorder()
    config = make_config(tmp_path, {"new.test": hop(rec.host, rec.port)})
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            await submit(queue, ["a@new.test"], time.time(), body=EIGHT_BIT)
            await sched.run_once()
            assert queue.count() == 0
    finally:
        await rec.stop()
    assert rec.transactions[0].mail == "MAIL FROM:<alice@example.org> BODY=8BITMIME"
    assert rec.transactions[0].data == EIGHT_BIT


async def test_quoted_local_part_with_bracket_and_space_is_one_recipient(
    tmp_path: Path,
) -> None:
    rec = await start_recorder()
    config = make_config(tmp_path, {"example.net": hop(rec.host, rec.port)})
    rcpts = ['"john >doe"@example.net', '"a b\\"c"@example.net', "bad>x@example.net"]
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            msg = await submit(queue, rcpts, time.time(), sender='"x <y"@example.org')
            await sched.run_once()
            (bounce,) = [m for m in queue.all() if m.is_bounce]
            original = queue.get(msg.qid)
            assert original is None
            assert b"Final-Recipient: rfc822; bad>x@example.net" in queue.body(bounce.qid)
    finally:
        await rec.stop()
    (t,) = [t for t in rec.transactions if "example.org" in t.mail]
    assert t.mail == 'MAIL FROM:<"x <y"@example.org>'
    assert t.rcpts == ['RCPT TO:<"john >doe"@example.net>', 'RCPT TO:<"a b\\"c"@example.net>']
    assert all("\r" not in c and "\n" not in c for c in rec.commands)
