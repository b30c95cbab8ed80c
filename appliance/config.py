"""Sluice configuration: one TOML file, read once and validated completely at start-up.

The operator (root or the sluice service user) names the file with `--config`; without one
the built-in default runs a single listener on 127.0.0.1:2525 that relays for loopback
only, queues under `./var` (or $SLUICE_DATA) and delivers by MX. Everything downstream
receives frozen dataclasses, so no component re-parses or re-validates settings.

Validation is strict on purpose: an unknown key is an error, not a silently ignored typo,
because a misspelt `relay_networks` on a mail gateway is an open relay or a dead one.
Every error names the file, the dotted key path (`listeners[0].relay_networks[1]`) and
what was expected, so the operator can fix it without reading this code.

Timeouts default to the values RFC 5321 section 4.5.3.2 recommends for an SMTP client
(5 minutes per command, 10 minutes for the end of DATA). The TOML grammar is TOML 1.0
(parsed by the standard library's tomllib).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_SOURCE = "<built-in default>"
DEFAULT_RELAY_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


class ConfigError(Exception):
    """The configuration file cannot be used; the message is meant for the operator."""


@dataclass(frozen=True)
class ListenerConfig:
    """One SMTP listening socket and the per-listener leniency settings (see DESIGN.md)."""

    name: str = "inbound"
    address: str = "127.0.0.1:2525"
    relay_networks: tuple[IPNetwork, ...] = DEFAULT_RELAY_NETWORKS
    accepted_domains: tuple[str, ...] = ()
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_line_length: int = 4096
    require_helo: bool = False
    bare_lf_ends_command: bool = True
    bare_linefeed: Literal["reject", "normalise"] = "reject"
    address_parsing: Literal["loose", "strict"] = "loose"
    max_bad_commands: int = 20
    command_timeout: float = 300
    data_timeout: float = 600
    max_connections: int = 1000
    # One client address may hold this many sessions; more get 421 4.7.0.
    max_connections_per_ip: int = 50
    # STARTTLS (RFC 3207) with tls_certificate / tls_key (PEM), or without them with a
    # self-signed certificate for the hostname made on first start in <data_dir>/tls/.
    starttls: bool = True
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    # The bounce profile (retry and expiry schedule) stored with every message accepted
    # here; a destination's own `bounce_profile` overrides it (docs/delivery.md).
    bounce_profile: str = "default"

    @property
    def host_port(self) -> tuple[str, int]:
        """`address` split into (host, port); IPv6 hosts are returned without brackets."""
        return split_host_port(self.address, default_port=None)


@dataclass(frozen=True)
class Route:
    """Static next hops for a domain, tried in order instead of the domain's MX records.

    `use_dns` (written `["dns"]` in the file, IronPort's USEDNS) means: look the domain's
    MX records up after all, even where a ".parent" or "*" route would otherwise apply.
    """

    hosts: tuple[tuple[str, int], ...] = ()
    use_dns: bool = False


TlsPolicy = Literal["none", "opportunistic", "required", "required-verified"]
TLS_POLICIES: tuple[str, ...] = ("none", "opportunistic", "required", "required-verified")


@dataclass(frozen=True)
class BounceProfile:
    """When to retry deferred mail and when to give up (IronPort's "bounce profile").

    Retries back off exponentially with jitter from `retry_initial` to `retry_max`; a
    recipient still deferred `max_queue_time` after arrival bounces (4.4.7). After
    `delay_warning` seconds (0: never) one "delayed" DSN (RFC 3464) is sent per message
    to a sender who asked for NOTIFY=DELAY or gave no NOTIFY.
    """

    name: str = "default"
    retry_initial: float = 60
    retry_max: float = 3600
    max_queue_time: float = 5 * 86400
    delay_warning: float = 0


@dataclass(frozen=True)
class DestinationConfig:
    """Destination controls for one recipient domain (`[destinations."example.com"]`).

    Limits apply to each recipient domain separately, also when the settings come from a
    ".parent" or "*" table. None means: the [delivery] setting of the same name.
    """

    max_connections: int | None = None
    messages_per_connection: int | None = None
    recipients_per_message: int = 100
    # 0: no rate limit. A float only in a delivery process's share (`process_share`).
    messages_per_minute: float = 0
    tls: TlsPolicy = "opportunistic"
    tls_ca_file: Path | None = None  # for required-verified; default: the system store
    bounce_profile: str | None = None  # overrides the listener's profile
    # Adaptive back-off: after `pause_after` consecutive failed attempts (4xx replies or
    # unusable hosts) the destination is paused, for pause_initial doubling to pause_max.
    pause_after: int = 5
    pause_initial: float = 60
    pause_max: float = 3600


@dataclass(frozen=True)
class DeliveryConfig:
    """Outbound SMTP client settings (timeouts per RFC 5321 section 4.5.3.2)."""

    max_connections: int = 50
    connect_timeout: float = 30
    command_timeout: float = 300
    data_timeout: float = 600
    retry_initial: float = 60
    retry_max: float = 3600
    mx_port: int = 25
    helo_name: str | None = None
    messages_per_connection: int = 100
    # Delivery processes, each delivering its own shard of the queue (docs/delivery.md).
    processes: int = 1


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; `source` is the file path or DEFAULT_SOURCE."""

    source: str
    hostname: str
    data_dir: Path
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    routes: dict[str, Route] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    max_queue_time: float = 5 * 86400
    postmaster: str | None = None
    durable: bool = True
    log_file: str | None = None
    metrics_address: str | None = None
    # Incoming bounces (docs/bounces.md): mail to one of these addresses is parsed and
    # recorded in `bounce_log` (None: <data_dir>/bounces.jsonl) instead of relayed.
    # Entries are whole addresses or "local+*@domain" (VERP-style tags); empty: off.
    bounce_addresses: tuple[str, ...] = ()
    bounce_log: Path | None = None
    dns_servers: tuple[tuple[str, int], ...] = ()
    dns_timeout: float = 5.0
    # Named bounce profiles; "default" is built from max_queue_time and the [delivery]
    # retry keys unless the file has its own [bounce_profiles.default].
    bounce_profiles: dict[str, BounceProfile] = field(default_factory=dict)
    # Destination controls by pattern: "example.com", ".example.com" or "*".
    destinations: dict[str, DestinationConfig] = field(default_factory=dict)

    def profile(self, name: str | None) -> BounceProfile:
        """The bounce profile called `name`; the default one for None, "" or a name that
        is no longer configured (a message queued under an older configuration)."""
        if name and name in self.bounce_profiles:
            return self.bounce_profiles[name]
        if "default" in self.bounce_profiles:
            return self.bounce_profiles["default"]
        return BounceProfile(
            name="default",
            retry_initial=self.delivery.retry_initial,
            retry_max=self.delivery.retry_max,
            max_queue_time=self.max_queue_time,
        )

    def destination(self, domain: str) -> tuple[str, DestinationConfig]:
        """The destination table that applies to `domain` and its pattern: the domain
        itself, then ".parent" patterns from the nearest parent up, then "*"."""
        domain = domain.lower().rstrip(".")
        table = self.destinations
        if domain in table:
            return domain, table[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            pattern = "." + ".".join(labels[i:])
            if pattern in table:
                return pattern, table[pattern]
        return "*", table.get("*", DestinationConfig())


def process_share(config: Config) -> Config:
    """The configuration each of `[delivery] processes` delivery processes runs on.

    Every process enforces its limits on its own, so the outbound limits are divided
    between them: `[delivery] max_connections` and each destination's `max_connections`
    become `limit // N` (at least 1, so with N > 1 a limit below N allows up to N
    connections in all), each destination's `messages_per_minute` becomes `rate / N`.
    With one process (the default) the configuration is returned as it is and its limits
    hold exactly.
    """
    n = config.delivery.processes
    if n <= 1:
        return config

    def connections(limit: int | None) -> int | None:
        return None if limit is None else max(1, limit // n)

    def rate(per_minute: float) -> float:
        share = per_minute / n
        return int(share) if share.is_integer() else share

    destinations = {
        pattern: replace(
            dest,
            max_connections=connections(dest.max_connections),
            messages_per_minute=rate(dest.messages_per_minute),
        )
        for pattern, dest in config.destinations.items()
    }
    delivery = replace(
        config.delivery, max_connections=max(1, config.delivery.max_connections // n)
    )
    return replace(config, delivery=delivery, destinations=destinations)


# ---------------------------------------------------------------------------------------
# Value parsers. Each takes the raw TOML value and returns the typed value or raises
# _Invalid(expectation); the caller adds the file and the key path.


class _Invalid(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _describe(value: object) -> str:
    """Render a TOML value the way the operator wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Invalid("expected a positive integer")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _Invalid("expected a port number 1-65535")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("expected a non-empty string")
    return value


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.ASCII)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


MAX_DURATION = 3650 * 86400.0


def parse_duration(value: object) -> float:
    """A duration: seconds as a number, or a string such as "30s", "5m", "2h", "5d"."""
    expected = 'expected a duration (seconds, or a string like "30s", "5m", "2h", "5d")'
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise _Invalid(expected)
    # A zero timeout would make every wait fail at once; infinity would never fire. Ten
    # years is past any sane queue time or timeout, and keeps dates computed from a
    # duration (Will-Retry-Until in a DSN) inside what datetime can represent.
    if not 0 < seconds <= MAX_DURATION:
        raise _Invalid(expected + " greater than zero and at most 3650d")
    return seconds


# RFC 1035 section 2.3.1 (with RFC 1123 section 2.1 allowing a leading digit):
#   <label> ::= <let-dig> [ [ <ldh-str> ] <let-dig> ]
# Underscores are tolerated because real hostnames carry them and nothing here relies on
# their absence.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", re.ASCII)


def _is_hostname(name: str) -> bool:
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _domain(value: object) -> str:
    if not isinstance(value, str) or not _is_hostname(value):
        raise _Invalid("expected a domain name")
    return value.lower().removesuffix(".")


def _domain_pattern(value: object) -> str:
    """A domain, or ".example.com" meaning every subdomain of example.com."""
    if isinstance(value, str) and value.startswith(".") and _is_hostname(value[1:]):
        return value.lower().removesuffix(".")
    if isinstance(value, str) and _is_hostname(value):
        return value.lower().removesuffix(".")
    raise _Invalid('expected a domain name (".example.com" for its subdomains)')


def split_host_port(text: str, *, default_port: int | None) -> tuple[str, int]:
    """Split "host:port", "[v6]:port" (or, with a default port, "host" and "[v6]").

    Raises ValueError with the expectation when the text is malformed. Where a port is
    required, a bare IPv6 literal is refused: "::1:25" could be an address or an address
    and a port; where the port is optional, the whole text is taken as the address.
    """
    expected = 'expected "host:port" (IPv6 as "[::1]:25")'
    if default_port is not None:
        expected = 'expected "host" or "host:port" (IPv6 as "[::1]:25")'
    if default_port is not None and ":" in text and _is_ip(text):
        # With a default port a bare IPv6 literal is unambiguous enough: the whole text
        # is an address ("::1:25" therefore means the address ::1:25, port default).
        return text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(expected)
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(expected) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, rest = text, ""
        else:
            rest = ":" + port_text
        if ":" in host or not host:
            raise ValueError(expected)
        if not _is_ip(host) and not _is_hostname(host):
            raise ValueError(expected)
    if rest == "":
        if default_port is None:
            raise ValueError(expected)
        return host, default_port
    if not rest.startswith(":") or not rest[1:].isascii() or not rest[1:].isdigit():
        raise ValueError(expected)
    port = int(rest[1:])
    # Port 0 lets tests bind an ephemeral port; it is never valid as a destination.
    if port > 65535 or (port == 0 and default_port is not None):
        raise ValueError(expected + " with a port 1-65535")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_port(default_port: int | None) -> Callable[[object], tuple[str, int]]:
    def parse(value: object) -> tuple[str, int]:
        if not isinstance(value, str):
            raise _Invalid('expected a "host:port" string')
        try:
            return split_host_port(value, default_port=default_port)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None

    return parse


def _listen_address(value: object) -> str:
    host, port = _host_port(None)(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nameserver(value: object) -> tuple[str, int]:
    host, port = _host_port(53)(value)
    if not _is_ip(host):
        raise _Invalid('expected an IP address with an optional port, e.g. "127.0.0.1:5353"')
    return host, port


def _network(value: object) -> IPNetwork:
    expected = 'expected an IP network such as "192.0.2.0/24" or "2001:db8::/32"'
    if not isinstance(value, str):
        raise _Invalid(expected)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        # Host bits set ("10.1.2.3/8") is refused rather than masked: on a relay list the
        # operator's intent is ambiguous, and guessing wrong opens or closes the relay.
        if "host bits set" in str(exc):
            raise _Invalid(expected + " (host bits set)") from None
        raise _Invalid(expected) from None


def _address(value: object) -> str:
    if not isinstance(value, str) or value.count("@") != 1 or any(c.isspace() for c in value):
        raise _Invalid('expected a mailbox such as "postmaster@example.com"')
    local, domain = value.split("@")
    if not local or not _is_hostname(domain):
        raise _Invalid('expected a mailbox such as "postmaster@example.com"')
    return value


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in options:
            raise _Invalid("expected one of " + ", ".join(json.dumps(o) for o in options))
        assert isinstance(value, str)
        return value

    return parse


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)


def _listener_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Invalid("expected a name of letters, digits, '-', '_' or '.'")
    return value


# ---------------------------------------------------------------------------------------
# Table walking


T = TypeVar("T")


class _Reader:
    """Walks one TOML table, remembering its dotted path for error messages."""

    def __init__(self, source: str, path: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.table = table

    def key_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key_path: str, expected: str, value: object = None) -> ConfigError:
        got = "" if value is None else f", got {_describe(value)}"
        return ConfigError(f"{self.source}: {key_path}: {expected}{got}")

    def check_keys(self, allowed: Mapping[str, object] | set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(self.key_path(key), f"unknown key (expected one of: {known})")

    def get(self, key: str, parse: Callable[[object], T], default: T) -> T:
        if key not in self.table:
            return default
        return self.convert(self.key_path(key), parse, self.table[key])

    def convert(self, key_path: str, parse: Callable[[object], T], value: object) -> T:
        try:
            return parse(value)
        except _Invalid as exc:
            raise self.error(key_path, exc.expected, value) from None

    def array(
        self, key: str, parse: Callable[[object], T], default: tuple[T, ...]
    ) -> tuple[T, ...]:
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, list):
            raise self.error(self.key_path(key), "expected an array", value)
        sub = self.key_path(key)
        return tuple(self.convert(f"{sub}[{i}]", parse, item) for i, item in enumerate(value))

    def subtable(self, key: str) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(self.key_path(key), "expected a table", value)
        return _Reader(self.source, self.key_path(key), value)


_LISTENER_KEYS = {
    "name": _listener_name,
    "address": _listen_address,
    "relay_networks": None,
    "accepted_domains": None,
    "max_message_size": _positive_int,
    "max_recipients": _positive_int,
    "max_line_length": None,
    "require_helo": _bool,
    "bare_lf_ends_command": _bool,
    "bare_linefeed": _choice("reject", "normalise"),
    "address_parsing": _choice("loose", "strict"),
    "max_bad_commands": _positive_int,
    "command_timeout": parse_duration,
    "data_timeout": parse_duration,
    "max_connections": _positive_int,
    "max_connections_per_ip": _positive_int,
    "starttls": _bool,
    "tls_certificate": None,
    "tls_key": None,
    "bounce_profile": None,
}


def _line_length(value: object) -> int:
    # RFC 5321 section 4.5.3.1.4: a server must accept command lines of 512 octets.
    if isinstance(value, bool) or not isinstance(value, int) or value < 512:
        raise _Invalid("expected an integer of at least 512 (RFC 5321 section 4.5.3.1.4)")
    return value


_PEM_LABEL = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----\s*$", re.MULTILINE)


def _pem_file(r: _Reader, key: str, base_dir: Path | None, wanted: str) -> Path | None:
    """A PEM file setting: the path (relative to the config file), readable, holding a
    block whose label ends in `wanted` ("CERTIFICATE" or "PRIVATE KEY")."""
    if key not in r.table:
        return None
    key_path = r.key_path(key)
    path = Path(r.convert(key_path, _string, r.table[key]))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise r.error(key_path, f"cannot read {path}: {exc.strerror or exc}") from None
    labels = [m.group(1).decode() for m in _PEM_LABEL.finditer(data)]
    if not any(label.endswith(wanted) for label in labels):
        found = ", ".join(labels) or "no PEM block"
        raise r.error(key_path, f"expected a PEM {wanted} in {path}, found {found}")
    if wanted == "PRIVATE KEY" and "ENCRYPTED PRIVATE KEY" in labels:
        raise r.error(key_path, f"expected an unencrypted private key in {path}")
    return path


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key: never prompt on the terminal.
    raise ValueError("the key is encrypted")


def _tls_files(r: _Reader, base_dir: Path | None) -> tuple[Path | None, Path | None]:
    cert = _pem_file(r, "tls_certificate", base_dir, "CERTIFICATE")
    key = _pem_file(r, "tls_key", base_dir, "PRIVATE KEY")
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        missing, given = (
            ("tls_key", "tls_certificate") if key is None else ("tls_certificate", "tls_key")
        )
        raise r.error(r.key_path(missing), f"expected together with {given}")
    try:
        # The standard library parses both and checks that the key fits the certificate,
        # so `sluice config check` catches what the listener would refuse at start-up.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise r.error(
            r.key_path("tls_certificate"),
            f"expected a certificate and key that belong together: {cert} and {key}: {exc}",
        ) from None
    return cert, key


def _parse_listener(r: _Reader, base_dir: Path | None = None) -> ListenerConfig:
    r.check_keys(_LISTENER_KEYS)
    tls_certificate, tls_key = _tls_files(r, base_dir)
    d = ListenerConfig()
    simple: dict[str, Any] = {}
    for key, parse in _LISTENER_KEYS.items():
        if parse is not None:
            simple[key] = r.get(key, parse, getattr(d, key))
    return ListenerConfig(
        **simple,
        relay_networks=r.array("relay_networks", _network, d.relay_networks),
        accepted_domains=r.array("accepted_domains", _domain_pattern, d.accepted_domains),
        max_line_length=r.get("max_line_length", _line_length, d.max_line_length),
        tls_certificate=tls_certificate,
        tls_key=tls_key,
        bounce_profile=r.get("bounce_profile", _listener_name, d.bounce_profile),
    )


# More delivery processes than this buys nothing (each needs a core) and costs a process,
# an LMDB reader slot and a share of every limit.
MAX_DELIVERY_PROCESSES = 64


def _processes(value: object) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 < value <= MAX_DELIVERY_PROCESSES
    ):
        raise _Invalid(f"expected an integer from 1 to {MAX_DELIVERY_PROCESSES}")
    return value


_DELIVERY_KEYS: dict[str, Callable[[object], object]] = {
    "max_connections": _positive_int,
    "connect_timeout": parse_duration,
    "command_timeout": parse_duration,
    "data_timeout": parse_duration,
    "retry_initial": parse_duration,
    "retry_max": parse_duration,
    "mx_port": _port,
    "helo_name": _domain,
    "messages_per_connection": _positive_int,
    "processes": _processes,
}


def _parse_delivery(r: _Reader) -> DeliveryConfig:
    r.check_keys(_DELIVERY_KEYS)
    d = DeliveryConfig()
    values = {key: r.get(key, parse, getattr(d, key)) for key, parse in _DELIVERY_KEYS.items()}
    delivery = DeliveryConfig(**values)
    if delivery.retry_max < delivery.retry_initial:
        raise r.error(
            r.key_path("retry_max"),
            f"expected a duration no shorter than retry_initial ({delivery.retry_initial:g}s)",
            r.table.get("retry_max", delivery.retry_max),
        )
    return delivery


def _parse_routes(r: _Reader) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for key, value in r.table.items():
        path = r.key_path(json.dumps(key) if "." in key else key)
        if key == "*":
            domain = "*"
        else:
            try:
                domain = _domain_pattern(key)
            except _Invalid as exc:
                raise r.error(path, exc.expected + ' or "*" as the route key') from None
        if isinstance(value, dict):
            # `example.com = [...]` without quotes is a nested table in TOML.
            raise r.error(
                path,
                'expected an array of "host:port" strings '
                '(quote domain keys: "example.com" = ["mx.example.net:25"])',
                value,
            )
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise r.error(path, 'expected a non-empty array of "host:port" strings', value)
        if domain in routes:
            raise r.error(path, "duplicate route (domains are compared case-insensitively)")
        if value == ["dns"]:
            # IronPort's USEDNS: this domain goes by its MX records after all.
            routes[domain] = Route(use_dns=True)
            continue
        if "dns" in value:
            raise r.error(path, '"dns" must be the only entry of a route (["dns"])', value)
        hosts = tuple(r.convert(f"{path}[{i}]", _host_port(25), h) for i, h in enumerate(value))
        routes[domain] = Route(hosts=hosts)
    return routes


def _duration_or_zero(value: object) -> float:
    """A duration, where 0 means "never" (delay_warning)."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return parse_duration(value)


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid("expected an integer of at least 0")
    return value


def _parse_profiles(
    r: _Reader, top: Mapping[str, Any], delivery: DeliveryConfig
) -> dict[str, BounceProfile]:
    base = BounceProfile(
        name="default",
        retry_initial=delivery.retry_initial,
        retry_max=delivery.retry_max,
        max_queue_time=r.convert("max_queue_time", parse_duration, top["max_queue_time"])
        if "max_queue_time" in top
        else BounceProfile.max_queue_time,
    )
    profiles = {"default": base}
    keys = {
        "retry_initial": parse_duration,
        "retry_max": parse_duration,
        "max_queue_time": parse_duration,
        "delay_warning": _duration_or_zero,
    }
    for name, table in r.table.items():
        path = r.key_path(json.dumps(name) if "." in name else name)
        r.convert(path, _listener_name, name)
        if not isinstance(table, dict):
            raise r.error(path, "expected a table [bounce_profiles.NAME]", table)
        sub = _Reader(r.source, path, table)
        sub.check_keys(keys)
        # Unset keys fall back to the default profile (itself the top-level keys).
        values = {k: sub.get(k, parse, getattr(base, k)) for k, parse in keys.items()}
        profile = BounceProfile(name=name, **values)
        if profile.retry_max < profile.retry_initial:
            raise sub.error(
                sub.key_path("retry_max"),
                f"expected a duration no shorter than retry_initial ({profile.retry_initial:g}s)",
                table.get("retry_max", profile.retry_max),
            )
        profiles[name] = profile
    return profiles


def _ca_file(base_dir: Path | None) -> Callable[[object], Path]:
    def parse(value: object) -> Path:
        path = Path(_string(value))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise _Invalid(
                f"expected a readable PEM file of CA certificates: {path}: {exc}"
            ) from None
        return path

    return parse


def _destination_keys(base_dir: Path | None) -> dict[str, Callable[[object], object]]:
    return {
        "max_connections": _positive_int,
        "messages_per_connection": _positive_int,
        "recipients_per_message": _positive_int,
        "messages_per_minute": _non_negative_int,
        "tls": _choice(*TLS_POLICIES),
        "tls_ca_file": _ca_file(base_dir),
        "bounce_profile": _listener_name,
        "pause_after": _positive_int,
        "pause_initial": parse_duration,
        "pause_max": parse_duration,
    }


def _parse_destinations(
    r: _Reader, profiles: Mapping[str, BounceProfile], base_dir: Path | None
) -> dict[str, DestinationConfig]:
    keys = _destination_keys(base_dir)
    raw: dict[str, tuple[str, _Reader]] = {}
    for key, table in r.table.items():
        path = r.key_path(json.dumps(key) if "." in key or key == "*" else key)
        if key == "*":
            pattern = "*"
        else:
            try:
                pattern = _domain_pattern(key)
            except _Invalid as exc:
                raise r.error(path, exc.expected + ' or "*" as the destination key') from None
        if not isinstance(table, dict):
            raise r.error(path, 'expected a table [destinations."example.com"]', table)
        if pattern in raw:
            raise r.error(path, "duplicate destination (compared case-insensitively)")
        sub = _Reader(r.source, path, table)
        sub.check_keys(keys)
        name = table.get("bounce_profile")
        if name is not None and name not in profiles:
            known = ", ".join(sorted(profiles))
            raise sub.error(
                sub.key_path("bounce_profile"), f"expected a profile name (one of: {known})", name
            )
        raw[pattern] = (path, sub)

    def build(sub: _Reader, base: DestinationConfig) -> DestinationConfig:
        values = {k: sub.get(k, parse, getattr(base, k)) for k, parse in keys.items()}
        dest = DestinationConfig(**values)
        if dest.pause_max < dest.pause_initial:
            raise sub.error(
                sub.key_path("pause_max"),
                f"expected a duration no shorter than pause_initial ({dest.pause_initial:g}s)",
                sub.table.get("pause_max", dest.pause_max),
            )
        return dest

    # Every table inherits the keys it does not set from "*", then the built-in defaults.
    default = build(raw["*"][1], DestinationConfig()) if "*" in raw else DestinationConfig()
    out = {"*": default}
    for pattern, (_, sub) in raw.items():
        if pattern != "*":
            out[pattern] = build(sub, default)
    return out


def _bounce_address(value: object) -> str:
    """A bounce address: a whole mailbox, or "local+*@domain" for every tag of `local`."""
    expected = 'expected a mailbox such as "bounces@example.com" or "bounces+*@example.com"'
    if not isinstance(value, str):
        raise _Invalid(expected)
    local, at, domain = value.rpartition("@")
    plain = local[:-2] if local.endswith("+*") else local
    try:
        _address(f"{plain}@{domain}" if at else value)
    except _Invalid:
        raise _Invalid(expected) from None
    if "*" in plain:
        raise _Invalid(expected)
    return value


def _bounce_log(r: _Reader, data_dir: Path, base_dir: Path | None) -> Path:
    # Relative to the configuration file, as data_dir is.
    if "bounce_log" not in r.table:
        return data_dir / "bounces.jsonl"
    path = Path(r.get("bounce_log", _string, ""))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return path


_TOP_KEYS = {
    "hostname",
    "data_dir",
    "max_queue_time",
    "postmaster",
    "durable",
    "log_file",
    "metrics_address",
    "bounce_addresses",
    "bounce_log",
    "listeners",
    "routes",
    "dns",
    "delivery",
    "bounce_profiles",
    "destinations",
}


def _build(source: str, doc: Mapping[str, Any], base_dir: Path | None) -> Config:
    r = _Reader(source, "", doc)
    r.check_keys(_TOP_KEYS)

    hostname = r.get("hostname", _domain, "")
    if not hostname:
        hostname = default_hostname()

    if "data_dir" in doc:
        data_dir = Path(r.get("data_dir", _string, ""))
        # Relative to the file, so `sluice queue --config F` finds the same queue as
        # `sluice run --config F` whatever directory either was started from.
        if base_dir is not None and not data_dir.is_absolute():
            data_dir = base_dir / data_dir
    else:
        data_dir = Path(os.environ.get("SLUICE_DATA") or "./var")

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    if "listeners" in doc:
        raw = doc["listeners"]
        if not isinstance(raw, list) or not raw:
            raise r.error("listeners", "expected a non-empty array of tables [[listeners]]", raw)
        parsed = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise r.error(f"listeners[{i}]", "expected a table", item)
            parsed.append(_parse_listener(_Reader(source, f"listeners[{i}]", item), base_dir))
        listeners = tuple(parsed)
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    for i, listener in enumerate(listeners):
        if listener.name in names:
            raise r.error(f"listeners[{i}].name", "expected a unique listener name", listener.name)
        names.add(listener.name)
        host, port = listener.host_port
        if port != 0 and (host, port) in addresses:
            raise r.error(f"listeners[{i}].address", "expected a unique address", listener.address)
        addresses.add((host, port))

    dns = r.subtable("dns")
    dns.check_keys({"servers", "timeout"})

    delivery = _parse_delivery(r.subtable("delivery"))
    profiles = _parse_profiles(r.subtable("bounce_profiles"), doc, delivery)
    for i, listener in enumerate(listeners):
        if listener.bounce_profile not in profiles:
            known = ", ".join(sorted(profiles))
            raise r.error(
                f"listeners[{i}].bounce_profile",
                f"expected a profile name (one of: {known})",
                listener.bounce_profile,
            )

    return Config(
        source=source,
        hostname=hostname,
        data_dir=data_dir,
        listeners=listeners,
        routes=_parse_routes(r.subtable("routes")),
        delivery=delivery,
        max_queue_time=profiles["default"].max_queue_time,
        postmaster=r.get("postmaster", _address, None),
        durable=r.get("durable", _bool, True),
        log_file=r.get("log_file", _string, None),
        metrics_address=r.get("metrics_address", _listen_address, None),
        bounce_addresses=r.array("bounce_addresses", _bounce_address, ()),
        bounce_log=_bounce_log(r, data_dir, base_dir),
        dns_servers=dns.array("servers", _nameserver, ()),
        dns_timeout=dns.get("timeout", parse_duration, 5.0),
        bounce_profiles=profiles,
        destinations=_parse_destinations(r.subtable("destinations"), profiles, base_dir),
    )


def default_config() -> Config:
    """The configuration used when no file is given."""
    return _build(DEFAULT_SOURCE, {}, None)


def default_hostname() -> str:
    """The machine's FQDN; getfqdn() falls back to "localhost" on hosts whose name does
    not resolve, which would put a useless name in every banner and Received: header."""
    fqdn = socket.getfqdn()
    if fqdn and fqdn not in ("localhost", "localhost.localdomain") and "." in fqdn:
        return fqdn
    return socket.gethostname() or fqdn or "localhost"


def load_config(path: str | None) -> Config:
    """Read and validate `path`; None means the built-in default. Raises ConfigError."""
    if path is None:
        return default_config()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already carries "(at line N, column M)".
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return _build(path, doc, Path(path).parent)
