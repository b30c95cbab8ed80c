"""Mail-loop detection (RFC 5321 section 6.3).

Every message Sluice accepts gets a Received: header (RFC 5321 section 4.4) naming the
client, this host, the protocol and the queue id. The listener writes it, in Rust
(`smtp_proto::trace`), in front of the body it hands over, so the message is copied once.
What stays here is counting the Received: headers the message arrived with: more than
`MAX_RECEIVED` is refused as a loop with 554 5.4.6, the threshold the product decided on
(RFC 5321 section 6.3 suggests at least 100).
"""

from __future__ import annotations

import re

MAX_RECEIVED = 100

_RECEIVED_LINE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


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
