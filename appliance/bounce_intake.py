"""Incoming bounces: delivery reports that come back to the gateway's bounce address.

Who talks to it: `inbound.MessageAcceptor`, in the unprivileged Python process, for a
message whose recipients include one of `bounce_addresses` (config). That copy is not
relayed: `BounceIntake.record()` parses it, classifies every failed recipient and appends
one JSON line per recipient to `bounce_log`, fsync'ed before the client gets its 250 (the
queue's durability rule: a 250 means it is recorded). It runs in the event loop's
default executor thread, so a large report does not stall the loop.

What it reads (docs/bounces.md has the list, the log format and the classification
table):

- RFC 3464 delivery status notifications (message/delivery-status, RFC 6533's
  message/global-delivery-status), in the RFC 6522 multipart/report container or not,
  including the ones this gateway sends (appliance/bounce.py);
- the common plain-text formats: Postfix, Exim (failures and delay warnings), Microsoft
  Exchange and Office 365 ("Remote Server returned '...'"), qmail-send, old Sendmail
  ("The following addresses had permanent fatal errors"), and any text with an SMTP reply
  such as "550 5.1.1 <x@y>: user unknown";
- statuses and reasons by RFC 3463 enhanced status codes and RFC 5321 reply codes.

Library choice: flufl.bounce (Mailman's bounce detectors; maintained, typed) finds which
addresses bounced, in many formats, and whether temporarily or permanently, but not the
status code, the remote reply or the remote MTA, which the bounce log must carry; it also
raises on some malformed input (its Yale detector indexes an empty From: list). So the
RFC 3464 part is read here with the standard library's email package (which already splits
a delivery-status body into its field groups), the text formats by small line-oriented
detectors below, and flufl.bounce is the last resort: for a report none of ours
recognises, its addresses are recorded with what the text around them says.

Two promises, both tested with mangled input: `parse_bounce` never raises (any exception
gives one record of class "unknown"), and the same bytes always give the same records (no
clock, no set iteration order, no locale in the parse; the log line's `time` is added by
the caller). The original queue id is matched through our own Received: header ("by
<host> (Sluice) with ESMTP id <qid>", appliance/trace.py) in the returned message or
headers, never in the report's own trace headers.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import html
import json
import logging
import os
import quopri
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flufl.bounce import all_failures

if TYPE_CHECKING:
    from appliance.config import Config

# flufl.bounce logs a traceback before re-raising a detector's exception; we catch it.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

HARD, SOFT, UNKNOWN = "hard", "soft", "unknown"

# Bounds that keep a hostile or huge report cheap to read.
MAX_TEXT = 256 * 1024  # characters of human-readable text the detectors look at
MAX_RECORDS = 200  # recipients recorded per report
MAX_REPLY = 1000  # characters of a remote reply kept
MAX_DEPTH = 20  # MIME nesting followed

# RFC 3463 section 2: class "." subject "." detail, with 1-3 digit subject and detail.
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# RFC 5321 section 4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP or "-".
_REPLY_START = re.compile(r"([245][0-5]\d)(?:[ -]|$)")
# Bounded repetitions: an unbounded local part makes a search quadratic on a long token.
_ADDRESS = re.compile(r"<?([^\s<>()\[\]@\"',;:]{1,64}@[A-Za-z0-9][A-Za-z0-9.-]{0,253})>?")
_BRACKETED = re.compile(r"<([^\s<>@]{1,64}@[^\s<>]{1,255})>")
_SPACES = re.compile(r"\s+")
# Our trace header (appliance/trace.py), possibly re-folded or quoted with "> ".
_OUR_RECEIVED = re.compile(
    r"\bby[\s>]+([A-Za-z0-9.-]+)[\s>]+\(Sluice\)[\s>]+with[\s>]+[A-Za-z0-9]+[\s>]+id[\s>]+"
    r"([0-9A-Za-z]{6,40})\b"
)


@dataclass(frozen=True)
class Bounce:
    """One failed (or delayed) recipient of one report, classified.

    `bounce_class` is about the cause: "hard" (5.x.x / 5xx: retrying will not help),
    "soft" (4.x.x / 4xx) or "unknown"; `action` is what the report said happened
    ("failed", "delayed", or "" when it did not say).
    """

    recipient: str | None
    status: str
    bounce_class: str
    reason: str
    remote_reply: str
    remote_mta: str | None = None
    action: str = ""
    original_recipient: str | None = None
    format: str = "unknown"
    original_qid: str | None = None
    original_host: str | None = None

    def log_fields(self) -> dict[str, object]:
        return {
            "original_qid": self.original_qid,
            "original_host": self.original_host,
            "recipient": self.recipient,
            "original_recipient": self.original_recipient,
            "action": self.action,
            "status": self.status,
            "class": self.bounce_class,
            "reason": self.reason,
            "remote_mta": self.remote_mta,
            "remote_reply": self.remote_reply,
            "format": self.format,
        }


UNKNOWN_BOUNCE = Bounce(None, "", UNKNOWN, "unknown", "")


@dataclass(frozen=True)
class _Found:
    """What a detector read about one recipient, before classification."""

    recipient: str | None
    reply: str = ""
    status: str = ""
    remote_mta: str | None = None
    action: str = ""
    hint: str = ""  # HARD / SOFT when the format says so without a code
    original_recipient: str | None = None


# ---------------------------------------------------------------------------------------
# Classification (RFC 3463 enhanced status codes, RFC 5321 reply codes, reply text)

# By enhanced status "subject.detail" (the class digit decides hard/soft separately).
_REASON_BY_STATUS: dict[str, str] = {
    "1.0": "user-unknown",
    "1.1": "user-unknown",
    "1.3": "user-unknown",
    "1.6": "user-unknown",
    "2.1": "user-unknown",  # mailbox disabled, not accepting messages
    "1.2": "domain",
    "4.4": "domain",  # unable to route (Postfix: host or domain name not found)
    "2.2": "mailbox-full",
    "2.3": "message-too-large",
    "3.4": "message-too-large",
}
_REASON_BY_SUBJECT: dict[str, str] = {"7": "policy", "4": "network"}
_NULL_MX = re.compile(r"null mx|accepts no mail|does not accept mail", re.I)

# Checked in this order when the status does not decide (x.0.0, none, or unlisted).
_REASON_BY_TEXT: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "domain",
        re.compile(
            r"host not found|domain not found|host or domain name not found|host unknown"
            r"|domain does not exist|no mx\b|unrouteable|unroutable|name service error"
            r"|nxdomain|no such domain",
            re.I,
        ),
    ),
    (
        "user-unknown",
        re.compile(
            r"no such user|unknown user|user unknown|user not found|no such mailbox"
            r"|mailbox not found|no mailbox here|does not exist|doesn'?t exist"
            r"|recipient not found|unknown recipient|invalid recipient|address not found"
            r"|recipnotfound|recipientnotfound|account (?:is )?disabled",
            re.I,
        ),
    ),
    (
        "mailbox-full",
        re.compile(
            r"quota|mailbox (?:is )?full|mailbox size limit|insufficient (?:system )?storage"
            r"|out of storage",
            re.I,
        ),
    ),
    (
        "message-too-large",
        re.compile(
            r"too large|too big|message size exceeds|size limit|exceeds (?:the )?maximum"
            r"(?: message)? size",
            re.I,
        ),
    ),
    (
        "policy",
        re.compile(
            r"blocked|spam|policy|blacklist|blocklist|denylist|reputation|access denied"
            r"|relay(?:ing)? (?:access )?denied|not permitted|banned|\brbl\b|spamhaus",
            re.I,
        ),
    ),
    (
        "network",
        re.compile(
            r"timed out|time-?out|connection refused|connection reset|lost connection"
            r"|connection dropped|network is unreachable|no route to host|read error"
            r"|retry time(?:out)? (?:not reached|exceeded)",
            re.I,
        ),
    ),
)


def status_from_reply(reply: str) -> str:
    """The enhanced status in an SMTP reply ("550 5.1.1 ..."), else "x.0.0" from its
    basic code (RFC 3463 section 3.1's default for an unrefined reply), else ""."""
    reply = reply.strip()
    m = _REPLY_START.match(reply)
    if m:
        enhanced = _ENHANCED.match(reply[m.end() :].lstrip("# "))
        if enhanced:
            return enhanced.group(0)
    enhanced = _ENHANCED.search(reply)
    if enhanced:
        return enhanced.group(0)
    if m and m.group(1)[0] in "45":
        return f"{m.group(1)[0]}.0.0"
    return ""


def classify(status: str, reply: str, hint: str = "", action: str = "") -> tuple[str, str]:
    """(class, reason) for one recipient: the class from the status's first digit (else
    the reply code, else the report's own words), the reason from the status's subject
    and detail (else the reply text). Pure: the same arguments, the same answer."""
    m = _ENHANCED.fullmatch(status)
    first = m.group(1) if m else ""
    if not first:
        code = _REPLY_START.match(reply.strip())
        first = code.group(1)[0] if code else ""
    if first == "5":
        bounce_class = HARD
    elif first == "4":
        bounce_class = SOFT
    elif hint in (HARD, SOFT):
        bounce_class = hint
    elif action == "delayed":
        bounce_class = SOFT
    elif action == "failed":
        bounce_class = HARD
    else:
        bounce_class = UNKNOWN

    reason = ""
    if m:
        subject, detail = int(m.group(2)), int(m.group(3))
        reason = _REASON_BY_STATUS.get(f"{subject}.{detail}", "")
        if (subject, detail) == (1, 10):
            # RFC 7505 defines x.1.10 as "recipient domain has a null MX"; Microsoft's
            # servers use it for "recipient not found". The text tells them apart.
            reason = "domain" if _NULL_MX.search(reply) else "user-unknown"
        reason = reason or _REASON_BY_SUBJECT.get(str(subject), "")
    if not reason:
        for name, pattern in _REASON_BY_TEXT:
            if pattern.search(reply):
                reason = name
                break
    if not reason:
        reason = "other" if (status or reply.strip()) else "unknown"
    if bounce_class == UNKNOWN and reason == "other":
        reason = "unknown"
    return bounce_class, reason


# ---------------------------------------------------------------------------------------
# Reading the message


def _walk(msg: Message, depth: int = 0) -> Iterator[Message]:
    """Every part of the report, but not the inside of a returned message (a bounce of a
    bounce quotes someone else's report) nor the field groups of a delivery-status."""
    yield msg
    if depth >= MAX_DEPTH:
        return
    ctype = msg.get_content_type()
    if ctype.startswith("message/") or ctype == "text/rfc822-headers":
        return
    payload = msg.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                yield from _walk(sub, depth + 1)


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except (LookupError, ValueError):
        text = payload.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


_TAG = re.compile(r"<[^<>]{0,2000}>")
_BREAK_TAG = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d)\b[^<>]{0,200}>", re.I)


def _html_text(markup: str) -> str:
    markup = _BREAK_TAG.sub("\n", markup[:MAX_TEXT])
    return html.unescape(_TAG.sub("", markup))


# Where the human-readable part of a plain-text report stops and the returned message
# starts: nothing after these is the reporting server's own words.
_COPY_MARKERS = re.compile(
    r"^.{0,8}(?:-+ ?Below this line is a copy of the message"
    r"|-+ ?This is a copy of the message"
    r"|-+ ?Original message"
    r"|-+ ?Original Message-+"
    r"|Original message headers:"
    r"|-+ ?The header of the original message"
    r"|-+ ?Returned message"
    r"|-+ ?Unsent message below"
    r"|-+ ?Message headers follow)",
    re.I | re.M,
)


def _human_text(msg: Message) -> str:
    """The report's words for people: text/plain parts (text/html only when there are
    none), outside any returned message, up to the first "copy of the message" line."""
    plain: list[str] = []
    markup: list[str] = []
    for part in _walk(msg):
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/html":
            markup.append(_html_text(_decoded_text(part)))
        elif part.get_content_maintype() == "text" and ctype != "text/rfc822-headers":
            plain.append(_decoded_text(part))
    text = "\n".join(plain or markup)[:MAX_TEXT]
    cut = _COPY_MARKERS.search(text)
    return text[: cut.start()] if cut else text


def _unfold(value: str) -> str:
    return _SPACES.sub(" ", value).strip()


def _clip(reply: str) -> str:
    reply = _unfold(reply)
    return reply if len(reply) <= MAX_REPLY else reply[:MAX_REPLY] + "..."


def _typed_value(value: str) -> str:
    """The value of an RFC 3464 "type; value" field ("rfc822; <a@b>" -> "a@b")."""
    _, sep, rest = value.partition(";")
    rest = (rest if sep else value).strip()
    if rest.startswith("<") and rest.endswith(">"):
        rest = rest[1:-1].strip()
    return rest


# ---------------------------------------------------------------------------------------
# RFC 3464


_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 section 3.6.8 ftext


def _field_groups(text: str) -> list[dict[str, str]]:
    """RFC 3464 section 2.1: the delivery-status body is groups of RFC 822-style fields
    separated by blank lines; the first group is per message, the others per recipient.
    Names are lower-cased; a repeated field keeps its first value."""
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                groups.append(current)
            current, last = {}, None
        elif line[0] in " \t":
            if last is not None:
                current[last] += " " + line.strip()
        else:
            name, sep, value = line.partition(":")
            name = name.strip().lower()
            if sep and _FIELD_NAME.fullmatch(name) and name not in current:
                current[name] = value.strip()
                last = name
            else:
                last = None
    if current:
        groups.append(current)
    return groups


def _delivery_status_text(part: Message) -> str:
    """The body of a delivery-status part as text, whatever the parser made of it (field
    groups, or a string when it carries a transfer encoding)."""
    whole = part.as_string()
    body = whole.split("\n\n", 1)[1] if "\n\n" in whole else ""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(body.strip(), validate=False).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return ""
    if cte == "quoted-printable":
        raw = body.encode("ascii", "replace")
        return quopri.decodestring(raw).decode("utf-8", "replace")
    return body


_NOT_FAILURES = ("delivered", "relayed", "expanded")


def _from_dsn(msg: Message) -> list[_Found] | None:
    """Every failed or delayed recipient of every delivery-status part; None when there
    is no such part or it names no recipient (then the text formats are tried)."""
    parts = [
        p
        for p in _walk(msg)
        if p.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    ]
    found: list[_Found] = []
    recipients_seen = False
    for part in parts:
        groups = _field_groups(_delivery_status_text(part))
        for group in groups:
            if "final-recipient" not in group and "original-recipient" not in group:
                continue
            recipients_seen = True
            action = (group.get("action", "").split() or [""])[0].lower()
            status_m = _ENHANCED.search(group.get("status", ""))
            status = status_m.group(0) if status_m else ""
            if action in _NOT_FAILURES or status.startswith("2."):
                continue
            final = _typed_value(group.get("final-recipient", "")) or None
            original = _typed_value(group.get("original-recipient", "")) or None
            diagnostic = group.get("diagnostic-code", "")
            reply = _typed_value(diagnostic) if ";" in diagnostic else diagnostic
            remote = _typed_value(group.get("remote-mta", "")) or None
            found.append(
                _Found(
                    recipient=final or original,
                    reply=reply,
                    status=status or status_from_reply(reply),
                    remote_mta=remote,
                    action="failed" if action == "error" else action,
                    original_recipient=original if final and original != final else None,
                )
            )
    return found if recipients_seen else None


# ---------------------------------------------------------------------------------------
# Plain-text formats. Each detector takes the human text (LF line ends) and returns the
# recipients it read, or None when the text is not in its format.


def _address_in(text: str) -> str | None:
    m = _BRACKETED.search(text) or _ADDRESS.search(text)
    return m.group(1) if m else None


def _reply_in(text: str) -> str:
    """The SMTP reply in a line of report text, from its code to the end."""
    for m in re.finditer(r"(?:^|(?<=[\s:;'(<]))([245][0-5]\d)(?=[ -])", text):
        rest = text[m.start() :]
        if _ENHANCED.match(rest[4:].lstrip("# ")) or _BRACKETED.search(rest[:200]):
            return rest
        if m.start() == 0 or text[max(0, m.start() - 5) : m.start()].rstrip().endswith(
            (":", ";", "<<<", "'")
        ):
            return rest
    return ""


_QMAIL_RECIPIENT = re.compile(r"^<([^<>\s]+)>:\s*$")
_QMAIL_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)")
_QMAIL_REMOTE = re.compile(
    r"^(?:Connected to )?(\S+) (?:does not like recipient|failed after I sent the message"
    r"|but (?:sender was rejected|greeting failed|my name was rejected))"
)


def _qmail(text: str) -> list[_Found] | None:
    lower = text.lower()
    if "this is the qmail-send program" not in lower:
        return None
    hint = HARD if ("permanent error" in lower or "given up" in lower) else ""
    if "temporary" in lower and not hint:
        hint = SOFT
    found: list[_Found] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _QMAIL_RECIPIENT.match(lines[i].strip())
        i += 1
        if not m:
            continue
        detail: list[str] = []
        while i < len(lines) and lines[i].strip() and not _QMAIL_RECIPIENT.match(lines[i]):
            detail.append(lines[i].strip())
            i += 1
        joined = " ".join(detail)
        said = joined.partition("Remote host said:")
        reply = said[2].strip() if said[1] else joined
        qmail_status = _QMAIL_STATUS.search(joined)
        status = status_from_reply(reply) if said[1] else ""
        if not status and qmail_status:
            status = qmail_status.group(1)
        remote = _QMAIL_REMOTE.match(detail[0]) if detail else None
        found.append(
            _Found(
                recipient=m.group(1),
                reply=reply,
                status=status,
                remote_mta=remote.group(1) if remote else None,
                action="failed" if hint == HARD else "",
                hint=hint,
            )
        )
    return found


_EXIM_ADDRESS = re.compile(r"^ {1,3}<?([^\s<>@]+@[^\s<>]+?)>?\s*$")
_EXIM_HOST = re.compile(r"\bhost (\S+) \[[0-9A-Fa-f:.]+\]")


def _exim(text: str) -> list[_Found] | None:
    lower = text.lower()
    if "created automatically by mail delivery software" not in lower:
        return None
    delayed = "not yet been delivered" in lower or "delay reason" in lower
    hint = SOFT if delayed else (HARD if "could not be delivered" in lower else "")
    found: list[_Found] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _EXIM_ADDRESS.match(lines[i])
        i += 1
        if not m:
            continue
        detail: list[str] = []
        while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
            detail.append(lines[i].strip())
            i += 1
        reply = ""
        for j, line in enumerate(detail):
            reply = _reply_in(line.removeprefix("Delay reason:").strip())
            if reply:
                reply = " ".join([reply, *detail[j + 1 :]])
                break
        if not reply:
            reply = " ".join(detail)
        host = _EXIM_HOST.search(" ".join(detail))
        found.append(
            _Found(
                recipient=m.group(1),
                reply=reply,
                status=status_from_reply(reply),
                remote_mta=host.group(1) if host else None,
                action="delayed" if delayed else ("failed" if hint == HARD else ""),
                hint=hint,
            )
        )
    return found


_POSTFIX_LINE = re.compile(r"^<([^<>\s]*)>(?: \(expanded from <([^<>]*)>\))?: (.*)$")
_POSTFIX_SAID = re.compile(r"^host (\S+?)\[[^\]]*\] said: (.*)$", re.S)
_POSTFIX_IN_REPLY = re.compile(r"\s*\(in reply to [^()]*\)\s*$")


def _postfix(text: str) -> list[_Found] | None:
    lower = text.lower()
    if "this is the mail system at host" not in lower and "postfix program" not in lower:
        return None
    warning = "this is a warning only" in lower or "delayed mail" in lower
    hint = SOFT if warning else HARD
    found: list[_Found] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _POSTFIX_LINE.match(lines[i])
        i += 1
        if not m:
            continue
        detail = [m.group(3)]
        while i < len(lines) and lines[i][:1] in (" ", "\t") and lines[i].strip():
            detail.append(lines[i].strip())
            i += 1
        joined = _POSTFIX_IN_REPLY.sub("", " ".join(detail))
        said = _POSTFIX_SAID.match(joined)
        reply = said.group(2) if said else joined
        found.append(
            _Found(
                recipient=m.group(1) or None,
                reply=reply,
                status=status_from_reply(reply),
                remote_mta=said.group(1) if said else None,
                action="delayed" if warning else "failed",
                hint=hint,
                original_recipient=m.group(2) or None,
            )
        )
    return found


_EXCHANGE_RETURNED = re.compile(r"Remote Server returned '(.*?)'?\s*$", re.I)
_EXCHANGE_HASH = re.compile(r"^\s*#[245][0-5]\d[ -]")
_EXCHANGE_2003 = re.compile(r"^\s+(\S+@\S+) on \d")
_EXCHANGE_TAG = re.compile(
    r"<(\S{0,255}) #([245]\.\d{1,3}\.\d{1,3})(?:\s*(?:smtp|x-[\w-]+);\s*(.*?))?>"
)
_BARE_ADDRESS_LINE = re.compile(r"^\s*<?([^\s<>@]+@[^\s<>()]+?)>?(?:\s+\(.*\))?\s*$")


def _exchange_reply(raw: str) -> tuple[str, str]:
    """(reply, status) from Exchange's "<host #5.0.0 smtp;550 5.1.1 text>" or plain."""
    tag = _EXCHANGE_TAG.search(raw)
    if tag:
        reply = tag.group(3) or raw
        return reply, status_from_reply(reply) if tag.group(3) else tag.group(2)
    return raw, status_from_reply(raw)


def _exchange_2003(lines: list[str]) -> list[_Found]:
    """Exchange 2003: "  joe@x on 3/4/2024 10:15 AM", then "<host #5.1.1 smtp;550 ...>"."""
    found = []
    for i, line in enumerate(lines):
        m = _EXCHANGE_2003.match(line)
        if not m:
            continue
        detail = []
        for following in lines[i + 1 : i + 8]:
            if not following.strip() or _EXCHANGE_2003.match(following):
                break
            detail.append(following.strip())
        joined = " ".join(detail)
        reply, status = _exchange_reply(joined) if _EXCHANGE_TAG.search(joined) else (joined, "")
        found.append(_Found(recipient=m.group(1), reply=reply, status=status, hint=HARD))
    return found


def _exchange(text: str) -> list[_Found] | None:
    lower = text.lower()
    if "following recipient(s) cannot be reached" in lower:
        return _exchange_2003(text.split("\n")) or None
    if not (
        "remote server returned" in lower
        or "delivery has failed to these recipients" in lower
        or "couldn't be delivered" in lower
    ):
        return None
    # Exchange 2007 and later: under "Diagnostic information for administrators" each
    # recipient's address on a line of its own, then its reply as one of
    #   Remote Server returned '550 5.1.1 ...'   (or '<host #5.0.0 smtp;550 ...>')
    #   #550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##
    #   host #<host #5.0.0 smtp;552 5.3.4 ...> #SMTP#
    found: list[_Found] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = _EXCHANGE_RETURNED.search(line)
        if m:
            raw = m.group(1)
        elif _EXCHANGE_HASH.match(line) or _EXCHANGE_TAG.search(line):
            raw = line.strip().strip("#").strip()
        else:
            continue
        reply, status = _exchange_reply(raw)
        recipient = None
        for back in range(i - 1, max(-1, i - 4), -1):
            address = _BARE_ADDRESS_LINE.match(lines[back])
            if address:
                recipient = address.group(1)
                break
        found.append(_Found(recipient=recipient, reply=reply, status=status, action="failed"))
    if found and all(f.recipient is None for f in found):
        # Office 365: "Your message to joe@x couldn't be delivered."
        to = re.search(r"message to (\S+@\S+?) couldn't be delivered", text)
        named = to.group(1) if to else None
        found = [replace(f, recipient=named) for f in found]
    return found or None


_SENDMAIL_SECTION = re.compile(
    r"^\s*-+ The following addresses? had (permanent fatal|transient non-fatal) errors -+",
    re.I,
)
_SENDMAIL_REASON = re.compile(r"^\s*\(reason: (.*)\)\s*$")
_SENDMAIL_TALKING = re.compile(r"while talking to (\S+?)\.?:")


def _sendmail(text: str) -> list[_Found] | None:
    lines = text.split("\n")
    found: list[_Found] = []
    talking = _SENDMAIL_TALKING.search(text)
    remote = talking.group(1) if talking else None
    for i, line in enumerate(lines):
        section = _SENDMAIL_SECTION.match(line)
        if not section:
            continue
        permanent = section.group(1).lower().startswith("permanent")
        j = i + 1
        while j < len(lines) and lines[j].strip():
            address = _BRACKETED.search(lines[j]) or _ADDRESS.match(lines[j].strip())
            j += 1
            if not address or lines[j - 1][:1] in (" ", "\t"):
                continue
            reason = ""
            while j < len(lines) and lines[j][:1] in (" ", "\t") and lines[j].strip():
                r = _SENDMAIL_REASON.match(lines[j])
                reason = reason or (r.group(1) if r else "")
                j += 1
            if not reason:  # the transcript's line that names this address, with a reply
                mentions = [
                    other.strip()
                    for k, other in enumerate(lines)
                    if k != j - 1
                    and address.group(1) in other
                    and not _SENDMAIL_SECTION.match(other)
                ]
                replies = [r for r in (_reply_in(o.lstrip("<> ")) for o in mentions) if r]
                reason = replies[0] if replies else (mentions[0] if mentions else "")
            if len(found) >= MAX_RECORDS:
                break
            found.append(
                _Found(
                    recipient=address.group(1),
                    reply=reason,
                    status=status_from_reply(reason),
                    remote_mta=remote,
                    action="failed" if permanent else "delayed",
                    hint=HARD if permanent else SOFT,
                )
            )
    return found or None


def _smtp_reply(text: str) -> list[_Found] | None:
    """Any line with an SMTP failure reply (4xx/5xx); the address in it, if any."""
    found: list[_Found] = []
    seen: set[str | None] = set()
    for line in text.split("\n"):
        reply = _reply_in(line.strip())
        if not reply or reply[0] not in "45":
            continue
        recipient = _address_in(reply) or _address_in(line)
        if recipient in seen:
            continue
        seen.add(recipient)
        found.append(_Found(recipient=recipient, reply=reply, status=status_from_reply(reply)))
    # A reply without an address only counts when nothing better was found.
    with_address = [f for f in found if f.recipient]
    return (with_address or found[:1]) or None


_TEXT_DETECTORS: tuple[tuple[str, Callable[[str], list[_Found] | None]], ...] = (
    ("qmail", _qmail),
    ("exim", _exim),
    ("sendmail", _sendmail),
    ("exchange", _exchange),
    ("postfix", _postfix),
    ("smtp-reply", _smtp_reply),
)


def _flufl_addresses(msg: Message) -> tuple[list[str], list[str]]:
    """flufl.bounce's (temporary, permanent) addresses, sorted (its sets iterate in hash
    order, which differs between processes); ([], []) when it fails."""
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # flufl.bounce raises on some malformed input
        return [], []

    def text(addresses: frozenset[bytes]) -> list[str]:
        return sorted(a.decode("ascii", "replace") for a in addresses if a)

    return text(temporary), text(permanent)


def _from_flufl(msg: Message, text: str) -> list[_Found]:
    temporary, permanent = _flufl_addresses(msg)
    found = []
    candidates = [(a, HARD) for a in permanent] + [(a, SOFT) for a in temporary]
    for address, hint in candidates[:MAX_RECORDS]:
        reply = ""
        for line in text.split("\n"):
            if address.lower() in line.lower():
                reply = _reply_in(line.strip())
                if reply:
                    break
        found.append(_Found(address, reply, status_from_reply(reply), hint=hint))
    return found


# ---------------------------------------------------------------------------------------
# Original queue id


def _returned_text(data: bytes, msg: Message) -> str:
    """Where the original message may be: the body as sent (7-bit parts, plain-text
    reports) and every part decoded (base64 / quoted-printable returned headers)."""
    head_end = data.find(b"\n\n")
    crlf_end = data.find(b"\r\n\r\n")
    ends = [e for e in (head_end, crlf_end) if e >= 0]
    body = data[min(ends) :] if ends else b""
    chunks = [body.decode("latin-1")]
    for part in msg.walk():
        if part is msg or part.is_multipart():
            continue
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            chunks.append(_decoded_text(part))
    return "\n".join(chunks)


def find_original_qid(data: bytes, msg: Message, hostname: str | None) -> tuple[str, str] | None:
    """(queue id, host) from our Received: header in the returned message; the first one
    by `hostname` if there is one (the last of our hops), else the first of any Sluice."""
    matches = [(m.group(2), m.group(1)) for m in _OUR_RECEIVED.finditer(_returned_text(data, msg))]
    if not matches:
        return None
    if hostname:
        for qid, host in matches:
            if host.lower() == hostname.lower():
                return qid, host
    return matches[0]


# ---------------------------------------------------------------------------------------
# The total function


def _finish(found: list[_Found], fmt: str) -> list[Bounce]:
    out: list[Bounce] = []
    seen: set[tuple[str | None, str]] = set()
    for f in found:
        reply = _clip(f.reply)
        status = f.status or status_from_reply(reply)
        key = ((f.recipient or "").lower() or None, status)
        if key in seen:
            continue
        seen.add(key)
        bounce_class, reason = classify(status, reply, f.hint, f.action)
        out.append(
            Bounce(
                recipient=f.recipient,
                status=status,
                bounce_class=bounce_class,
                reason=reason,
                remote_reply=reply,
                remote_mta=f.remote_mta,
                action=f.action,
                original_recipient=f.original_recipient,
                format=fmt,
            )
        )
        if len(out) >= MAX_RECORDS:
            break
    return out


def _parse(data: bytes, msg: Message) -> list[Bounce]:
    dsn = _from_dsn(msg)
    if dsn is not None:
        return _finish(dsn, "rfc3464")
    text = _human_text(msg)
    for name, detector in _TEXT_DETECTORS:
        found = detector(text)
        if found:
            if any(f.recipient is None for f in found):
                # flufl.bounce as the address finder, when it finds exactly one.
                temporary, permanent = _flufl_addresses(msg)
                if len(set(temporary + permanent)) == 1:
                    only = (temporary + permanent)[0]
                    found = [f if f.recipient else replace(f, recipient=only) for f in found]
            return _finish(found, name)
    flufl = _from_flufl(msg, text)
    if flufl:
        return _finish(flufl, "flufl.bounce")
    return [UNKNOWN_BOUNCE]


def parse_bounce(data: bytes, hostname: str | None = None) -> list[Bounce]:
    """The failed recipients of the report `data` (the message as received), each with
    the original queue id when our Received: header (by `hostname`, preferably) is in the
    returned message. Never raises; a report it cannot read gives [UNKNOWN_BOUNCE]; a
    report that lists only delivered recipients gives []."""
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
    except Exception:
        return [UNKNOWN_BOUNCE]
    try:
        original = find_original_qid(data, msg, hostname)
    except Exception:
        original = None
    try:
        bounces = _parse(data, msg)
    except Exception:
        bounces = [UNKNOWN_BOUNCE]
    if original is not None:
        bounces = [replace(b, original_qid=original[0], original_host=original[1]) for b in bounces]
    return bounces


# ---------------------------------------------------------------------------------------
# Addresses and the log


class BounceAddresses:
    """Which envelope recipients are the gateway's bounce addresses: whole addresses,
    compared without regard to case, or "local+*@domain" for `local` and every
    `local+tag` at `domain`."""

    def __init__(self, entries: Sequence[str]) -> None:
        self._exact: set[str] = set()
        self._tagged: set[tuple[str, str]] = set()
        for entry in entries:
            local, _, domain = entry.lower().rpartition("@")
            if local.endswith("+*"):
                self._tagged.add((local[:-2], domain))
            else:
                self._exact.add(entry.lower())

    def __bool__(self) -> bool:
        return bool(self._exact or self._tagged)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        address = address.lower()
        if address in self._exact:
            return True
        local, _, domain = address.rpartition("@")
        base = local.split("+", 1)[0]
        return (base, domain) in self._tagged


def _timestamp(now: float) -> str:
    millis = round(now * 1000)
    secs, millis = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


class BounceLog:
    """Appends JSON lines to the bounce log, durably: each append is one write() on an
    O_APPEND descriptor, then fsync (and the directory's fsync when the file is new), so
    lines from concurrent appends never interleave and a returned append is on disk."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path
        self._durable = durable
        self._lock = threading.Lock()

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(
            json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records
        ).encode("utf-8", "surrogateescape")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self._durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if created and self._durable:
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)


class BounceIntake:
    """The bounce addresses of a configuration and the log their mail is recorded in."""

    def __init__(self, config: Config) -> None:
        self.addresses = BounceAddresses(config.bounce_addresses)
        self.log = BounceLog(
            config.bounce_log or config.data_dir / "bounces.jsonl", durable=config.durable
        )
        self._hostname = config.hostname

    def record(
        self,
        body: bytes,
        *,
        bounce_id: str,
        sender: str,
        bounce_to: str,
        peer: str,
        now: float,
    ) -> list[Bounce]:
        """Parse `body` and append its lines to the log (on disk when this returns).
        Blocking: call it from an executor thread."""
        bounces = parse_bounce(body, self._hostname)
        about = {"bounce_id": bounce_id, "bounce_sender": sender, "bounce_to": bounce_to}
        lines = [
            {"time": _timestamp(now), **b.log_fields(), **about, "peer": peer} for b in bounces
        ]
        self.log.append(lines)
        return bounces
