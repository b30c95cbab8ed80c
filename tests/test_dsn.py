"""RFC 3461 NOTIFY handling and the DSNs it produces, each parsed back with `email`.

- NOTIFY=NEVER (or a NOTIFY without FAILURE) suppresses the failure report for that
  recipient; the others of the message still get one report together.
- NOTIFY=SUCCESS: a next hop without DSN gets the mail and the sender an Action: relayed
  report; a next hop with DSN gets NOTIFY/ORCPT/RET/ENVID passed on (xtext-encoded again)
  and reports success itself, so no report is made here (RFC 3461 5.2.2).
- NOTIFY=DELAY (or no NOTIFY) and the bounce profile's delay_warning: one Action:
  delayed report per message, with Will-Retry-Until.
- ENVID and ORCPT come back as Original-Envelope-Id and Original-Recipient.
"""

from __future__ import annotations

import email.utils
import time
from email.message import Message
from pathlib import Path
from typing import Any

from appliance.config import BounceProfile
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id
from tests.conftest import SinkFactory, decoded_text, dsn_fields, mime_parts, parse_message
from tests.delivery_support import T0, Clock, hop, make_config, scheduler
from tests.smtp_recorder import start_recorder

BODY = b"Subject: report me\r\nFrom: alice@example.org\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"


async def submit(
    queue: Queue,
    rcpts: list[tuple[str, list[tuple[str, str | None]]]],
    arrived: float,
    mail_params: list[tuple[str, str | None]] | None = None,
) -> MessageRecord:
    record = MessageRecord(
        qid=new_queue_id(),
        arrived=arrived,
        sender="alice@example.org",
        mail_params=mail_params or [],
        recipients=[RecipientRecord(a, p) for a, p in rcpts],
        size=len(BODY),
        next_attempt=arrived,
    )
    await queue.submit(record, BODY)
    return record


def reports(queue: Queue) -> list[tuple[MessageRecord, Message]]:
    return [(m, parse_message(queue.body(m.qid))) for m in queue.all() if m.is_bounce]


async def test_notify_never_suppresses_only_that_recipients_failure_report(
    tmp_path: Path, smtp_sink: SinkFactory, events: Any
) -> None:
    bad = smtp_sink(hard=["RCPT"])
    config = make_config(tmp_path, {"bad.test": hop(bad.host, bad.port)})
    async with scheduler(tmp_path, config) as (sched, queue):
        await submit(
            queue,
            [
                ("never@bad.test", [("NOTIFY", "NEVER")]),
                ("fail@bad.test", [("NOTIFY", "FAILURE")]),
                ("plain@bad.test", []),
                ("quiet@bad.test", [("NOTIFY", "SUCCESS,DELAY")]),
            ],
            time.time(),
        )
        await sched.run_once()
        (report,) = reports(queue)
        record, msg = report
    assert record.sender == "" and record.recipients[0].address == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    fields = dsn_fields(msg)
    assert [f["Final-Recipient"] for f in fields[1:]] == [
        "rfc822; fail@bad.test",
        "rfc822; plain@bad.test",
    ]
    assert all(f["Action"] == "failed" for f in fields[1:])
    (quiet,) = events("dsn_suppressed")
    assert quiet["recipients"] == ["never@bad.test", "quiet@bad.test"]


async def test_notify_success_to_a_hop_without_dsn_gives_a_relayed_report(
    tmp_path: Path,
) -> None:
    rec = await start_recorder()  # PIPELINING and 8BITMIME, no DSN
    config = make_config(tmp_path, {"example.net": hop(rec.host, rec.port)})
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            await submit(
                queue,
                [
                    (
                        "a@example.net",
                        [("NOTIFY", "SUCCESS"), ("ORCPT", "rfc822;Orig@example.net")],
                    ),
                    ("b@example.net", [("NOTIFY", "FAILURE")]),
                    ("c@example.net", []),
                ],
                time.time(),
                [("ENVID", "env-42"), ("RET", "FULL")],
            )
            await sched.run_once()
            (report,) = reports(queue)
            _, msg = report
    finally:
        await rec.stop()
    # The next hop saw no DSN parameters: it did not offer DSN.
    (t,) = rec.transactions
    assert t.mail == "MAIL FROM:<alice@example.org>"
    assert t.rcpts == [f"RCPT TO:<{x}@example.net>" for x in "abc"]

    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mta.test>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, _, original = mime_parts(msg)
    assert "relayed to" in decoded_text(human) and "<a@example.net>" in decoded_text(human)
    per_message, per_rcpt = dsn_fields(msg)
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert per_rcpt["Original-Recipient"] == "rfc822;Orig@example.net"
    assert per_rcpt["Final-Recipient"] == "rfc822; a@example.net"
    assert per_rcpt["Action"] == "relayed"
    assert per_rcpt["Status"] == "2.0.0"
    assert per_rcpt["Remote-MTA"] == f"dns; {rec.host}"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 250 2.0.0 queued"
    # RET=FULL applies to failure reports only: a success report carries the headers.
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: report me" in decoded_text(original)


async def test_dsn_parameters_are_passed_on_to_a_hop_that_offers_dsn(tmp_path: Path) -> None:
    rec = await start_recorder(extensions=("PIPELINING", "8BITMIME", "DSN"))
    config = make_config(tmp_path, {"example.net": hop(rec.host, rec.port)})
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            await submit(
                queue,
                [
                    (
                        "a@example.net",
                        [("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;o+1=x@example.net")],
                    ),
                    ("b@example.net", [("NOTIFY", "NEVER")]),
                ],
                time.time(),
                [("RET", "HDRS"), ("ENVID", "a+b=c")],
            )
            await sched.run_once()
            assert queue.count() == 0  # delivered, and no report of our own
    finally:
        await rec.stop()
    (t,) = rec.transactions
    assert t.mail == "MAIL FROM:<alice@example.org> RET=HDRS ENVID=a+2Bb+3Dc"
    assert t.rcpts == [
        "RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o+2B1+3Dx@example.net",
        "RCPT TO:<b@example.net> NOTIFY=NEVER",
    ]


async def test_delay_warning_once_per_message_for_those_who_asked(
    tmp_path: Path, smtp_sink: SinkFactory
) -> None:
    busy = smtp_sink(soft=["RCPT"])
    profiles = {
        "default": BounceProfile(
            retry_initial=60, retry_max=60, max_queue_time=1000, delay_warning=100
        )
    }
    config = make_config(tmp_path, {"busy.test": hop(busy.host, busy.port)}, profiles=profiles)
    clock = Clock()
    async with scheduler(tmp_path, config, clock) as (sched, queue):
        msg = await submit(
            queue,
            [
                ("d1@busy.test", [("NOTIFY", "DELAY,FAILURE"), ("ORCPT", "rfc822;d1@busy.test")]),
                ("d2@busy.test", [("NOTIFY", "FAILURE")]),
                ("d3@busy.test", []),
            ],
            clock.now,
            [("ENVID", "E1")],
        )
        seen: list[int] = []
        for _ in range(6):
            await sched.run_once()
            seen.append(len(reports(queue)))
            current = queue.get(msg.qid)
            assert current is not None
            clock.now = current.next_attempt
        # No report before 100 s, exactly one after, never a second one.
        assert seen[0] == 0 and seen[-1] == 1
        assert current.delay_warned
        ((_, report),) = reports(queue)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    per_message, *per_rcpt = dsn_fields(report)
    assert per_message["Original-Envelope-Id"] == "E1"
    assert [f["Final-Recipient"] for f in per_rcpt] == [
        "rfc822; d1@busy.test",
        "rfc822; d3@busy.test",
    ]
    first = per_rcpt[0]
    assert first["Original-Recipient"] == "rfc822;d1@busy.test"
    assert first["Action"] == "delayed"
    assert first["Status"] == "4.3.0"
    assert first["Diagnostic-Code"] == "smtp; 450 4.3.0 Error: command failed"
    assert first["Will-Retry-Until"] == email.utils.formatdate(T0 + 1000, usegmt=True)
    assert per_rcpt[1].get("Original-Recipient") is None
    human = decoded_text(mime_parts(report)[0])
    assert "you do not need to send it again" in human


async def test_no_delay_warning_without_delay_warning_or_for_null_sender(
    tmp_path: Path, smtp_sink: SinkFactory
) -> None:
    busy = smtp_sink(soft=["RCPT"])
    config = make_config(tmp_path, {"busy.test": hop(busy.host, busy.port)})
    clock = Clock()
    async with scheduler(tmp_path, config, clock) as (sched, queue):
        msg = await submit(queue, [("x@busy.test", [("NOTIFY", "DELAY")])], clock.now)
        for _ in range(5):
            await sched.run_once()
            current = queue.get(msg.qid)
            assert current is not None
            clock.now = current.next_attempt
        assert reports(queue) == []


async def test_orcpt_and_envid_are_xtext_encoded_once_on_the_way_out(tmp_path: Path) -> None:
    # The queue keeps ORCPT and ENVID decoded, as the listener stores them. "a+b" goes
    # out as "a+2Bb"; an address with a literal "+2B" (sent to us as "+2B2B") goes out
    # as "+2B2B" again, so the next hop decodes exactly what the sender wrote.
    rec = await start_recorder(extensions=("PIPELINING", "8BITMIME", "DSN"))
    config = make_config(tmp_path, {"x": hop(rec.host, rec.port)})
    try:
        async with scheduler(tmp_path, config) as (sched, queue):
            await submit(
                queue,
                [
                    ("one@x", [("NOTIFY", "SUCCESS"), ("ORCPT", "rfc822;a+b@x")]),
                    ("two@x", [("NOTIFY", "FAILURE"), ("ORCPT", "rfc822;a+2Bb@x")]),
                ],
                time.time(),
                [("ENVID", "q+2B1 2")],
            )
            await sched.run_once()
            assert queue.count() == 0
    finally:
        await rec.stop()
    (t,) = rec.transactions
    assert t.mail == "MAIL FROM:<alice@example.org> ENVID=q+2B2B1+202"
    assert t.rcpts == [
        "RCPT TO:<one@x> NOTIFY=SUCCESS ORCPT=rfc822;a+2Bb@x",
        "RCPT TO:<two@x> NOTIFY=FAILURE ORCPT=rfc822;a+2B2Bb@x",
    ]
