"""Outbound SMTP client: one connection to one next-hop host, many transactions on it.

Used by the delivery scheduler (unprivileged Python process) to hand queued mail to the
next hop. Follows RFC 5321 (the dialogue, reply syntax in 4.2, client timeouts in
4.5.3.2, dot-stuffing in 4.5.2), RFC 2920 (command pipelining), RFC 3463 (enhanced status
codes), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8), RFC 3207 (STARTTLS,
with the policy of the destination: none, opportunistic, required, required-verified)
and passes RFC 3461 (DSN) parameters through, xtext-encoded again, when the next hop
announces DSN.

TLS policy (docs/delivery.md): "opportunistic" says STARTTLS when offered without
checking the certificate, and when the handshake fails it connects again and sends in
plain text, as Postfix does at security level "may" (mail that would flow in clear
anyway should not stall because TLS is broken); "required" defers (451 4.7.5) when
STARTTLS is missing or fails; "required-verified" also checks the chain against the
system store or `tls_ca_file` and the next hop's name (the MX name, or the route host).

Why our own client instead of smtplib or aiosmtplib: an MTA needs the outcome of every
recipient separately (RCPT replies and the DATA reply, kept per recipient), must treat a
5xx to EHLO *and* HELO as a temporary condition of that host rather than a verdict on the
mail, must tell "the server never answered this transaction" (safe to retry elsewhere)
from "the connection broke after the final dot" and must pipeline and pass DSN parameters
through. Generic client libraries raise on the first failure and hide those distinctions.

Every failure of the connection itself (refused, timeout, 421, dropped, malformed reply)
becomes a synthetic 4xx outcome for the recipients the server had not yet answered: the
caller defers them and tries again later, never bounces them.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from appliance.config import DeliveryConfig, TlsPolicy

_native_dot_stuff: Callable[[bytes], bytes] | None
try:
    from appliance._native import dot_stuff as _native_dot_stuff
except ImportError:  # the extension is not built (tools that only read state)
    _native_dot_stuff = None

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; real servers send longer ones
# (long banners, URLs in rejections), so accept far more but still bound memory.
_READ_LIMIT = 64 * 1024
_MAX_REPLY_LINES = 512
# Most servers accept at least 100 recipients per transaction (RFC 5321 4.5.3.1.8);
# sending more only collects 452 replies.
MAX_RCPT_PER_TRANSACTION = 100

# RFC 3463 section 2:  status-code = class "." subject "." detail
#   class = "2" / "4" / "5";  subject = 1*3digit;  detail = 1*3digit
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)", re.ASCII)
# A one-line reply in ASCII: code, then nothing or a space and the text (parse_reply).
_ONE_LINE = re.compile(rb"([2-5][0-9][0-9])(?: ([\x20-\x7e\t\r]*?))?\r?\n")
# Outside a quoted local part: no angle brackets, spaces or control characters.
_UNQUOTED_FORBIDDEN = re.compile(r"[<> \x00-\x1f\x7f]")
_FORBIDDEN_IN_COMMAND = re.compile(r"[\r\n\x00]")
# Lines of the body that begin with "." (RFC 5321 4.5.2); the first line is handled apart.
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply (RFC 5321 4.2). `remote` is False when we made it up locally
    (connection failure, local refusal), so logs never attribute it to the peer."""

    code: int
    enhanced: str = ""
    text: str = ""
    remote: bool = True

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)


def local_reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text, remote=False)


def parse_reply(lines: Sequence[bytes]) -> Reply:
    """Parse the lines of one (possibly multi-line) reply.

    RFC 5321 4.2:
        Reply-line     = *( Reply-code "-" [ textstring ] CRLF )
                         Reply-code [ SP textstring ] CRLF
        Reply-code     = %x32-35 %x30-35 %x30-39
    Raises ValueError on anything else, including a code that changes between lines.
    """
    if len(lines) == 1 and (one := _ONE_LINE.fullmatch(lines[0])) is not None:
        # The common case, a one-line ASCII reply, without the general loop below.
        text = (one[2] or b"").decode("ascii").strip()
        enhanced = ""
        if text[:1] == chr(one[1][0]) and (m := _ENHANCED.match(text)) is not None:
            enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            text = text[m.end() :]
        return Reply(int(one[1]), enhanced, text)
    if not lines:
        raise ValueError("empty reply")
    code_text = ""
    texts: list[str] = []
    enhanced = ""
    for n, raw in enumerate(lines):
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        head = line[:3]
        if len(head) != 3 or not head.isascii() or not head.isdigit() or head[0] not in "2345":
            raise ValueError(f"malformed reply line {line[:80]!r}")
        sep = line[3:4]
        last = n == len(lines) - 1
        if (sep == "-") == last or sep not in ("", " ", "-"):
            raise ValueError(f"malformed reply line {line[:80]!r}")
        if code_text and head != code_text:
            raise ValueError(f"reply code changes inside a reply: {line[:80]!r}")
        code_text = head
        text = line[4:].strip()
        # An enhanced code starts with the reply's class digit; skip the regex otherwise.
        if text[:1] == head[0] and (m := _ENHANCED.match(text)) is not None:
            enhanced = enhanced or f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            text = text[m.end() :]
        if text:
            texts.append(text)
    return Reply(int(code_text), enhanced, " ".join(texts))


def dot_stuff(body: bytes) -> bytes:
    """The DATA payload for `body`, ending with the CRLF.CRLF terminator (RFC 5321 4.5.2).

    Stored bodies already have CRLF line ends; a bare CR or LF that slipped through is
    normalised to CRLF anyway, because relaying one would let a lenient next hop see a
    message end we never meant (SMTP smuggling). Done by the Rust code the listener uses
    (`smtp_proto::stuffing`, one pass, without the GIL) when the extension is built.
    """
    if _native_dot_stuff is not None:
        return _native_dot_stuff(body)
    return _py_dot_stuff(body)


def _py_dot_stuff(body: bytes) -> bytes:
    """dot_stuff() in Python, for tools that run without the native module."""
    if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
        body = _BARE_LF.sub(b"\r\n", _BARE_CR.sub(b"\r\n", body))
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


@dataclass(frozen=True)
class Timeouts:
    """Client timeouts in seconds (RFC 5321 4.5.3.2: 5 minutes per command, 10 minutes
    for the reply to the final dot; sending the body is bounded by `data` too)."""

    connect: float = 30.0
    command: float = 300.0
    data: float = 600.0

    @classmethod
    def from_config(cls, delivery: DeliveryConfig) -> Timeouts:
        return cls(delivery.connect_timeout, delivery.command_timeout, delivery.data_timeout)


class SmtpConnectError(Exception):
    """The host could not be used for mail at all (TCP, greeting, EHLO/HELO); always
    temporary for the mail: the caller tries the next host or defers."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply or local_reply(451, "4.4.1", message)


class _SessionLost(Exception):
    """The connection is unusable; `reply` is what unanswered recipients get."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass
class DeliveryResult:
    """Outcome of one transaction. `recipients[i]` is the final reply for recipient i:
    its RCPT reply if that was not positive, else the DATA reply (or the reply to the
    final dot); a local 4xx when the session broke before the server answered."""

    recipients: list[Reply]
    mail: Reply | None = None
    rcpt: list[Reply | None] = field(default_factory=list)
    data: Reply | None = None
    session_lost: bool = False
    # True when the server said nothing about this transaction before the connection
    # failed: re-sending it on a fresh connection cannot duplicate the message.
    unanswered: bool = False


# RFC 5321 4.1.2:  Quoted-string = DQUOTE *QcontentSMTP DQUOTE
#   QcontentSMTP = qtextSMTP / quoted-pairSMTP;  quoted-pairSMTP = %d92 %d32-126
#   qtextSMTP = %d32-33 / %d35-91 / %d93-126   (and UTF-8 under RFC 6531)
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"')


def address_ok(address: str) -> bool:
    """Whether `address` can go between the brackets of MAIL FROM/RCPT TO as one path.

    The queue keeps a quoted local part as written, quotes and backslashes included
    (`"john >doe"@example.net`); such an address is sent as it is, and only outside
    the quotes are "<", ">", spaces and controls refused. CR, LF and NUL are refused
    everywhere, so no address can ever add a command line.
    """
    if _FORBIDDEN_IN_COMMAND.search(address):
        return False
    rest = address
    if address.startswith('"'):
        m = _QUOTED_LOCAL.match(address)
        if m is None:
            return False
        rest = address[m.end() :]
        if not rest.startswith("@"):
            return False
    return _UNQUOTED_FORBIDDEN.search(rest) is None


def xtext(value: str) -> str:
    """RFC 3461 section 4: xtext = *( xchar / hexchar ), where xchar is "!" to "~" except
    "+" and "=", and hexchar = "+" 2HEXCHAR (upper case). The queue keeps ENVID and ORCPT
    decoded, so they are encoded again on the way out."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def tls_context(policy: TlsPolicy, ca_file: Path | None = None) -> ssl.SSLContext | None:
    """The client context for a destination's TLS policy (None for "none")."""
    if policy == "none":
        return None
    if policy == "required-verified":
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    # Opportunistic and plain "required" encrypt against passive listeners only: most
    # MX certificates do not verify (RFC 7435 opportunistic security).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _esmtp_param(keyword: str, value: str | None) -> str | None:
    """Render one ESMTP parameter, or None if it cannot be sent safely."""
    text = keyword if value is None else f"{keyword}={value}"
    if not text.isascii() or any(c.isspace() or c in "<>" or ord(c) < 32 for c in text):
        return None
    return text


class SmtpConnection:
    """One client connection. Use: `await connect(...)`, then `send(...)` repeatedly
    while `usable`, then `quit()`."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._timeouts = Timeouts()
        self.host = ""
        self.port = 0
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.messages = 0
        # "TLSv1.3 TLS_AES_256_GCM_SHA384" once STARTTLS succeeded, else "".
        self.tls = ""
        # Opportunistic TLS failed its handshake and this connection is the plain retry.
        self.tls_fallback = False
        self._last_raw: list[bytes] = []  # the lines of the last reply (EHLO keywords)
        self._sending = False  # what a _Deadline that runs out was waiting for
        # Bytes read but not yet parsed, and replies parsed but not yet consumed (with
        # their raw lines): pipelined replies arrive together and are read in one go.
        self._inbuf = b""
        # A malformed reply is queued as its error, raised only when its turn comes
        # (what follows a STARTTLS 220 may be the start of a broken handshake).
        self._replies: deque[tuple[Reply | _SessionLost, list[bytes]]] = deque()
        # The watchdog (see _arm): when the current exchange must be over, and the one
        # timer per connection that checks it.
        self._deadline = math.inf
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False
        # A transaction was opened (MAIL accepted) and not finished by a final reply.
        self._dirty = False

    # -- connection ----------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return (
            self._writer is not None
            and self._reader is not None
            and not self._writer.is_closing()
            and not self._reader.at_eof()
        )

    async def connect(
        self,
        host: str,
        port: int,
        helo_name: str,
        timeouts: Timeouts,
        *,
        tls: TlsPolicy = "none",
        context: ssl.SSLContext | None = None,
        tls_name: str | None = None,
    ) -> Reply:
        """Open the TCP connection, read the greeting, say EHLO (HELO if EHLO gets 5xx),
        and STARTTLS as the `tls` policy says (`tls_name`: the name the certificate must
        carry under required-verified; default `host`).

        Raises SmtpConnectError for anything that makes this host unusable now: refused,
        timeout, a greeting other than 220, or a refusal of both EHLO and HELO (a 5xx to
        the greeting commands says nothing about our mail, so it is not a bounce), or TLS
        missing or failing where the policy requires it.
        """
        if tls != "none" and context is None:
            context = tls_context(tls)
        greeting = await self._open(host, port, helo_name, timeouts)
        if tls == "none" or context is None:
            return greeting
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        required = tls != "opportunistic"
        if "STARTTLS" not in self.extensions:
            if required:
                await self.quit()
                raise SmtpConnectError(
                    f"{where} does not offer STARTTLS",
                    local_reply(451, "4.7.5", f"TLS required but {where} does not offer STARTTLS"),
                )
            return greeting
        try:
            reply = await self._command("STARTTLS", timeouts.command)
        except _SessionLost as exc:
            self.close()
            raise SmtpConnectError(f"{where}: {exc.reply.text}", exc.reply) from None
        if reply.code != 220:
            if required:
                await self.quit()
                raise SmtpConnectError(
                    f"{where} refused STARTTLS: {reply}",
                    local_reply(451, "4.7.5", f"TLS required but {where} refused STARTTLS"),
                )
            return greeting  # the session is still in plain text and usable
        # RFC 3207 section 4.2: anything the server sent after its 220 is not to be
        # trusted (a response injected in clear text before the handshake): drop it.
        self._inbuf = b""
        self._replies.clear()
        error = await self._handshake(context, tls_name or host, timeouts)
        if error is None:
            try:
                reply = await self._command(f"EHLO {helo_name}", timeouts.command)
            except _SessionLost as exc:
                self.close()
                raise SmtpConnectError(f"{where}: {exc.reply.text}", exc.reply) from None
            if not reply.positive:
                await self.quit()
                raise SmtpConnectError(
                    f"{where} refused EHLO after STARTTLS: {reply}", self._as_transient(reply)
                )
            self.extensions = self._parse_ehlo(reply)
            return greeting
        self.close()
        if required:
            raise SmtpConnectError(
                f"TLS with {where} failed: {error}",
                local_reply(451, "4.7.5", f"TLS handshake with {where} failed: {error}"),
            )
        # Opportunistic: the next hop takes mail in clear text, so do that (as Postfix).
        greeting = await self._open(host, port, helo_name, timeouts)
        self.tls_fallback = True
        return greeting

    async def _handshake(
        self, context: ssl.SSLContext, name: str, timeouts: Timeouts
    ) -> str | None:
        """Upgrade the stream to TLS; the reason as text when that failed, else None."""
        writer = self._writer
        assert writer is not None
        try:
            async with asyncio.timeout(timeouts.command):
                await writer.start_tls(context, server_hostname=name)
        except TimeoutError:
            return "handshake timed out"
        except ssl.SSLCertVerificationError as exc:
            return f"certificate not verified: {exc.verify_message or exc.reason}"
        except (ssl.SSLError, OSError, ConnectionError) as exc:
            return f"{type(exc).__name__}: {exc}"
        transport = writer.transport
        version = transport.get_extra_info("ssl_object")
        if isinstance(version, ssl.SSLObject | ssl.SSLSocket):
            cipher = version.cipher()
            self.tls = " ".join(
                p for p in (version.version() or "", cipher[0] if cipher else "") if p
            )
        else:
            self.tls = "TLS"
        return None

    async def _open(self, host: str, port: int, helo_name: str, timeouts: Timeouts) -> Reply:
        """TCP connect, greeting, EHLO or HELO: the plain-text part of `connect`."""
        if not helo_name or _FORBIDDEN_IN_COMMAND.search(helo_name) or " " in helo_name:
            raise ValueError(f"invalid HELO name {helo_name!r}")
        self.host, self.port, self._timeouts = host, port, timeouts
        self.extensions, self.esmtp, self.tls = {}, False, ""
        self._inbuf, self._timed_out = b"", False
        self._replies.clear()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with asyncio.timeout(timeouts.connect):
                self._reader, self._writer = await asyncio.open_connection(
                    host, port, limit=_READ_LIMIT
                )
        except TimeoutError:
            raise SmtpConnectError(f"connect to {where} timed out") from None
        except OSError as exc:
            raise SmtpConnectError(f"connect to {where} failed: {exc.strerror or exc}") from None
        try:
            self.greeting = await self._read_reply(timeouts.command)
            if self.greeting.code != 220:
                raise SmtpConnectError(
                    f"{where} greeted with {self.greeting}", self._as_transient(self.greeting)
                )
            reply = await self._command(f"EHLO {helo_name}", timeouts.command)
            if reply.positive:
                self.esmtp = True
                self.extensions = self._parse_ehlo(reply)
                return self.greeting
            if reply.permanent:
                # RFC 5321 3.2: an old server that does not know EHLO answers 5xx.
                reply = await self._command(f"HELO {helo_name}", timeouts.command)
                if reply.positive:
                    return self.greeting
            raise SmtpConnectError(f"{where} refused HELO/EHLO: {reply}", self._as_transient(reply))
        except _SessionLost as exc:
            self.close()
            raise SmtpConnectError(f"{where}: {exc.reply.text}", exc.reply) from None
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _as_transient(reply: Reply) -> Reply:
        """A connection-stage refusal defers the mail; keep the peer's words but not 5xx."""
        if reply.transient:
            return reply
        return Reply(451, "4.4.0", f"(host said: {reply})", remote=False)

    def _parse_ehlo(self, reply: Reply) -> dict[str, str]:
        # RFC 5321 4.1.1.1: the first line greets, each further line names an extension.
        extensions: dict[str, str] = {}
        for raw in self._last_raw[1:]:
            words = raw[4:].decode("utf-8", "replace").strip().split(None, 1)
            if words:
                extensions[words[0].upper()] = words[1] if len(words) > 1 else ""
        return extensions

    async def quit(self) -> None:
        """Say QUIT politely (short wait for the reply), then close."""
        if self.usable:
            try:
                await self._command("QUIT", min(self._timeouts.command, 10.0))
            except _SessionLost:
                pass
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._reader = None
        self._deadline = math.inf
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # -- mail transaction ------------------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        mail_params: Sequence[tuple[str, str | None]] = (),
        rcpt_params: Sequence[Sequence[tuple[str, str | None]]] | None = None,
    ) -> DeliveryResult:
        """Run one mail transaction and return the outcome for every recipient.

        `body` is the message as stored: dot-unstuffed, CRLF line ends. Never raises for
        the peer's behaviour; a broken session shows up in the result.
        """
        count = len(recipients)
        outcome: list[Reply | None] = [None] * count
        if not address_ok(sender):
            bad = local_reply(553, "5.1.7", "sender address contains forbidden characters")
            return DeliveryResult([bad] * count)
        needs_utf8 = not sender.isascii()
        if needs_utf8 and "SMTPUTF8" not in self.extensions:
            bad = local_reply(553, "5.6.7", "next hop does not support SMTPUTF8 (sender)")
            return DeliveryResult([bad] * count)
        for i, rcpt in enumerate(recipients):
            if not rcpt or not address_ok(rcpt):
                outcome[i] = local_reply(553, "5.1.3", "recipient address has forbidden characters")
            elif not rcpt.isascii():
                if "SMTPUTF8" in self.extensions:
                    needs_utf8 = True
                else:
                    outcome[i] = local_reply(553, "5.6.7", "next hop does not support SMTPUTF8")
        payload = dot_stuff(body)
        size_limit = self.extensions.get("SIZE", "")
        if size_limit.isdigit() and 0 < int(size_limit) < len(body):
            # RFC 1870: the server told us its fixed maximum; trying cannot succeed.
            too_big = local_reply(552, "5.3.4", f"message size exceeds next hop limit {size_limit}")
            return DeliveryResult([o or too_big for o in outcome])
        eight_bit = not body.isascii()
        if eight_bit and "8BITMIME" not in self.extensions:
            # RFC 6152 section 3: convert to 7 bit or return the message; Sluice returns it
            # (docs/delivery.md: conversion would break DKIM body hashes).
            no_8bit = local_reply(
                554, "5.6.3", "message has 8-bit content and the next hop does not offer 8BITMIME"
            )
            return DeliveryResult([o or no_8bit for o in outcome])
        wanted = [i for i in range(count) if outcome[i] is None]
        if not wanted:
            return DeliveryResult([o for o in outcome if o is not None])

        mail_cmd = f"MAIL FROM:<{sender}>" + self._mail_params(
            mail_params, len(body), needs_utf8, eight_bit
        )
        rcpt_cmds = [
            f"RCPT TO:<{recipients[i]}>"
            + self._rcpt_params(rcpt_params[i] if rcpt_params is not None else ())
            for i in wanted
        ]
        result = DeliveryResult([], rcpt=[None] * count)
        t = self._timeouts
        try:
            if self._dirty:
                reset = await self._command("RSET", t.command)
                if not reset.positive:
                    raise _SessionLost(local_reply(451, "4.4.0", f"RSET refused: {reset}"))
                self._dirty = False
            data: Reply | None = None
            if "PIPELINING" in self.extensions:
                # RFC 2920 3.1: MAIL, every RCPT and DATA go in one write; the replies come
                # back in order. DATA is the last command of the group. One deadline for
                # the group, moved on as replies arrive: each reply still gets the command
                # timeout from the one before it.
                batch = [mail_cmd, *rcpt_cmds, "DATA"]
                async with _Deadline(self, t.command) as deadline:
                    await self._send_raw(("\r\n".join(batch) + "\r\n").encode())
                    result.mail = await self._receive()
                    for i in wanted:
                        deadline.progress()
                        result.rcpt[i] = await self._receive()
                    deadline.progress()
                    data = await self._receive()
                self._dirty = result.mail.positive
                accepted = result.mail.positive and any(
                    r is not None and r.positive for r in result.rcpt
                )
                if data.code == 354 and not accepted:
                    # Server wants a body although nobody will get it: end it empty.
                    await self._write(b".\r\n", t.data)
                    await self._read_reply(t.data)
                    data = local_reply(554, "5.5.0", "no valid recipients")
            else:
                result.mail = await self._command(mail_cmd, t.command)
                if result.mail.positive:
                    self._dirty = True
                    for i, cmd in zip(wanted, rcpt_cmds, strict=True):
                        result.rcpt[i] = await self._command(cmd, t.command)
                    if any(r is not None and r.positive for r in result.rcpt):
                        data = await self._command("DATA", t.command)
            if data is not None and data.code == 354:
                # Sending the body and waiting for the reply to the final dot: one deadline
                # of the data timeout for each (the second starts when the body is out).
                async with _Deadline(self, t.data) as deadline:
                    await self._send_raw(payload)
                    deadline.progress()
                    data = await self._receive()
                self._dirty = False
                self.messages += 1
            result.data = data
        except _SessionLost as exc:
            result.session_lost = True
            result.unanswered = result.mail is None
            self.close()
            lost = exc.reply
            result.data = None
            for i in wanted:
                outcome[i] = self._final(result.mail, result.rcpt[i], None, lost)
            result.recipients = [o or lost for o in outcome]
            return result
        never = local_reply(451, "4.3.0", "transaction ended without a reply for recipient")
        for i in wanted:
            outcome[i] = self._final(result.mail, result.rcpt[i], result.data, never)
        result.recipients = [o or never for o in outcome]
        return result

    @staticmethod
    def _final(
        mail: Reply | None, rcpt: Reply | None, data: Reply | None, fallback: Reply
    ) -> Reply:
        if mail is not None and not mail.positive:
            return mail
        if rcpt is not None and not rcpt.positive:
            return rcpt
        if mail is None or rcpt is None or data is None:
            return fallback
        return data

    def _mail_params(
        self,
        params: Sequence[tuple[str, str | None]],
        size: int,
        utf8: bool,
        eight_bit: bool = False,
    ) -> str:
        out: list[str] = []
        ext = self.extensions
        if "SIZE" in ext:
            out.append(f"SIZE={size}")
        body_said = False
        for key, value in params:
            k = key.upper()
            if k == "BODY" and "8BITMIME" in ext and (value or "").upper() == "8BITMIME":
                body_said = True
            elif k == "ENVID" and "DSN" in ext and value is not None:
                value = xtext(value)
            elif k != "RET" or "DSN" not in ext:
                continue
            if (text := _esmtp_param(k, value)) is not None:
                out.append(text)
        if eight_bit and not body_said:
            # 8-bit content sent without BODY=8BITMIME by a sloppy client: declare it.
            out.append("BODY=8BITMIME")
        if utf8:
            out.append("SMTPUTF8")
        return "".join(" " + p for p in out)

    def _rcpt_params(self, params: Sequence[tuple[str, str | None]]) -> str:
        if "DSN" not in self.extensions:
            return ""
        out = []
        for key, value in params:
            k = key.upper()
            if k == "ORCPT" and value is not None and ";" in value:
                # Stored decoded as "addr-type;address": encode the address again.
                kind, _, address = value.partition(";")
                value = f"{kind};{xtext(address)}"
            elif k != "NOTIFY":
                continue
            if (text := _esmtp_param(k, value)) is not None:
                out.append(text)
        return "".join(" " + p for p in out)

    # -- wire ------------------------------------------------------------------------------

    async def _command(self, line: str, seconds: float) -> Reply:
        async with _Deadline(self, seconds) as deadline:
            await self._send_raw(line.encode("utf-8") + b"\r\n")
            deadline.progress()
            return await self._receive()

    async def _write(self, data: bytes, seconds: float) -> None:
        async with _Deadline(self, seconds):
            await self._send_raw(data)

    async def _read_reply(self, seconds: float) -> Reply:
        async with _Deadline(self, seconds):
            return await self._receive()

    async def _send_raw(self, data: bytes) -> None:
        """Write `data`; bounded by the caller's _Deadline, not by a timeout of its own."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise self._lost("connection already closed")
        self._sending = True
        try:
            writer.write(data)
            await writer.drain()
        except OSError as exc:
            raise self._lost(f"connection lost: {exc.strerror or exc}") from None
        if writer.transport.is_closing():
            # drain() returns quietly when the transport was aborted under it (the
            # watchdog does that): the write did not complete.
            raise self._lost("connection lost while sending")
        self._sending = False

    async def _receive(self) -> Reply:
        """Read one reply; bounded by the caller's _Deadline, not by a timeout of its own.

        Reads whatever the server has sent (the replies to a pipelined group usually
        come in one segment) and parses every complete reply in it; the next calls take
        the rest without reading again.
        """
        self._sending = False
        while not self._replies:
            reader = self._reader
            if reader is None:
                raise self._lost("connection already closed")
            try:
                data = await reader.read(_READ_LIMIT)
            except OSError as exc:
                raise self._lost(f"connection lost: {exc}") from None
            if not data:
                raise self._lost("connection closed by next hop")
            self._inbuf += data
            self._split_replies()
        reply, self._last_raw = self._replies.popleft()
        if isinstance(reply, _SessionLost):
            raise reply
        if reply.code == 421:
            # RFC 5321 3.8: the server is closing the channel; everything after is lost.
            raise _SessionLost(reply)
        return reply

    def _split_replies(self) -> None:
        """Move every complete reply from the input buffer to the reply queue."""
        buf = self._inbuf
        start = pos = 0  # start of the reply being collected; start of the next line
        lines: list[bytes] = []
        while (end := buf.find(b"\n", pos)) >= 0:
            line = buf[pos : end + 1]
            pos = end + 1
            lines.append(line)
            if line[3:4] == b"-" and len(lines) < _MAX_REPLY_LINES:
                continue  # a continuation line: the reply goes on
            try:
                self._replies.append((parse_reply(lines), lines))
            except ValueError as exc:
                lost = _SessionLost(local_reply(451, "4.5.0", f"protocol error: {exc}"))
                self._replies.append((lost, lines))
                self._inbuf = b""
                return  # nothing after a malformed reply can be trusted
            lines = []
            start = pos
        self._inbuf = buf[start:]
        if len(self._inbuf) > _READ_LIMIT:
            raise _SessionLost(local_reply(451, "4.4.2", "connection lost: reply too long"))

    def _lost(self, text: str) -> _SessionLost:
        """The connection is gone: say why, or that the watchdog cut it (a timeout)."""
        if self._timed_out:
            text = (
                "timeout sending to next hop"
                if self._sending
                else "timeout waiting for next hop reply"
            )
        return _SessionLost(local_reply(451, "4.4.2", text))

    # -- the watchdog ----------------------------------------------------------------------
    #
    # One timer per connection instead of an asyncio.timeout per exchange (those were a
    # visible share of the delivery process's CPU): an exchange only moves `_deadline`;
    # the timer, when it fires early, re-arms itself at the current deadline, and once
    # the deadline has passed it aborts the transport. That ends the pending read or
    # write, and `_lost` reports a timeout.

    def _arm(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        watchdog = self._watchdog
        if watchdog is not None and watchdog.when() > self._deadline:
            watchdog.cancel()  # armed for a longer exchange: this one must end sooner
            watchdog = None
        if watchdog is None:
            self._watchdog = loop.call_at(self._deadline, self._check_deadline)

    def _disarm(self) -> None:
        self._deadline = math.inf

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self._deadline == math.inf or self._writer is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._watchdog = loop.call_at(self._deadline, self._check_deadline)
            return
        self._timed_out = True
        self._writer.transport.abort()


class _Deadline:
    """The time limit of one exchange (several writes and replies) on a connection.

    `progress()` after each step gives the next step `seconds` again, as a timeout per
    command would. The connection's watchdog enforces it (SmtpConnection._arm); when it
    runs out, the pending read or write fails and the connection is lost with a reply
    saying whether we were sending or waiting.
    """

    __slots__ = ("_conn", "_seconds")

    def __init__(self, conn: SmtpConnection, seconds: float) -> None:
        self._conn = conn
        self._seconds = seconds

    async def __aenter__(self) -> _Deadline:
        self._conn._arm(self._seconds)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._conn._disarm()

    def progress(self) -> None:
        self._conn._arm(self._seconds)
