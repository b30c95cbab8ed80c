"""Tests for appliance.delivery.scheduler: a real queue in a tmp dir, real smtp-sink next
hops and a real DNS server on loopback; retry timing on a fake clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Route
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DeliveryScheduler
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id
from tests.conftest import (
    DnsFactory,
    Sink,
    SinkFactory,
    dsn_fields,
    free_port,
    loopback_hosts,
    parse_message,
)
from tests.delivery_support import T0, Clock, make_config, scheduler

BODY = b"Subject: test\r\nFrom: alice@example.org\r\n\r\nline\r\n.dot\r\n"


def route(sink: Sink) -> Route:
    return Route(hosts=((sink.host, sink.port),))


async def submit(
    queue: Queue, sender: str, rcpts: list[str], arrived: float, body: bytes = BODY, **kw: Any
) -> MessageRecord:
    record = MessageRecord(
        qid=new_queue_id(),
        arrived=arrived,
        sender=sender,
        mail_params=[],
        recipients=[RecipientRecord(r, []) for r in rcpts],
        size=len(body),
        next_attempt=arrived,
        **kw,
    )
    await queue.submit(record, body)
    return record


async def test_delivers_and_removes(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    config = make_config(tmp_path, {"example.net": route(sink)})
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, "alice@example.org", ["a@example.net", "b@example.net"], time.time())
        assert await sched.run_once() == 1
        assert queue.count() == 0
    (msg,) = sink.wait_for(1)
    assert msg.data == BODY.replace(b"\r\n", b"\n")
    assert msg.recipients == ["a@example.net", "b@example.net"]
    assert msg.helo == "mta.test"


async def test_mixed_outcomes_make_one_bounce_which_is_delivered(
    tmp_path: Path, smtp_sink: SinkFactory, events: Any
) -> None:
    good, bad, home = smtp_sink(), smtp_sink(hard=["RCPT"]), smtp_sink()
    routes = {"good.test": route(good), "bad.test": route(bad), "example.org": route(home)}
    config = make_config(tmp_path, routes)
    async with scheduler(tmp_path, config) as (sched, queue):
        original = await submit(
            queue, "alice@example.org", ["ok@good.test", "x@bad.test", "y@bad.test"], time.time()
        )
        await sched.run_once()
        assert queue.get(original.qid) is None
        (bounce,) = list(queue.all())
        assert bounce.is_bounce and bounce.sender == ""
        assert [r.address for r in bounce.recipients] == ["alice@example.org"]
        fields = dsn_fields(parse_message(queue.body(bounce.qid)))
        assert [f["Final-Recipient"] for f in fields[1:]] == [
            "rfc822; x@bad.test",
            "rfc822; y@bad.test",
        ]
        assert fields[1]["Remote-MTA"] == f"dns; {bad.host}"
        assert fields[1]["Diagnostic-Code"] == "smtp; 500 5.3.0 Error: command failed"
        assert fields[1]["Status"] == "5.3.0"
        await sched.run_once()
        assert queue.count() == 0
    assert [m.recipients for m in good.wait_for(1)] == [["ok@good.test"]]
    (returned,) = home.wait_for(1)
    assert returned.mail_args.startswith("<>")
    assert returned.recipients == ["alice@example.org"]
    names = [e["event"] for e in events()]
    assert names.count("bounced") == 2 and names.count("bounce_queued") == 1
    bounced = [e for e in events() if e["event"] == "bounced"]
    assert bounced[0]["host"] == bad.host and bounced[0]["reply"].startswith("500 5.3.0")


async def test_deferral_backoff_then_expiry(
    tmp_path: Path, smtp_sink: SinkFactory, events: Any
) -> None:
    busy, home = smtp_sink(soft=["RCPT"]), smtp_sink()
    config = make_config(
        tmp_path,
        {"busy.test": route(busy), "example.org": route(home)},
        retry_initial=60,
        retry_max=300,
        max_queue_time=1000,
    )
    clock = Clock()
    async with scheduler(tmp_path, config, clock) as (sched, queue):
        rec = await submit(queue, "alice@example.org", ["x@busy.test"], clock.now)
        delays = []
        for attempt in range(1, 20):
            assert await sched.run_once() == 1
            current = queue.get(rec.qid)
            if current is None:
                break
            (rcpt,) = current.recipients
            assert rcpt.state == "deferred" and rcpt.attempts == attempt
            assert rcpt.last_reply == f"{busy.host}: 450 4.3.0 Error: command failed"
            assert current.attempts == attempt
            delays.append(current.next_attempt - clock.now)
            assert await sched.run_once() == 0  # nothing is due before next_attempt
            clock.now = current.next_attempt
        # 60, 120, 240 doubling with +-10% jitter, then capped at retry_max, and the
        # last wait cut short so the final attempt happens at the expiry time.
        assert 54 <= delays[0] <= 66 and 108 <= delays[1] <= 132 and 216 <= delays[2] <= 264
        assert all(270 <= d <= 300 for d in delays[3:-1])
        assert clock.now == T0 + 1000
        assert sum(delays) == pytest.approx(1000)
        (bounce,) = list(queue.all())
        fields = dsn_fields(parse_message(queue.body(bounce.qid)))
        assert fields[1]["Status"] == "4.4.7"
        assert fields[1]["Action"] == "failed"
        assert fields[1]["Diagnostic-Code"] == "smtp; 450 4.3.0 Error: command failed"
    assert "expired" in [e["event"] for e in events()]


async def test_next_host_after_refused_connection_or_greeting(
    tmp_path: Path, smtp_sink: SinkFactory
) -> None:
    (dead,) = loopback_hosts(1)
    grumpy, sink = smtp_sink(soft=["CONNECT"]), smtp_sink()
    hosts = ((dead, free_port(dead)), (grumpy.host, grumpy.port), (sink.host, sink.port))
    config = make_config(tmp_path, {"example.net": Route(hosts=hosts)})
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, "alice@example.org", ["a@example.net"], time.time())
        await sched.run_once()
        assert queue.count() == 0
    assert sink.wait_for(1)[0].recipients == ["a@example.net"]


async def test_all_hosts_down_defers_with_last_error(tmp_path: Path) -> None:
    (dead,) = loopback_hosts(1)
    config = make_config(tmp_path, {"example.net": Route(hosts=((dead, free_port(dead)),))})
    async with scheduler(tmp_path, config) as (sched, queue):
        rec = await submit(queue, "alice@example.org", ["a@example.net"], time.time())
        await sched.run_once()
        current = queue.get(rec.qid)
        assert current is not None
        assert current.recipients[0].state == "deferred"
        assert current.recipients[0].last_reply.startswith(f"{dead}: 451 4.4.1 connect to")


async def test_mx_from_dns_with_backup(
    tmp_path: Path, smtp_sink: SinkFactory, dns_server: DnsFactory
) -> None:
    dead, live = loopback_hosts(2)
    port = free_port(dead, live)
    sink = smtp_sink(live, port)
    dns = dns_server(
        mx=[("mx.test", "primary.mx.test", 10), ("mx.test", "backup.mx.test", 20)],
        hosts=[("primary.mx.test", dead), ("backup.mx.test", live)],
    )
    config = make_config(tmp_path, {}, dns=dns.address, mx_port=port)
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, "alice@example.org", ["a@mx.test"], time.time())
        await sched.run_once()
        assert queue.count() == 0
    assert sink.wait_for(1)[0].recipients == ["a@mx.test"]


async def test_dns_permanent_failure_bounces(
    tmp_path: Path, smtp_sink: SinkFactory, dns_server: DnsFactory
) -> None:
    home = smtp_sink()
    dns = dns_server(mx=[("null.test", ".", 0)])
    config = make_config(tmp_path, {"example.org": route(home)}, dns=dns.address)
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, "alice@example.org", ["a@null.test", "b@nx.test"], time.time())
        await sched.run_once()
        (bounce,) = list(queue.all())
        fields = dsn_fields(parse_message(queue.body(bounce.qid)))
        assert [f["Status"] for f in fields[1:]] == ["5.1.10", "5.1.2"]
        assert fields[1]["Remote-MTA"] is None


async def test_no_bounce_to_null_sender(
    tmp_path: Path, smtp_sink: SinkFactory, events: Any
) -> None:
    bad, postmaster_box = smtp_sink(hard=["RCPT"]), smtp_sink()
    routes = {"bad.test": route(bad), "mta.test": route(postmaster_box)}
    config = make_config(tmp_path, routes)
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(queue, "", ["x@bad.test"], time.time())
        await submit(queue, "alice@example.org", ["y@bad.test"], time.time(), is_bounce=True)
        await sched.run_once()
        assert queue.count() == 0
    assert [e["event"] for e in events()].count("dropped") == 2

    with_postmaster = make_config(tmp_path / "pm", routes, postmaster="postmaster@mta.test")
    async with scheduler(tmp_path / "pm", with_postmaster) as (sched, queue):
        await submit(queue, "", ["x@bad.test"], time.time())
        await sched.run_once()
        (notice,) = list(queue.all())
        assert notice.is_bounce and notice.recipients[0].address == "postmaster@mta.test"
        await sched.run_once()
        assert queue.count() == 0
    assert postmaster_box.wait_for(1)[0].recipients == ["postmaster@mta.test"]


async def test_connections_are_reused_and_limited(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    a, b = smtp_sink(), smtp_sink()
    config = make_config(tmp_path, {"a.test": route(a), "b.test": route(b)}, max_connections=1)
    async with scheduler(tmp_path, config) as (sched, queue):
        for i in range(4):
            await submit(queue, "alice@example.org", [f"r{i}@a.test"], time.time())
        for i in range(2):
            await submit(queue, "alice@example.org", [f"s{i}@b.test"], time.time())
        await sched.run_once()
        assert queue.count() == 0
        assert sched._pool.peak == 1
        # One connection carried the four messages for a.test (handed from one
        # attempt to the next), and one the two for b.test.
        assert sched.connections_opened == 2
    assert len(a.wait_for(4)) == 4 and len(b.wait_for(2)) == 2


async def test_run_wakes_on_notify(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    config = make_config(tmp_path, {"example.net": route(sink)})
    queue = Queue(tmp_path, durable=False)
    sched = DeliveryScheduler(queue, Router(config), config)
    task = asyncio.create_task(sched.run())
    try:
        await asyncio.sleep(0.05)  # the scheduler is idle: nothing queued
        await submit(queue, "alice@example.org", ["a@example.net"], time.time())
        started = time.monotonic()
        sched.notify()
        for _ in range(500):  # polling the queue: it has no change notification
            if not queue.count():
                break
            await asyncio.sleep(0.01)
        assert queue.count() == 0
        assert time.monotonic() - started < 2
    finally:
        sched.stop()
        await task
        await queue.close()
    assert sink.wait_for(1)[0].recipients == ["a@example.net"]


async def test_run_sleeps_until_next_due_time(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    config = make_config(tmp_path, {"example.net": route(sink)})
    clock = Clock()
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
        await asyncio.sleep(0)

    queue = Queue(tmp_path, durable=False, clock=clock)
    sched = DeliveryScheduler(queue, Router(config, clock), config, clock, fake_sleep)
    await submit(queue, "alice@example.org", ["a@example.net"], clock.now + 500)
    task = asyncio.create_task(sched.run())
    try:
        for _ in range(500):
            if not queue.count():
                break
            await asyncio.sleep(0.01)
        assert queue.count() == 0
        assert slept[0] == pytest.approx(500)
    finally:
        sched.stop()
        await task
        await queue.close()
