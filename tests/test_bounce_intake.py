"""Tests for appliance.bounce_intake: incoming bounces parsed, classified and logged.

The samples under tests/data/bounces/ are hand-written in the shape of each format (none
is a real bounce). Each is read with CRLF line ends, as the listener hands it over, and
also with bare LF, which must not change the answer.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.bounce import build_bounce, format_expired, format_reply
from appliance.bounce_intake import (
    UNKNOWN_BOUNCE,
    Bounce,
    BounceAddresses,
    BounceIntake,
    BounceLog,
    classify,
    parse_bounce,
    status_from_reply,
)
from appliance.config import ConfigError, _build, default_config
from appliance.inbound import MessageAcceptor
from appliance.policy import Verdict
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id

DATA = Path(__file__).parent / "data" / "bounces"
HOST = "gw.sluice.test"


def sample(name: str, crlf: bool = True) -> bytes:
    data = (DATA / name).read_bytes()
    return data.replace(b"\n", b"\r\n") if crlf else data


# name -> the expected records: (recipient, status, class, reason, remote reply, format,
# original qid, remote MTA, action)
EXPECTED: dict[str, list[tuple[Any, ...]]] = {
    "postfix_dsn.eml": [
        (
            "bob@dest.test",
            "5.1.1",
            "hard",
            "user-unknown",
            "550 5.1.1 <bob@dest.test>: Recipient address rejected: User unknown in virtual "
            "mailbox table",
            "rfc3464",
            "0Ya1Bc2De3Fg4Hi5Jk",
            "mbox.dest.test",
            "failed",
        )
    ],
    "sendmail_dsn_multi.eml": [
        (
            "carol@dest.test",
            "5.7.1",
            "hard",
            "policy",
            "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using "
            "zen.spamhaus.example",
            "rfc3464",
            "0Yb2Cd3Ef4Gh5Ij6Kl",
            "in.dest.test",
            "failed",
        ),
        (
            "dan@dest.test",
            "4.2.2",
            "soft",
            "mailbox-full",
            "452 4.2.2 Mailbox full",
            "rfc3464",
            "0Yb2Cd3Ef4Gh5Ij6Kl",
            "in.dest.test",
            "delayed",
        ),
    ],
    "dsn_base64.eml": [
        (
            "sam@b64.dest.test",
            "5.2.2",
            "hard",
            "mailbox-full",
            "552 5.2.2 Mailbox full",
            "rfc3464",
            None,
            None,
            "failed",
        )
    ],
    "postfix_text.eml": [
        (
            "frank@dest.test",
            "5.2.2",
            "hard",
            "mailbox-full",
            "552 5.2.2 <frank@dest.test>: Recipient address rejected: Mailbox is over quota",
            "postfix",
            "0Yc3De4Fg5Hi6Jk7Lm",
            "store.dest.test",
            "failed",
        )
    ],
    "exim_failed.eml": [
        (
            "gina@dest.test",
            "5.1.1",
            "hard",
            "user-unknown",
            "550 5.1.1 <gina@dest.test>: Recipient address rejected: User unknown in local "
            "recipient table",
            "exim",
            "0Yd4Ef5Gh6Ij7Kl8Mn",
            "mx2.dest.test",
            "failed",
        )
    ],
    "exim_delay.eml": [
        (
            "ivan@dest.test",
            "4.7.1",
            "soft",
            "policy",
            "451 4.7.1 Greylisting in action, please come back later",
            "exim",
            None,
            "mx.partner.test",
            "delayed",
        )
    ],
    "exchange_2010.eml": [
        (
            "jane@corp.dest.test",
            "5.1.1",
            "hard",
            "user-unknown",
            "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
            "exchange",
            "0Ye5Fg6Hi7Jk8Lm9No",
            None,
            "failed",
        )
    ],
    "exchange_remote.eml": [
        (
            "kim@partner.test",
            "5.3.4",
            "hard",
            "message-too-large",
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "exchange",
            "0Yf6Gh7Ij8Kl9MnAOp",
            None,
            "failed",
        )
    ],
    "office365.eml": [
        (
            "luis@contoso.dest.test",
            "5.1.10",
            "hard",
            "user-unknown",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient luis@contoso.dest.test not "
            "found by SMTP address lookup",
            "exchange",
            "0Yg7Hi8Jk9LmANoBPq",
            None,
            "failed",
        )
    ],
    "qmail.eml": [
        (
            "mike@qdest.test",
            "5.1.1",
            "hard",
            "user-unknown",
            "Sorry, no mailbox here by that name. (#5.1.1)",
            "qmail",
            "0Yh8Ij9KlAMnBOpCQr",
            None,
            "failed",
        ),
        (
            "nina@partner.test",
            "5.7.1",
            "hard",
            "policy",
            "554 5.7.1 Message rejected as spam by content filter",
            "qmail",
            "0Yh8Ij9KlAMnBOpCQr",
            "192.0.2.35",
            "failed",
        ),
    ],
    "sendmail_old.eml": [
        (
            "oscar@nowhere.dest.test",
            "5.1.2",
            "hard",
            "domain",
            "550 5.1.2 <oscar@nowhere.dest.test>... Host unknown (Name server: "
            "nowhere.dest.test: host not found)",
            "sendmail",
            "0Yi9JkALmBNoCPqDRs",
            None,
            "failed",
        )
    ],
    "sendmail_warning.eml": [
        (
            "paula@slow.dest.test",
            "",
            "soft",
            "network",
            "<paula@slow.dest.test>... Deferred: Connection timed out with mx.slow.dest.test.",
            "sendmail",
            None,
            None,
            "delayed",
        )
    ],
    "smtp_reply.eml": [
        (
            "quentin@dest.test",
            "5.1.1",
            "hard",
            "user-unknown",
            "550 5.1.1 <quentin@dest.test>: user unknown",
            "smtp-reply",
            None,
            None,
            "",
        )
    ],
    "autoreply.eml": [(None, "", "unknown", "unknown", "", "unknown", None, None, "")],
}


def summary(b: Bounce) -> tuple[Any, ...]:
    return (
        b.recipient,
        b.status,
        b.bounce_class,
        b.reason,
        b.remote_reply,
        b.format,
        b.original_qid,
        b.remote_mta,
        b.action,
    )


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str) -> None:
    got = [summary(b) for b in parse_bounce(sample(name), HOST)]
    assert got == EXPECTED[name]
    # Bare LF line ends (a report saved from a Unix mailbox) read the same.
    assert [summary(b) for b in parse_bounce(sample(name, crlf=False), HOST)] == got


def test_original_recipients() -> None:
    (postfix,) = parse_bounce(sample("postfix_dsn.eml"), HOST)
    assert postfix.original_recipient == "Bob@dest.test"
    (expanded,) = parse_bounce(sample("postfix_text.eml"), HOST)
    assert expanded.original_recipient == "sales@dest.test"


def test_report_trace_headers_are_not_the_original() -> None:
    # sendmail_dsn_multi.eml passed one of our gateways on its way back: that Received:
    # header is the report's, not the returned message's, and must not be matched.
    data = sample("sendmail_dsn_multi.eml")
    assert b"0YzzzzzzzzNOTTHIS1" in data
    assert {b.original_qid for b in parse_bounce(data, HOST)} == {"0Yb2Cd3Ef4Gh5Ij6Kl"}


def test_our_hostname_preferred_among_several_sluice_hops() -> None:
    headers = (
        b"Received: from a ([192.0.2.1])\r\n\tby edge.other.test (Sluice)\r\n"
        b"\twith ESMTP id 0AAAAAAAAAAAAAAAAA;\r\n\tMon, 1 Jan 2024 00:00:01 +0000\r\n"
        b"Received: from b ([192.0.2.2])\r\n\tby gw.sluice.test (Sluice)\r\n"
        b"\twith ESMTP id 0BBBBBBBBBBBBBBBBB;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
    )
    report = (
        b"From: MAILER-DAEMON@x.test\r\nSubject: failure\r\n\r\n"
        b"550 5.1.1 <a@x.test>: user unknown\r\n\r\n"
        b"------ This is a copy of the message, including all the headers. ------\r\n" + headers
    )
    (b,) = parse_bounce(report, HOST)
    assert (b.original_qid, b.original_host) == ("0BBBBBBBBBBBBBBBBB", "gw.sluice.test")
    (other,) = parse_bounce(report, "elsewhere.test")
    assert (other.original_qid, other.original_host) == ("0AAAAAAAAAAAAAAAAA", "edge.other.test")


def test_our_own_bounces_are_read() -> None:
    """A report built by appliance/bounce.py (RET=HDRS: the headers, with our Received:)."""
    qid = "0Yj1Kl2Mn3Op4Qr5St"
    # Our Received: header as the listener writes it (smtp_proto::trace).
    original = (
        f"Received: from app.sluice.test ([192.0.2.40])\r\n\tby {HOST} (Sluice)\r\n"
        f"\twith ESMTP id {qid}\r\n\tfor <x@dest.test>;\r\n"
        "\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        "From: a@sluice.test\r\nSubject: s\r\n\r\nbody\r\n"
    ).encode()
    record = MessageRecord(
        qid=qid,
        arrived=1_700_000_000.0,
        sender="bounces@sluice.test",
        mail_params=[],
        recipients=[
            RecipientRecord(
                "x@dest.test",
                [],
                state="bounced",
                last_reply=format_reply("mx.dest.test[192.0.2.25]", 550, "5.1.1", "no such user"),
            ),
            RecipientRecord(
                "y@dest.test",
                [],
                state="bounced",
                last_reply=format_expired(format_reply("192.0.2.25", 421, "4.4.2", "timeout")),
            ),
        ],
        size=len(original),
    )
    report = build_bounce(record, record.recipients, original, "other-gw.test", 1_700_000_100.0)
    got = parse_bounce(report, HOST)
    assert [summary(b) for b in got] == [
        (
            "x@dest.test",
            "5.1.1",
            "hard",
            "user-unknown",
            "550 5.1.1 no such user",
            "rfc3464",
            qid,
            "mx.dest.test",
            "failed",
        ),
        (
            "y@dest.test",
            "4.4.7",
            "soft",
            "network",
            "421 4.4.2 timeout",
            "rfc3464",
            qid,
            "192.0.2.25",
            "failed",
        ),
    ]


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        ("5.1.1", "", ("hard", "user-unknown")),
        ("5.1.0", "", ("hard", "user-unknown")),
        ("", "550 no such user here", ("hard", "user-unknown")),
        ("5.0.0", "550 Unknown user", ("hard", "user-unknown")),
        ("", "550 mailbox does not exist", ("hard", "user-unknown")),
        ("4.2.2", "", ("soft", "mailbox-full")),
        ("5.2.2", "", ("hard", "mailbox-full")),
        ("", "452 Quota exceeded", ("soft", "mailbox-full")),
        ("5.7.1", "", ("hard", "policy")),
        ("5.7.26", "", ("hard", "policy")),
        ("", "554 Message blocked as spam", ("hard", "policy")),
        ("5.1.2", "", ("hard", "domain")),
        ("", "550 Host not found", ("hard", "domain")),
        ("5.4.4", "", ("hard", "domain")),
        ("5.1.10", "556 5.1.10 domain has null MX", ("hard", "domain")),
        ("5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", ("hard", "user-unknown")),
        ("5.3.4", "", ("hard", "message-too-large")),
        ("5.2.3", "", ("hard", "message-too-large")),
        ("4.4.1", "", ("soft", "network")),
        ("4.4.7", "", ("soft", "network")),
        ("", "421 Connection timed out", ("soft", "network")),
        ("5.5.2", "500 syntax error", ("hard", "other")),
        ("4.0.0", "", ("soft", "other")),
        ("", "", ("unknown", "unknown")),
        ("", "something odd", ("unknown", "unknown")),
    ],
)
def test_classify(status: str, reply: str, expected: tuple[str, str]) -> None:
    assert classify(status, reply) == expected


def test_classify_hints() -> None:
    assert classify("", "Unrouteable address", hint="hard") == ("hard", "domain")
    assert classify("", "", action="delayed") == ("soft", "unknown")
    assert classify("", "strange words", action="failed") == ("hard", "other")


def test_status_from_reply() -> None:
    assert status_from_reply("550 5.1.1 <a@b>: no") == "5.1.1"
    assert status_from_reply("550-5.7.26 unauthenticated") == "5.7.26"
    assert status_from_reply("452 mailbox full") == "4.0.0"
    assert status_from_reply("Sorry (#5.1.1)") == "5.1.1"
    assert status_from_reply("host 192.0.2.5 said no") == ""


def test_success_only_report_records_nothing() -> None:
    report = (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; a.test\r\n\r\n"
        b"Final-Recipient: rfc822; a@b.test\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n"
        b"--B--\r\n"
    )
    assert parse_bounce(report, HOST) == []


# A format none of our readers knows, but flufl.bounce does (an old sdm.de style list).
FLUFL_ONLY = (
    b"From: postmaster@x.test\r\nSubject: Returned mail\r\n\r\n"
    b"Here is your list of failed recipients:\r\n"
    + b"".join(f"<user{i}@dest.test>\r\n".encode() for i in range(12))
    + b"\r\nHere is your returned mail.\r\n"
)


def test_flufl_bounce_is_the_last_resort() -> None:
    got = parse_bounce(FLUFL_ONLY, HOST)
    assert [b.recipient for b in got] == sorted(f"user{i}@dest.test" for i in range(12))
    assert {(b.format, b.bounce_class, b.reason, b.status) for b in got} == {
        ("flufl.bounce", "hard", "unknown", "")
    }


# -- never crash, always the same answer --------------------------------------------------


def _mangle(rng: random.Random, data: bytes) -> bytes:
    """One random damage: flipped, cut, repeated, inserted or deleted bytes, lost line
    ends, or a hostile structure spliced in."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.randrange(9)
        pos = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif choice == 1:
            del out[pos:]
        elif choice == 2:
            end = min(len(out), pos + rng.randint(1, 400))
            out[pos:pos] = out[pos:end] * rng.randint(1, 5)
        elif choice == 3:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))
        elif choice == 4:
            del out[pos : pos + rng.randint(1, 200)]
        elif choice == 5:
            out = bytearray(bytes(out).replace(b"\r\n", rng.choice([b"\n", b"\r", b" ", b""])))
        elif choice == 6:
            out[pos:pos] = rng.choice(
                [
                    b"\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n",
                    b"\r\nContent-Transfer-Encoding: base64\r\n\r\n@@@@====\r\n",
                    b"\r\nContent-Type: message/delivery-status\r\n\r\nStatus: 9.9.9.9\r\n",
                    b"\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\n\xff\xfe",
                    b"\r\n--7D3A21C04A.1709630106/mx.dest.test--\r\n",
                    b"Remote Server returned '",
                    b"\r\n<\r\n>:\r\n",
                    b"(#5.",
                ]
            )
        elif choice == 7:
            out = out[: rng.randrange(len(out) + 1)] + out  # doubled prefix
        else:
            out = bytearray(bytes(out).upper() if rng.random() < 0.5 else bytes(out).lower())
    return bytes(out)


def test_mangled_input_never_crashes_and_is_deterministic() -> None:
    rng = random.Random(3464)
    samples = [sample(name) for name in sorted(EXPECTED)]
    for _ in range(600):
        data = _mangle(rng, rng.choice(samples))
        first = parse_bounce(data, HOST)
        assert isinstance(first, list)
        assert all(isinstance(b, Bounce) for b in first)
        assert all(b.bounce_class in ("hard", "soft", "unknown") for b in first)
        assert parse_bounce(data, HOST) == first


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n",
        b"\x00" * 1000,
        bytes(range(256)) * 64,
        b"From: \r\n\r\n",
        b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n" * 2000,
        b"Content-Type: message/rfc822\r\n\r\n" * 500,
        b"Content-Type: message/delivery-status\r\n\r\n" + b"Final-Recipient: ;\r\n" * 5000,
    ],
)
def test_degenerate_input(data: bytes) -> None:
    result = parse_bounce(data, HOST)
    assert result == [UNKNOWN_BOUNCE] or all(isinstance(b, Bounce) for b in result)


@pytest.mark.parametrize(
    "body",
    [
        b"a" * 300_000,  # one long token: a naive address regex is quadratic here
        b"<" * 300_000,
        b"<a" * 150_000,
        b"550 " * 75_000,
        b"x@" * 150_000,
        b"<script" * 40_000,
        b"by a (Sluice) with " * 20_000,
    ],
)
def test_hostile_text_is_cheap(body: bytes) -> None:
    started = time.monotonic()
    parse_bounce(b"Subject: x\r\n\r\n" + body + b"\r\n", HOST)
    assert time.monotonic() - started < 10


def test_same_answer_in_another_process() -> None:
    """flufl.bounce returns sets, whose order follows the per-process hash seed."""
    script = (
        "import sys, json;"
        "from appliance.bounce_intake import parse_bounce;"
        "data = sys.stdin.buffer.read();"
        "print(json.dumps([b.log_fields() for b in parse_bounce(data, 'gw.sluice.test')]))"
    )
    report = FLUFL_ONLY
    outputs = set()
    for seed in ("1", "2", "3"):
        result = subprocess.run(
            [sys.executable, "-c", script],
            input=report,
            capture_output=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            cwd=Path(__file__).parents[1],
            check=True,
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1


# -- addresses, the log, configuration ----------------------------------------------------


def test_bounce_addresses() -> None:
    addresses = BounceAddresses(["Bounces@Example.NET", "vrp+*@sluice.test"])
    assert "bounces@example.net" in addresses
    assert "BOUNCES@example.net" in addresses
    assert "bounces+x@example.net" not in addresses
    assert "bounces@example.org" not in addresses
    assert "vrp@sluice.test" in addresses
    assert "vrp+bob=dest.test@sluice.test" in addresses
    assert "VRP+x@SLUICE.test" in addresses
    assert "vrpx@sluice.test" not in addresses
    assert "vrp+x@other.test" not in addresses
    assert not BounceAddresses([])


def test_bounce_log_appends_json_lines(tmp_path: Path) -> None:
    log = BounceLog(tmp_path / "sub" / "bounces.jsonl")
    log.append([{"a": 1}, {"b": "ü"}])
    log.append([])
    log.append([{"c": None}])
    lines = (tmp_path / "sub" / "bounces.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"a": 1}, {"b": "ü"}, {"c": None}]


def test_config_keys(tmp_path: Path) -> None:
    config = default_config()
    assert config.bounce_addresses == ()
    assert config.bounce_log == config.data_dir / "bounces.jsonl"
    doc = {
        "data_dir": "/srv/s",
        "bounce_addresses": ["bounces@example.net", "b+*@example.net"],
        "bounce_log": "log/b.jsonl",
    }
    config = _build("f.toml", doc, tmp_path)
    assert config.bounce_addresses == ("bounces@example.net", "b+*@example.net")
    assert config.bounce_log == tmp_path / "log" / "b.jsonl"
    assert _build("f.toml", {"data_dir": "/srv/s"}, None).bounce_log == Path("/srv/s/bounces.jsonl")
    for bad in (["*@example.net"], ["bounces"], "bounces@example.net", ["a+*b@example.net"]):
        with pytest.raises(ConfigError, match="bounce_addresses"):
            _build("f.toml", {"bounce_addresses": bad}, None)
    with pytest.raises(ConfigError, match="bounce_log"):
        _build("f.toml", {"bounce_log": ""}, None)


# -- the inbound hook -----------------------------------------------------------------------


def _request(recipients: list[str], body: bytes) -> SimpleNamespace:
    return SimpleNamespace(
        sender="",
        recipients=recipients,
        rcpt_params=[[] for _ in recipients],
        mail_params=[],
        body=body,  # as the listener hands it over: our header (here none), the message
        qid=new_queue_id(),
        trace_len=0,
        helo="mx.dest.test",
        peer_ip="192.0.2.25",
        esmtp=True,
        tls=None,
        listener="inbound",
    )


async def accept(acceptor: MessageAcceptor, request: Any) -> Verdict:
    """MessageAcceptor.accept() with its verdict however it comes (now, awaited, by call)."""
    replied: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    result = acceptor.accept(request, replied.set_result)
    if result is None:
        return await replied
    if isinstance(result, Verdict):
        return result
    return await result


async def test_acceptor_records_and_queues_the_rest(tmp_path: Path) -> None:
    config = replace(
        _build("f.toml", {"hostname": HOST, "data_dir": str(tmp_path)}, None),
        bounce_addresses=("bounces@sluice.test",),
    )
    queue = Queue(tmp_path, durable=False)
    try:
        acceptor = MessageAcceptor(config, queue, lambda: None)
        body = sample("postfix_dsn.eml")

        only = await accept(acceptor, _request(["Bounces@Sluice.test"], body))
        assert only.code == 250 and "bounce recorded as" in only.text
        assert queue.count() == 0

        mixed = await accept(acceptor, _request(["ops@sluice.test", "bounces@sluice.test"], body))
        assert mixed.code == 250 and "queued as" in mixed.text
        qid = mixed.text.rsplit(" ", 1)[1]
        queued = queue.get(qid)
        assert queued is not None
        assert [r.address for r in queued.recipients] == ["ops@sluice.test"]
    finally:
        await queue.close()

    lines = [json.loads(x) for x in (tmp_path / "bounces.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert lines[1]["bounce_id"] == qid
    for line in lines:
        assert line["original_qid"] == "0Ya1Bc2De3Fg4Hi5Jk"
        assert line["recipient"] == "bob@dest.test"
        assert (line["status"], line["class"], line["reason"]) == ("5.1.1", "hard", "user-unknown")
        assert line["remote_reply"].startswith("550 5.1.1 <bob@dest.test>")
        assert line["peer"] == "192.0.2.25" and line["bounce_sender"] == ""
        assert line["time"].endswith("Z")


async def test_acceptor_says_451_when_the_log_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = replace(
        _build("f.toml", {"hostname": HOST, "data_dir": str(tmp_path)}, None),
        bounce_addresses=("bounces@sluice.test",),
        bounce_log=blocker / "bounces.jsonl",
    )
    queue = Queue(tmp_path, durable=False)
    try:
        acceptor = MessageAcceptor(config, queue, lambda: None)
        verdict = await accept(acceptor, _request(["bounces@sluice.test"], b"x"))
        assert verdict.code == 451
    finally:
        await queue.close()


def test_intake_record_returns_what_it_logged(tmp_path: Path) -> None:
    config = replace(
        _build("f.toml", {"hostname": HOST, "data_dir": str(tmp_path)}, None),
        bounce_addresses=("bounces@sluice.test",),
    )
    intake = BounceIntake(config)
    got = intake.record(
        sample("qmail.eml"),
        bounce_id="0QID",
        sender="",
        bounce_to="bounces@sluice.test",
        peer="192.0.2.1",
        now=1_700_000_000.25,
    )
    lines = [json.loads(x) for x in (tmp_path / "bounces.jsonl").read_text().splitlines()]
    assert [x["recipient"] for x in lines] == [b.recipient for b in got]
    assert lines[0]["time"] == "2023-11-14T22:13:20.250Z"
    assert list(lines[0])[:7] == [
        "time",
        "original_qid",
        "original_host",
        "recipient",
        "original_recipient",
        "action",
        "status",
    ]
