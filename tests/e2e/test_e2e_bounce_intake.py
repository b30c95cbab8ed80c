"""End to end: delayed bounces arriving for the gateway's bounce address.

A real `sluice run` relays a message to smtp-sink, so the message has a real queue id in
our Received: header; a report built around that header (as a remote Postfix would send
it, days later) goes back to the bounce address with smtplib; the bounce log must then
hold the right line, with the queue id matched. And the round trip through Sluice's own
bounces: a next hop refuses a recipient, Sluice sends its RFC 3464 report to the
sender, which is the bounce address on this same gateway.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.harness import Sluice, SluiceFactory, route_to, wait_until

if TYPE_CHECKING:
    from tests.conftest import SinkFactory

BOUNCES = "bounces@sluice.test"
QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)\Z")

REPORT = """\
From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)
To: {bounces}
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B0UND"

--B0UND
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.dest.test.

<bob@dest.test>: host mbox.dest.test[192.0.2.26] said: 550 5.1.1 <bob@dest.test>:
    Recipient address rejected: User unknown (in reply to RCPT TO command)

--B0UND
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.dest.test

Final-Recipient: rfc822; bob@dest.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; mbox.dest.test
Diagnostic-Code: smtp; 550 5.1.1 <bob@dest.test>: Recipient address rejected:
    User unknown

--B0UND
Content-Type: text/rfc822-headers

Received: from sink.dest.test ([192.0.2.10]) by mx.dest.test (Postfix) with ESMTP id 4AB
{received}
From: {bounces}
To: bob@dest.test
Subject: hello

--B0UND--
"""


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def bounce_log(server: Sluice) -> list[dict[str, Any]]:
    path = Path(server.data_dir) / "bounces.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def our_received(data: bytes) -> str:
    """The first header field of a message as smtp-sink dumped it (our Received:)."""
    lines = data.decode().split("\n")
    field = [lines[0]]
    for line in lines[1:]:
        if not line[:1].isspace():
            break
        field.append(line)
    assert field[0].startswith("Received:") and "(Sluice)" in "\n".join(field), field
    return "\n".join(field)


def test_delayed_bounce_is_logged_with_the_original_queue_id(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    server = sluice(routes={"dest.test": route_to(sink)}, top={"bounce_addresses": [BOUNCES]})

    # 1. A normal message through Sluice, so there is a real queue id and Received: header.
    with server.smtp() as client:
        client.ehlo()
        client.mail(BOUNCES)
        client.rcpt("bob@dest.test")
        code, reply = client.data(b"From: bounces@sluice.test\r\nSubject: hello\r\n\r\nhi\r\n")
    assert code == 250, reply
    m = QUEUED.match(reply.decode())
    assert m, reply
    qid = m.group(1)
    [relayed] = sink.wait_for(1, timeout=20)
    received = our_received(relayed.data)
    assert qid in received

    # 2. Days later, the report: from <> to the bounce address, plus a copy for a person.
    report = crlf(REPORT.format(bounces=BOUNCES, received=received))
    with server.smtp() as client:
        client.ehlo()
        refused = client.sendmail("", [BOUNCES.upper(), "ops@dest.test"], report)
        assert refused == {}
    [event] = server.wait_event("bounce_received")
    assert event["sender"] == "" and event["original_qids"] == [qid]
    assert event["failed"] == ["bob@dest.test"] and event["classes"] == ["hard"]

    # The 250 came after the line was on disk: it is there now, without waiting.
    [line] = bounce_log(server)
    assert line["original_qid"] == qid
    assert line["original_host"] == "gw.sluice.test"
    assert line["recipient"] == "bob@dest.test"
    assert (line["status"], line["class"], line["reason"]) == ("5.1.1", "hard", "user-unknown")
    assert line["remote_reply"] == (
        "550 5.1.1 <bob@dest.test>: Recipient address rejected: User unknown"
    )
    assert line["remote_mta"] == "mbox.dest.test" and line["format"] == "rfc3464"
    assert line["bounce_id"] == event["qid"] and line["peer"] == "127.0.0.1"

    # 3. The other recipient got the report; the bounce address did not get a copy.
    messages = sink.wait_for(2, timeout=20)
    assert len(messages) == 2
    assert messages[1].recipients == ["ops@dest.test"]
    [accepted] = server.wait_event("accepted", qid=event["qid"])
    assert accepted["recipients"] == ["ops@dest.test"]


def test_our_own_bounce_comes_home(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    """Next hop says 5xx; Sluice's own report goes to the sender, which is this gateway's
    bounce address (routed back to its own listener), and is logged against the qid."""
    rejecting = smtp_sink(hard=["RCPT"])
    server = sluice(
        routes={"dest.test": route_to(rejecting)},
        top={"bounce_addresses": ["bounces+*@sluice.test"]},
        start=False,
    )
    # Route the bounce address's domain to this same server (its port is known only now).
    config = server.config_path.read_text()
    route_home = f'"sluice.test" = ["{server.host}:{server.port}"]\n'
    server.config_path.write_text(config.replace("[routes]\n", "[routes]\n" + route_home, 1))
    server.start()

    with server.smtp() as client:
        client.ehlo()
        client.mail("bounces+tag1@sluice.test")
        client.rcpt("carol@dest.test")
        code, reply = client.data(b"Subject: to be refused\r\n\r\nhi\r\n")
    assert code == 250, reply
    m = QUEUED.match(reply.decode())
    assert m, reply
    qid = m.group(1)

    server.wait_event("bounce_queued", timeout=30)
    [event] = server.wait_event("bounce_received", timeout=30)
    assert event["bounce_to"] == "bounces+tag1@sluice.test"
    assert wait_until(lambda: bounce_log(server), timeout=10)
    [line] = bounce_log(server)
    assert line["original_qid"] == qid
    assert line["recipient"] == "carol@dest.test"
    assert line["class"] == "hard" and line["status"].startswith("5.")
    assert line["remote_reply"].startswith("5")
    assert line["format"] == "rfc3464" and line["bounce_sender"] == ""
