"""End to end: next hops that refuse mail. Bounces (RFC 3464), deferral and retry,
and the rule that mail from <> is never bounced (RFC 5321 4.5.5, RFC 3464 2)."""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import re
import smtplib
import time
from typing import TYPE_CHECKING

from tests.e2e.harness import Sluice, SluiceFactory, route_to, wait_until
from tests.netutil import free_port, loopback_hosts

# What `smtp-sink -f RCPT` (hard) / `-r RCPT` (soft) answer to RCPT TO.
SINK_HARD_REPLY = "5.3.0 Error: command failed"
SINK_SOFT_REPLY = "4.3.0 Error: command failed"

if TYPE_CHECKING:
    from tests.conftest import SinkFactory


def send(server: Sluice, sender: str, rcpts: list[str], body: bytes) -> str:
    with server.smtp() as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(body)
    assert code == 250, reply
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", reply)
    assert m, reply
    return m.group(1).decode()


def wait_queue_empty(server: Sluice, timeout: float = 20.0) -> None:
    assert wait_until(lambda: server.queue_json() == [], timeout=timeout), server.queue_json()


def recipient_blocks(report: email.message.EmailMessage) -> list[email.message.Message]:
    """The per-recipient field blocks of the message/delivery-status part."""
    [status] = [p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    assert blocks[0]["Reporting-MTA"] is not None  # the per-message block comes first
    return blocks[1:]


def check_bounce(
    data: bytes, to: str, failed: list[str], original_subject: str
) -> email.message.EmailMessage:
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(report, email.message.EmailMessage)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert to in str(report["To"])
    kinds = [p.get_content_type() for p in report.iter_parts()]
    assert kinds[0] == "text/plain" and kinds[1] == "message/delivery-status", kinds
    assert kinds[2] in ("text/rfc822-headers", "message/rfc822"), kinds

    blocks = recipient_blocks(report)
    finals = [str(b["Final-Recipient"]) for b in blocks]
    assert sorted(finals) == sorted(f"rfc822; {a}" for a in failed)
    for block in blocks:
        assert str(block["Action"]).strip() == "failed"
        assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", str(block["Status"]).strip()), block["Status"]
        diagnostic = str(block["Diagnostic-Code"])
        assert diagnostic.startswith("smtp;"), diagnostic
        assert "500" in diagnostic and SINK_HARD_REPLY in diagnostic, diagnostic
    # The third part gives the original's headers back to the sender.
    assert f"Subject: {original_subject}" in str(report.get_payload()[2])
    return report


def test_rejected_recipient_gets_one_rfc3464_bounce(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    rejecting = smtp_sink(hard=["RCPT"])
    accepting = smtp_sink()
    senders_mx = smtp_sink()
    server = sluice(
        routes={
            "bad.test": route_to(rejecting),
            "good.test": route_to(accepting),
            "src.test": route_to(senders_mx),
        }
    )
    qid = send(
        server,
        "alice@src.test",
        ["bob@bad.test", "carol@good.test"],
        b"Subject: will bounce\r\nMessage-ID: <b1@src.test>\r\n\r\nhello\r\n",
    )
    [bounce] = senders_mx.wait_for(1, timeout=20)
    wait_queue_empty(server)
    time.sleep(0.3)  # a second bounce would have been queued with the first
    assert len(senders_mx.messages()) == 1
    assert bounce.sender == ""  # from <>
    assert bounce.recipients == ["alice@src.test"]
    report = check_bounce(bounce.data, "alice@src.test", ["bob@bad.test"], "will bounce")
    assert (
        f"X-Sluice-Queue-ID: {qid}" in str(report.get_payload()[1]) or qid in bounce.data.decode()
    )
    # The good recipient was delivered, and only it.
    [delivered] = accepting.wait_for(1, timeout=20)
    assert delivered.recipients == ["carol@good.test"]
    [queued] = server.events("bounce_queued")
    assert queued["qid"] == qid and queued["recipients"] == ["bob@bad.test"]
    assert [e["recipient"] for e in server.events("bounced", qid=qid)] == ["bob@bad.test"]


def test_two_failed_recipients_one_bounce(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    rejecting = smtp_sink(hard=["RCPT"])
    senders_mx = smtp_sink()
    server = sluice(routes={"bad.test": route_to(rejecting), "src.test": route_to(senders_mx)})
    qid = send(
        server,
        "alice@src.test",
        ["bob@bad.test", "dave@bad.test"],
        b"Subject: two bounce\r\n\r\nhello\r\n",
    )
    [bounce] = senders_mx.wait_for(1, timeout=20)
    wait_queue_empty(server)
    time.sleep(0.3)
    assert len(senders_mx.messages()) == 1
    assert bounce.sender == "" and bounce.recipients == ["alice@src.test"]
    check_bounce(bounce.data, "alice@src.test", ["bob@bad.test", "dave@bad.test"], "two bounce")
    [queued] = server.events("bounce_queued")
    assert queued["qid"] == qid
    assert sorted(queued["recipients"]) == ["bob@bad.test", "dave@bad.test"]


def _queue_text_rows(text: str) -> list[dict[str, str]]:
    """Parse the recipient lines of `sluice queue`: address, state, attempts, reply."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s+(\S+)\s+(\S+)\s+attempts=(\d+)\s+next=(\S+)\s*(.*)$", line)
        if m:
            rows.append(
                {
                    "address": m.group(1),
                    "state": m.group(2),
                    "attempts": m.group(3),
                    "last_reply": m.group(5),
                }
            )
    return rows


def test_deferred_then_delivered_on_retry(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    deferring = smtp_sink(soft=["RCPT"])
    server = sluice(
        routes={"later.test": route_to(deferring)},
        delivery={"retry_initial": "2s", "retry_max": "2s"},
    )
    qid = send(server, "alice@src.test", ["bob@later.test"], b"Subject: later\r\n\r\nretry me\r\n")
    [deferred] = server.wait_event("deferred", qid=qid)
    assert SINK_SOFT_REPLY in deferred["reply"]

    # The table and the JSON describe the same state (read again if a retry slipped in
    # between the two reads).
    for _ in range(5):
        table = server.cli("queue", "--config", str(server.config_path))
        listing = server.cli("queue", "--config", str(server.config_path), "--json")
        assert table.returncode == 0 and listing.returncode == 0, table.stderr + listing.stderr
        rows = json.loads(listing.stdout)
        text_rows = _queue_text_rows(table.stdout)
        if (
            text_rows
            and rows
            and str(rows[0]["recipients"][0]["attempts"]) == text_rows[0]["attempts"]
        ):
            break
    assert qid in table.stdout and "<alice@src.test>" in table.stdout
    [text_row] = text_rows
    assert text_row["address"] == "bob@later.test"
    assert text_row["state"] == "deferred"
    assert SINK_SOFT_REPLY in text_row["last_reply"] and "450" in text_row["last_reply"]

    [row] = rows
    assert row["qid"] == qid and row["sender"] == "alice@src.test"
    [rcpt] = row["recipients"]
    assert rcpt["address"] == "bob@later.test"
    assert rcpt["state"] == "deferred"
    assert rcpt["attempts"] >= 1
    assert rcpt["last_reply"] == text_row["last_reply"]
    assert str(rcpt["attempts"]) == text_row["attempts"]

    # The next hop recovers: same address and port, now accepting.
    deferring.proc.terminate()
    deferring.proc.wait(timeout=10)
    before = len(deferring.messages())
    accepting = smtp_sink(host=deferring.host, port=deferring.port)
    [delivered] = server.wait_event("delivered", qid=qid, timeout=30)
    assert delivered["recipient"] == "bob@later.test"
    received = accepting.wait_for(before + 1, timeout=20)
    assert [m.recipients for m in received[before:]] == [["bob@later.test"]]
    wait_queue_empty(server)
    assert server.events("bounce_queued") == []


def test_null_sender_is_never_bounced(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    rejecting = smtp_sink(hard=["RCPT"])
    everything_else = smtp_sink()  # a bounce to anyone (even the postmaster) lands here
    server = sluice(routes={"bad.test": route_to(rejecting), "*": route_to(everything_else)})
    qid = send(server, "", ["bob@bad.test"], b"Subject: a notification\r\n\r\nfrom <>\r\n")
    [dropped] = server.wait_event("dropped", qid=qid)
    assert dropped["recipients"] == ["bob@bad.test"]
    wait_queue_empty(server)
    time.sleep(0.3)
    assert server.events("bounce_queued") == []
    assert everything_else.messages() == []


def test_failed_bounce_is_dropped_not_bounced(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    """Our own bounce fails permanently too: logged as dropped, no bounce of the bounce."""
    rejecting = smtp_sink(hard=["RCPT"])
    everything_else = smtp_sink()
    server = sluice(
        routes={
            "bad.test": route_to(rejecting),
            "src.test": route_to(rejecting),
            "*": route_to(everything_else),
        }
    )
    qid = send(server, "alice@src.test", ["bob@bad.test"], b"Subject: doomed\r\n\r\nx\r\n")
    [queued] = server.wait_event("bounce_queued", qid=qid)
    [dropped] = server.wait_event("dropped", qid=queued["bounce_qid"])
    assert dropped["recipients"] == ["alice@src.test"]
    wait_queue_empty(server)
    time.sleep(0.3)
    assert len(server.events("bounce_queued")) == 1
    assert everything_else.messages() == []


def test_still_deferred_at_max_queue_time_bounces_as_expired(
    sluice: SluiceFactory, smtp_sink
) -> None:
    deferring = smtp_sink(soft=["RCPT"])
    senders_mx = smtp_sink()
    server = sluice(
        routes={"later.test": route_to(deferring), "src.test": route_to(senders_mx)},
        top={"max_queue_time": "3s"},
    )
    qid = send(server, "alice@src.test", ["bob@later.test"], b"Subject: too late\r\n\r\nx\r\n")
    [bounce] = senders_mx.wait_for(1, timeout=20)
    assert server.events("expired", qid=qid)
    assert bounce.sender == "" and bounce.recipients == ["alice@src.test"]
    report = email.message_from_bytes(bounce.data, policy=email.policy.default)
    assert isinstance(report, email.message.EmailMessage)
    assert report.get_param("report-type") == "delivery-status"
    [block] = recipient_blocks(report)
    assert str(block["Final-Recipient"]) == "rfc822; bob@later.test"
    assert str(block["Action"]) == "failed"
    assert str(block["Status"]) == "4.4.7"  # RFC 3463: delivery time expired
    assert SINK_SOFT_REPLY in str(block["Diagnostic-Code"])  # the last reply we got
    wait_queue_empty(server)


def test_deferred_mail_keeps_being_retried_without_new_mail(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    """Many messages deferred together are retried round after round on their own.

    Regression: the scheduler used to wait for a wake-up alone when the earliest retry
    fell due between its look at the queue and its wait, so after one retry round of a
    larger batch nothing more happened until new mail arrived.
    """
    [down_host] = loopback_hosts(1)
    server = sluice(
        routes={"down.test": [f"{down_host}:{free_port(down_host)}"]},
        delivery={"retry_initial": "1s", "retry_max": "1s"},
        destinations={"*": {"pause_after": 1000}},
    )
    count = 60
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        for n in range(count):
            client.sendmail("a@src.test", [f"r{n}@down.test"], b"Subject: x\r\n\r\nbody\r\n")

    # Every message should be tried at least four times within a few seconds; count the
    # attempts per queue id from the event log.
    def attempts_per_message() -> dict[str, int]:
        seen: dict[str, int] = {}
        for event in server.events("deferred"):
            seen[event["qid"]] = seen.get(event["qid"], 0) + 1
        return seen

    assert wait_until(
        lambda: len(attempts_per_message()) == count and min(attempts_per_message().values()) >= 4,
        timeout=40,
    ), sorted(attempts_per_message().values())
