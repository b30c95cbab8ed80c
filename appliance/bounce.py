"""Bounces and other delivery status notifications (DSNs) to the envelope sender.

Called by the delivery scheduler, in the unprivileged Python process, once per message
and pass with every recipient that failed in that pass (Action: failed), with the
recipients that are late when the bounce profile's delay_warning has passed (Action:
delayed, once per message) and with recipients that asked for NOTIFY=SUCCESS and were
handed to a next hop that does not offer DSN (Action: relayed; RFC 3461 5.2.2). Which
recipients get which report (NOTIFY=NEVER, FAILURE, DELAY, SUCCESS) is decided by the
scheduler; this module writes the report. The result is queued like any other message,
from the null reverse path <> to the original envelope sender.

Formats: RFC 3464 (message/delivery-status) inside RFC 6522 (multipart/report;
report-type=delivery-status), RFC 3463 status codes, RFC 3834 (Auto-Submitted:
auto-replied), RFC 3461 (RET=HDRS|FULL and ENVID, ORCPT from the original envelope).
Output is 7-bit with CRLF line ends, ready for the queue and the SMTP client.

The recipient's `last_reply` is the one place the scheduler records why it failed; its
format is defined here (`format_reply` / `parse_reply_record`) so the writer and this
reader cannot drift apart:

    "<host>: <code> <x.y.z> <text>"   a reply from (or about) the next hop <host>, where
                                      <host> is "name[address]" or just the address
    "<code> <x.y.z> <text>"           decided here (DNS, local checks)
    "expired: <one of the above>"     the queue lifetime ran out (RFC 3463 4.4.7)
"""

from __future__ import annotations

import email.utils
import quopri
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from appliance.queue import MessageRecord, RecipientRecord

EXPIRED_PREFIX = "expired: "

# host ":" SP reply, where reply = code [SP enhanced] [SP text]; the host is whatever is
# before the first ": " that is followed by a reply code (IPv6 addresses contain ":").
_REPLY_RECORD = re.compile(
    r"(?:(?P<host>\S+): )?(?P<code>[245]\d\d)(?: (?P<enhanced>[245]\.\d{1,3}\.\d{1,3}))?"
    r"(?: (?P<text>.*))?",
    re.ASCII | re.DOTALL,
)


@dataclass(frozen=True)
class ReplyRecord:
    """`last_reply` taken apart."""

    host: str | None
    code: int | None
    enhanced: str
    text: str
    expired: bool

    @property
    def status(self) -> str:
        """The RFC 3464 Status: the expiry code, the enhanced code, or the class default."""
        if self.expired:
            return "4.4.7"
        if self.enhanced:
            return self.enhanced
        if self.code is not None and self.code >= 400:
            return f"{self.code // 100}.0.0"
        return "5.0.0"

    @property
    def remote_mta(self) -> str | None:
        """The next hop's DNS name for Remote-MTA: "mx.example.com[192.0.2.1]" gives
        the name, a bare address gives the address."""
        if not self.host:
            return None
        m = re.fullmatch(r"(.+)\[(.+)\]", self.host)
        return m.group(1) if m else self.host

    @property
    def diagnostic(self) -> str:
        """The reply as the next hop (or we) said it, without the host."""
        parts = [str(self.code) if self.code else "", self.enhanced, self.text]
        return " ".join(p for p in parts if p)


def format_reply(host: str | None, code: int, enhanced: str, text: str) -> str:
    """The `last_reply` text for a reply from `host` (None: decided locally)."""
    reply = " ".join(p for p in (str(code), enhanced, text) if p)
    return f"{host}: {reply}" if host else reply


def format_expired(last_reply: str) -> str:
    return EXPIRED_PREFIX + last_reply


def parse_reply_record(text: str) -> ReplyRecord:
    expired = text.startswith(EXPIRED_PREFIX)
    if expired:
        text = text[len(EXPIRED_PREFIX) :]
    m = _REPLY_RECORD.fullmatch(text)
    if m is None:
        return ReplyRecord(None, None, "", text, expired)
    return ReplyRecord(
        m.group("host"),
        int(m.group("code")),
        m.group("enhanced") or "",
        m.group("text") or "",
        expired,
    )


def _ascii(text: str) -> str:
    """Make `text` safe for a 7-bit header field: no controls, non-ASCII as \\x{HEX}
    (the RFC 6533 convention for addresses in delivery-status fields)."""
    out = []
    for ch in text:
        if ch in "\r\n\t":
            out.append(" ")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


def _address_field(address: str) -> str:
    # RFC 3464 2.3.2 address-type "rfc822"; RFC 6533 "utf-8" for internationalised ones.
    if address.isascii():
        return f"rfc822; {_ascii(address)}"
    return f"utf-8; {_ascii(address)}"


def _param(params: Sequence[tuple[str, str | None]], name: str) -> str | None:
    for key, value in params:
        if key.upper() == name:
            return value
    return None


def _headers_of(original: bytes) -> bytes:
    """The header section of the original message (up to, not including, the blank line)."""
    end = original.find(b"\r\n\r\n")
    if original.startswith(b"\r\n"):
        return b""
    if end < 0:
        return original if original.endswith(b"\r\n") else original + b"\r\n"
    return original[: end + 2]


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("ascii")


def _quoted_printable(data: bytes) -> bytes:
    # quopri emits LF line ends; our output is CRLF throughout.
    encoded = quopri.encodestring(data.replace(b"\r\n", b"\n"), quotetabs=False)
    return encoded.replace(b"\n", b"\r\n")


Action = Literal["failed", "delayed", "relayed"]

_SUBJECTS: dict[str, str] = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report",
}


def _status(action: Action, rep: ReplyRecord) -> str:
    """RFC 3464 2.3.4: the status code must agree with the action: 2.x.x for relayed,
    4.x.x for delayed, 5.x.x (or the expiry code 4.4.7) for failed."""
    status = rep.status
    if action == "relayed":
        return status if status.startswith("2.") else "2.0.0"
    if action == "delayed":
        return status if status.startswith("4.") else "4.0.0"
    return status


def build_bounce(
    record: MessageRecord,
    failed: list[RecipientRecord],
    original: bytes,
    reporting_mta: str,
    now: float,
    to: str | None = None,
) -> bytes:
    """An RFC 3464 non-delivery report for `failed` recipients of `record`.

    The report goes to `to` if given (the postmaster, for a message from <>), else to the
    original envelope sender.

    `original` is the stored message (CRLF, unstuffed). Part 3 carries its header
    section, or the whole message when the sender asked for RET=FULL (RFC 3461 4.3) and
    the message is 7-bit (message/rfc822 may not be re-encoded, RFC 2046 5.2.1).
    """
    return build_dsn(record, failed, original, reporting_mta, now, to=to)


def _human_lines(
    action: Action,
    reporting_mta: str,
    rcpts: list[RecipientRecord],
    reports: list[ReplyRecord],
    retry_until: Callable[[RecipientRecord], float] | None,
) -> list[str]:
    intro = {
        "failed": [
            "Your message could not be delivered to one or more recipients.",
            "The reasons are given below. The headers of your message are attached.",
        ],
        "delayed": [
            "Your message has not yet been delivered to the recipients below.",
            "The mail system keeps trying; you do not need to send it again.",
        ],
        "relayed": [
            "Your message was relayed to the next mail server for the recipients below.",
            "That server does not offer delivery status notifications, so this is",
            "the last report you will get about these recipients.",
        ],
    }[action]
    human = [f"This is the mail system at host {reporting_mta}.", "", *intro, ""]
    for rcpt, rep in zip(rcpts, reports, strict=True):
        if action == "relayed":
            reason = f"relayed to {rep.host}" if rep.host else "relayed"
        elif rep.expired:
            reason = "the message could not be delivered before its queue lifetime ran out"
            if rep.code is not None:
                reason += f"; last attempt: {rep.diagnostic}"
                if rep.host:
                    reason += f" (from {rep.host})"
        elif rep.host:
            reason = f"host {rep.host} said: {rep.diagnostic}"
        else:
            reason = rep.diagnostic or rep.text or "delivery failed"
        if action == "delayed" and retry_until is not None:
            until = email.utils.formatdate(retry_until(rcpt), usegmt=True)
            reason += f"; will be retried until {until}"
        human.append(f"<{rcpt.address}>: {reason}")
        human.append("")
    return human


def build_dsn(
    record: MessageRecord,
    rcpts: list[RecipientRecord],
    original: bytes,
    reporting_mta: str,
    now: float,
    to: str | None = None,
    *,
    action: Action = "failed",
    retry_until: Callable[[RecipientRecord], float] | None = None,
) -> bytes:
    """An RFC 3464 report with `action` for every one of `rcpts` of `record`.

    "failed" is the non-delivery report of `build_bounce`. "delayed" (RFC 3464 2.3.3)
    carries Will-Retry-Until from `retry_until(rcpt)`; "relayed" says the message went
    to a next hop that does not pass DSN requests on. Both return the headers of the
    original only: RET applies to failure reports (RFC 3461 4.3).
    """
    failed = rcpts
    boundary = f"=_sluice_{secrets.token_hex(12)}"
    sender = to or record.sender or f"postmaster@{reporting_mta}"
    date = email.utils.formatdate(now, usegmt=True)
    message_id = f"<{int(now)}.{secrets.token_hex(8)}.bounce@{reporting_mta}>"

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_ascii(sender)}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {date}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]

    # Part 1: for the person reading it.
    reports = [parse_reply_record(r.last_reply) for r in failed]
    human = _human_lines(action, reporting_mta, failed, reports, retry_until)
    human_bytes = "\n".join(human).encode("utf-8")
    if human_bytes.isascii():
        part1_head = [
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
        ]
        part1_body = human_bytes.replace(b"\n", b"\r\n")
    else:
        part1_head = [
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
        ]
        part1_body = _quoted_printable(human_bytes)
    part1_head = ["Content-Description: Notification", *part1_head]

    # Part 2: RFC 3464 2.2 per-message fields, then 2.3 per-recipient fields.
    status = [f"Reporting-MTA: dns; {_ascii(reporting_mta)}"]
    # ENVID and ORCPT are stored xtext-decoded by the listener (rust/smtp-proto params.rs)
    # and go into the report as they are: decoding again would turn a literal "+2B" of
    # the original address into "+" (RFC 3464 2.2.1, 2.3.1 want the decoded value).
    envid = _param(record.mail_params, "ENVID")
    if envid:
        status.append(f"Original-Envelope-Id: {_ascii(envid)}")
    status.append(f"X-Sluice-Queue-ID: {record.qid}")
    status.append(f"Arrival-Date: {email.utils.formatdate(record.arrived, usegmt=True)}")
    for rcpt, rep in zip(failed, reports, strict=True):
        status.append("")
        orcpt = _param(rcpt.params, "ORCPT")
        if orcpt and ";" in orcpt:
            kind, _, value = orcpt.partition(";")
            status.append(f"Original-Recipient: {_ascii(kind)};{_ascii(value)}")
        status.append(f"Final-Recipient: {_address_field(rcpt.address)}")
        status.append(f"Action: {action}")
        status.append(f"Status: {_status(action, rep)}")
        if rep.remote_mta:
            status.append(f"Remote-MTA: dns; {_ascii(rep.remote_mta)}")
        if rep.code is not None:
            status.append(f"Diagnostic-Code: smtp; {_ascii(rep.diagnostic)}")
        elif rep.text:
            status.append(f"Diagnostic-Code: X-Sluice; {_ascii(rep.text)}")
        if rcpt.updated:
            status.append(f"Last-Attempt-Date: {email.utils.formatdate(rcpt.updated, usegmt=True)}")
        if action == "delayed" and retry_until is not None:
            until = email.utils.formatdate(retry_until(rcpt), usegmt=True)
            status.append(f"Will-Retry-Until: {until}")

    # Part 3: the original, as much as the sender asked for and 7-bit allows.
    ret = (_param(record.mail_params, "RET") or "HDRS").upper()
    if ret == "FULL" and original.isascii() and action == "failed":
        part3_head = ["Content-Type: message/rfc822", "Content-Description: Undelivered Message"]
        part3_body = original if original.endswith(b"\r\n") else original + b"\r\n"
    else:
        headers = _headers_of(original)
        part3_head = [
            "Content-Type: text/rfc822-headers",
            "Content-Description: Undelivered Message Headers",
        ]
        if headers.isascii():
            part3_body = headers
        else:
            # 8-bit headers (RFC 6532) are UTF-8; quoted-printable keeps the report 7-bit.
            part3_head[0] += "; charset=utf-8"
            part3_head.append("Content-Transfer-Encoding: quoted-printable")
            part3_body = _quoted_printable(headers)

    delimiter = f"--{boundary}\r\n".encode("ascii")
    out = [_crlf("\n".join(head) + "\n")]
    out += [delimiter, _crlf("\n".join(part1_head) + "\n\n"), part1_body]
    out += [b"\r\n", delimiter, _crlf("Content-Type: message/delivery-status\n\n")]
    out += [_crlf("\n".join(status) + "\n")]
    out += [b"\r\n", delimiter, _crlf("\n".join(part3_head) + "\n\n"), part3_body]
    out += [b"\r\n", f"--{boundary}--\r\n".encode("ascii")]
    return b"".join(out)
