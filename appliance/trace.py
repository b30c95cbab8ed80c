"""Trace headers and mail-loop detection (RFC 5321 sections 4.4 and 6.3).

Every message Sluice accepts gets a Received: header naming the client (HELO name and
IP), this host, the protocol (ESMTPS after STARTTLS, RFC 3848, with the TLS version and
cipher suite in a comment) and the queue id. The listener writes it (smtp_proto::trace,
in front of the body it hands over, so the message is copied once); `received_header`
here makes the same header where Python needs one of its own (a message queued for
only some of its recipients). A message already carrying more than
`MAX_RECEIVED` Received: headers is refused as a loop with 554 5.4.6, the threshold the
product decided on (RFC 5321 section 6.3 suggests at least 100).
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

MAX_RECEIVED = 100

_RECEIVED_LINE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def header_section(body: bytes) -> bytes:
    """The header block of a message: everything up to the first empty line."""
    if body.startswith(b"\r\n"):
        return b""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def count_received(body: bytes, start: int = 0) -> int:
    """Received: lines in the header block of the message that begins at `start` (after
    a header of our own, say), without copying the message."""
    if body.startswith(b"\r\n", start):
        return 0
    end = body.find(b"\r\n\r\n", start)
    end = len(body) if end < 0 else end + 2
    return len(_RECEIVED_LINE.findall(body, start, end))


def is_loop(body: bytes, start: int = 0) -> bool:
    return count_received(body, start) > MAX_RECEIVED


def _clean(text: str) -> str:
    # The HELO name is client-controlled: keep it to printable ASCII with no parentheses
    # or semicolons, so it can't forge the structure of the header.
    return "".join(c if 0x21 <= ord(c) < 0x7F and c not in "();" else "?" for c in text)[:255]


# RFC 5322 dates have whole seconds: format each second once, not once per message.
_last_date: tuple[int, str] = (-1, "")


def _date(now: float) -> str:
    global _last_date
    secs = int(now)
    if _last_date[0] != secs:
        _last_date = (secs, formatdate(secs, localtime=True))
    return _last_date[1]


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    hostname: str,
    esmtp: bool,
    qid: str,
    recipients: list[str],
    tls: str | None = None,
    now: float | None = None,
) -> bytes:
    """Build one folded Received: header (RFC 5321 section 4.4, RFC 5322 section 3.6.7)."""
    literal = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    helo_part = _clean(helo) if helo else "unknown"
    protocol = "ESMTP" if esmtp else "SMTP"
    if tls:
        protocol += "S"
    lines = [f"Received: from {helo_part} ([{literal}])", f"\tby {_clean(hostname)} (Sluice)"]
    with_part = f"\twith {protocol} id {qid}"
    if tls:
        # "TLSv1.3 TLS13_AES_256_GCM_SHA384" from the listener: keep its space.
        with_part += f" ({' '.join(_clean(word) for word in tls.split())})"
    lines.append(with_part)
    if len(recipients) == 1 and "\r" not in recipients[0] and "\n" not in recipients[0]:
        lines.append(f"\tfor <{recipients[0]}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{_date(now if now is not None else time.time())}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
