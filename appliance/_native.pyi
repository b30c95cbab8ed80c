"""Type stub for appliance._native, the PyO3 binding built from rust/sluice-native.

The native side owns inbound socket I/O: it accepts, reads, writes, enforces timeouts and
drives the sans-I/O SMTP machine (rust/smtp-proto). It crosses into Python only at policy
points, in batches: `fileno()` becomes readable when requests are pending, `take_requests()`
drains them all, `answer()` returns any number of verdicts in one call.
"""

import os
from typing import Final, Literal

RequestKind = Literal["connect", "mail", "rcpt", "data"]

class Request:
    """One policy question from an SMTP session. Fields not relevant to `kind` are empty."""

    id: Final[int]
    kind: Final[RequestKind]
    session: Final[int]  # connection id, unique for the life of the process
    listener: Final[str]  # listener name from the config
    peer_ip: Final[str]
    peer_port: Final[int]
    local_ip: Final[str]
    local_port: Final[int]
    tls: Final[str | None]  # after STARTTLS: "TLSv1.3 TLS13_AES_256_GCM_SHA384"; else None
    helo: Final[str | None]  # HELO/EHLO name given so far, if any
    esmtp: Final[bool]  # the client greeted with EHLO
    address: Final[str]  # mail: reverse path ("" for <>); rcpt: forward path
    params: Final[list[tuple[str, str | None]]]  # mail / rcpt ESMTP parameters
    sender: Final[str]  # rcpt, data: the accepted reverse path
    mail_params: Final[list[tuple[str, str | None]]]  # data: MAIL parameters
    recipients: Final[list[str]]  # data: the accepted forward paths, in order
    rcpt_params: Final[list[list[tuple[str, str | None]]]]  # data: per recipient
    # data: our Received: header (RFC 5321 4.4, smtp_proto::trace) and then the message
    # as received, dot-unstuffed, CRLF line ends: what the queue stores
    body: Final[bytes]
    qid: Final[str]  # data: the queue id, named in that Received: header
    trace_len: Final[int]  # data: the length of that header at the start of `body`

class ListenerSpec:
    def __init__(
        self,
        name: str,
        address: str,
        hostname: str,
        *,
        max_line_length: int = 4096,
        max_message_size: int = 10485760,
        max_recipients: int = 1000,
        require_helo: bool = False,
        bare_lf_ends_command: bool = True,
        bare_linefeed: Literal["reject", "normalise"] = "reject",
        address_mode: Literal["loose", "strict"] = "loose",
        max_bad_commands: int = 20,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        max_connections: int = 1000,
        max_connections_per_ip: int = 50,
        starttls: bool = False,
        tls_certificate: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Settings of one listener; ValueError for a bad value.

        Connections beyond `max_connections` (all clients) or `max_connections_per_ip`
        (one client address) get 421 4.7.0 and are closed before the greeting.
        With `starttls`, EHLO offers STARTTLS (RFC 3207) using `tls_certificate` and
        `tls_key` (PEM files, both or neither); with neither, a self-signed certificate
        for `hostname` is made in `tls_dir` on first use (self-signed.pem, self-signed.key
        with mode 0600) and reused later. The files are read by `Server()`.
        """

class Server:
    """Binds every listener at construction: OSError if an address cannot be bound,
    TlsError (an OSError) if a listener's certificate or key cannot be used."""

    def __init__(self, listeners: list[ListenerSpec], io_threads: int = 2) -> None: ...
    def fileno(self) -> int: ...
    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """(listener name, ip, port) for each listener, after binding (port 0 resolved)."""
    def take_requests(self) -> list[Request]: ...
    def answer(self, verdicts: list[tuple[int, int, str, str]]) -> None:
        """(request id, reply code, enhanced status, text) for each answered request."""
    def stop_accepting(self) -> None: ...
    def active_sessions(self) -> int: ...
    def shutdown(self) -> None:
        """Close every session: an idle one gets 421 4.3.2, a pending question is refused."""

class AddressError(ValueError): ...

class TlsError(OSError):
    """A listener's TLS certificate or key cannot be used; the message names the listener,
    the setting (tls_certificate / tls_key) and the file."""

def parse_path(text: str, strict: bool = False, utf8: bool = False) -> str:
    """Parse an envelope path with the same parser the listener uses; returns the mailbox
    ("" for <>). Raises AddressError with a readable reason."""

def dot_stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF body for DATA and append the terminating CRLF.CRLF."""
