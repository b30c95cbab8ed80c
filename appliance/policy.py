"""Policy: who may connect, send, and relay; answers as typed verdicts.

Called by `appliance.inbound` for each question the Rust listener asks (connect, MAIL,
RCPT). Each check returns a `Verdict`, or an awaitable of one when it must wait for
something (a directory lookup, a rate-limit store): `PolicyResult`. The fast path stays
synchronous so thousands of questions a second cost no task each; later checks (host
access tables, LDAP recipient lookups, rate limits, harvest defence) slot into the
chains below without any change on the Rust side, which only ever sees code, enhanced
status and text.

Relay rule (RFC 5321 section 3.6, RFC 5321 section 7.1 on open relays): a client inside a
listener's relay networks may send anywhere; any other client may send only to the
listener's accepted domains, else 550 5.7.1.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from appliance.config import Config, ListenerConfig


@dataclass(frozen=True, slots=True)
class Verdict:
    """An SMTP answer: reply code, enhanced status (RFC 3463) and human text."""

    code: int
    enhanced: str
    text: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 400

    @staticmethod
    def accept(enhanced: str = "2.0.0", text: str = "Ok") -> Verdict:
        return Verdict(250, enhanced, text)

    @staticmethod
    def tempfail(enhanced: str, text: str, code: int = 451) -> Verdict:
        return Verdict(code, enhanced, text)

    @staticmethod
    def reject(enhanced: str, text: str, code: int = 550) -> Verdict:
        return Verdict(code, enhanced, text)


PolicyResult = Verdict | Awaitable[Verdict]


class Question(Protocol):
    """What policy reads of a listener request (appliance._native.Request has these)."""

    @property
    def listener(self) -> str: ...
    @property
    def peer_ip(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def sender(self) -> str: ...


CONNECT_OK = Verdict(220, "2.0.0", "Ok")
SENDER_OK = Verdict.accept("2.1.0", "Sender ok")
RECIPIENT_OK = Verdict.accept("2.1.5", "Recipient ok")
RELAY_DENIED = Verdict.reject("5.7.1", "relaying denied")


def recipient_domain(address: str) -> str:
    """The domain of a forward path, lower-cased ("" for a bare local part)."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


def domain_matches(domain: str, patterns: tuple[str, ...]) -> bool:
    """`example.com` matches itself; `.example.com` matches every subdomain of it."""
    for pattern in patterns:
        if pattern.startswith("."):
            if domain.endswith(pattern):
                return True
        elif domain == pattern:
            return True
    return False


class Policy:
    """The policy chains of every listener, built once from the configuration."""

    def __init__(self, config: Config) -> None:
        self._listeners: dict[str, ListenerConfig] = {lc.name: lc for lc in config.listeners}
        # A client's relay right depends only on (listener, IP); cache it so a message
        # with many recipients parses the address once.
        self._may_relay = lru_cache(maxsize=65536)(self._compute_may_relay)

    def _compute_may_relay(self, listener: str, peer_ip: str) -> bool:
        settings = self._listeners.get(listener)
        if settings is None:
            return False
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        return any(ip in network for network in settings.relay_networks)

    def on_connect(self, question: Question) -> PolicyResult:
        return CONNECT_OK

    def on_mail(self, question: Question) -> PolicyResult:
        return SENDER_OK

    def on_rcpt(self, question: Question) -> PolicyResult:
        domain = recipient_domain(question.address)
        if not domain:
            # <Postmaster> without a domain must always be accepted (RFC 5321 4.5.1).
            return RECIPIENT_OK
        if self._may_relay(question.listener, question.peer_ip):
            return RECIPIENT_OK
        settings = self._listeners.get(question.listener)
        if settings is not None and domain_matches(domain, settings.accepted_domains):
            return RECIPIENT_OK
        return RELAY_DENIED
