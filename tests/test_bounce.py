"""Tests for appliance.bounce: RFC 3464 reports parsed back with the email package."""

from __future__ import annotations

import re

from appliance.bounce import build_bounce, format_expired, format_reply, parse_reply_record
from appliance.queue import MessageRecord, RecipientRecord
from tests.conftest import decoded_text, mime_parts, parse_message

ORIGINAL = (
    b"Received: from client.example (client.example [192.0.2.9])\r\n"
    b"\tby mta.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"the body\r\n"
    b".leading dot\r\n"
)
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def record(mail_params: list[tuple[str, str | None]] | None = None) -> MessageRecord:
    return MessageRecord(
        qid="QID0000000000000001",
        arrived=NOW - 3600,
        sender="alice@example.org",
        mail_params=mail_params or [],
        recipients=[
            RecipientRecord(
                "bob@example.net",
                # As the listener stores it: xtext decoded ("Bob+2Bx" on the wire).
                [("ORCPT", "rfc822;Bob+x@example.net")],
                state="bounced",
                attempts=1,
                last_reply=format_reply("mx.example.net[127.0.0.2]", 550, "5.1.1", "user unknown"),
                updated=NOW - 10,
            ),
            RecipientRecord(
                "carol@example.com",
                [],
                state="bounced",
                attempts=9,
                last_reply=format_expired(format_reply("127.0.0.3", 451, "4.3.0", "busy")),
                updated=NOW,
            ),
            RecipientRecord(
                "dave@null.example",
                [],
                state="bounced",
                last_reply=format_reply(None, 556, "5.1.10", "domain accepts no mail"),
            ),
        ],
        size=len(ORIGINAL),
    )


def test_reply_record_round_trip() -> None:
    rep = parse_reply_record("::1: 550 5.7.1 go away: now")
    assert (rep.host, rep.code, rep.enhanced, rep.text) == ("::1", 550, "5.7.1", "go away: now")
    assert rep.status == "5.7.1" and not rep.expired
    expired = parse_reply_record(format_expired("h[127.0.0.1]: 421 closing"))
    assert expired.expired and expired.status == "4.4.7" and expired.remote_mta == "h"
    assert parse_reply_record("554 rejected").status == "5.0.0"


def test_bounce_structure_and_fields() -> None:
    rec = record()
    data = build_bounce(rec, rec.recipients, ORIGINAL, "mta.test", NOW)
    # CRLF only and 7-bit.
    assert data.isascii()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")

    msg = parse_message(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mta.test>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Thu, 01 Jan 2026 00:00:00 GMT"
    assert re.fullmatch(r"<[^@<>]+@mta\.test>", msg["Message-ID"])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"

    human, status, headers = mime_parts(msg)
    text = decoded_text(human)
    assert "<bob@example.net>: host mx.example.net[127.0.0.2] said: 550 5.1.1 user unknown" in text
    assert "<carol@example.com>:" in text and "queue lifetime" in text
    assert "<dave@null.example>: 556 5.1.10 domain accepts no mail" in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol, dave = mime_parts(status)
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert per_message["Arrival-Date"] == "Wed, 31 Dec 2025 23:00:00 GMT"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Original-Recipient"] == "rfc822;Bob+x@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"
    assert carol["Status"] == "4.4.7"
    assert carol["Action"] == "failed"
    assert carol["Remote-MTA"] == "dns; 127.0.0.3"
    assert carol["Diagnostic-Code"] == "smtp; 451 4.3.0 busy"
    assert dave["Status"] == "5.1.10"
    assert dave["Remote-MTA"] is None

    assert headers.get_content_type() == "text/rfc822-headers"
    original_headers = decoded_text(headers)
    assert "Subject: hello" in original_headers
    assert "the body" not in original_headers


def test_ret_full_returns_the_whole_message_and_envid() -> None:
    rec = record([("RET", "FULL"), ("ENVID", "abc+1")])
    msg = parse_message(build_bounce(rec, rec.recipients[:1], ORIGINAL, "mta.test", NOW))
    _, status, returned = mime_parts(msg)
    assert mime_parts(status)[0]["Original-Envelope-Id"] == "abc+1"
    assert returned.get_content_type() == "message/rfc822"
    (inner,) = mime_parts(returned)
    assert inner["Subject"] == "hello"
    assert decoded_text(inner) == "the body\r\n.leading dot\r\n"


def test_orcpt_and_envid_are_not_decoded_twice() -> None:
    # A client sent ENVID=id+2B2B7 and ORCPT=rfc822;a+2B2Bb@example.net: the listener
    # stores them decoded, so the literal "+2B" must reach the report unchanged.
    rec = record([("ENVID", "id+2B7")])
    rec.recipients[0].params = [("ORCPT", "rfc822;a+2Bb@example.net")]
    msg = parse_message(build_bounce(rec, rec.recipients[:1], ORIGINAL, "mta.test", NOW))
    per_message, bob = mime_parts(mime_parts(msg)[1])
    assert per_message["Original-Envelope-Id"] == "id+2B7"
    assert bob["Original-Recipient"] == "rfc822;a+2Bb@example.net"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"


def test_non_ascii_content_stays_7bit() -> None:
    rec = record()
    rec.recipients[0].last_reply = format_reply(
        "127.0.0.2", 550, "5.1.1", "Benutzer unbekannt: jürgen"
    )
    original = "Subject: grüße\r\n\r\nkörper\r\n".encode()
    data = build_bounce(rec, rec.recipients[:1], original, "mta.test", NOW)
    assert data.isascii()
    msg = parse_message(data)
    human, status, headers = mime_parts(msg)
    assert "jürgen" in decoded_text(human)
    assert (
        mime_parts(status)[1]["Diagnostic-Code"]
        == "smtp; 550 5.1.1 Benutzer unbekannt: j\\x{FC}rgen"
    )
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert decoded_text(headers) == "Subject: grüße\r\n"


def test_bounce_to_postmaster() -> None:
    rec = record()
    rec.sender = ""
    msg = parse_message(
        build_bounce(rec, rec.recipients[:1], ORIGINAL, "mta.test", NOW, to="pm@mta.test")
    )
    assert msg["To"] == "<pm@mta.test>"
