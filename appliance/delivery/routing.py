"""Next-hop routing: which hosts, in which order, receive mail for a recipient domain.

Asked by the delivery scheduler for every recipient domain. Order of decisions:

1. a static route from the configuration (`[routes]`): the domain itself, then each
   parent written ".example.com", then the default route "*"; hosts are tried in the
   configured order (a host name in a route is looked up as A/AAAA, never as MX). The
   first route that matches decides: one written `["dns"]` (IronPort's USEDNS) sends the
   domain to step 3 although a broader route (".parent" or "*") exists;
2. an address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3);
3. DNS MX records (RFC 5321 5.1): lowest preference first, random order among equal
   preferences, every IPv4 then IPv6 address of each exchange; with no MX records the
   domain's own A/AAAA records act as an implicit MX of preference 0; a null MX "0 ."
   (RFC 7505) means the domain accepts no mail.

Failures say whether they are permanent (the domain does not exist, null MX, has no
address at all: bounce) or temporary (SERVFAIL, timeout, no reachable DNS: retry).
Answers are cached for their DNS TTL on the injected clock.

IPv4 addresses are tried before IPv6 ones of the same exchange: a gateway's IPv6 sending
path is more often missing reverse DNS, which receivers punish with rejections.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from appliance.config import Config

Hop = tuple[str, int]

# Negative answers (NXDOMAIN, no records) are remembered briefly so a burst of mail to a
# mistyped domain costs one lookup, without pinning a domain that is being fixed.
_NEGATIVE_TTL = 60.0
# Bound the cache so mail to millions of distinct domains cannot exhaust memory.
_CACHE_MAX = 10000


@dataclass(frozen=True)
class Resolution:
    """Either `hosts` to try in order, or a failure (`permanent`, `reason`).

    `names` maps a host address to the exchange name it came from, for bounces
    (Remote-MTA) and logs. `code`/`enhanced` are the reply to record for a failure.
    """

    hosts: tuple[Hop, ...] = ()
    permanent: bool = False
    reason: str = ""
    code: int = 451
    enhanced: str = "4.4.3"
    names: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.hosts)

    @classmethod
    def temporary(cls, reason: str, enhanced: str = "4.4.3") -> Resolution:
        return cls(reason=reason, code=451, enhanced=enhanced)

    @classmethod
    def failed(cls, reason: str, code: int = 550, enhanced: str = "5.1.2") -> Resolution:
        return cls(reason=reason, permanent=True, code=code, enhanced=enhanced)

    def reply_text(self) -> str:
        return f"{self.code} {self.enhanced} {self.reason}"


class _Temporary(Exception):
    """SERVFAIL, timeout, refused: ask again later."""


class _NoDomain(Exception):
    """NXDOMAIN."""


class _NoAnswer(Exception):
    """The name exists but has no record of the asked type."""


@dataclass
class _Answer:
    """A resolution as cached. For MX answers `groups` keeps the exchanges per preference
    (each exchange with its addresses) so every use can shuffle equal preferences anew."""

    resolution: Resolution
    groups: list[list[tuple[Hop, ...]]] | None = None
    ttl: float = 0.0
    expires: float = 0.0


class Router:
    """Resolves recipient domains to next hops. One instance per process."""

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._port = config.delivery.mx_port
        self._cache: dict[str, _Answer] = {}
        if config.dns_servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in config.dns_servers
            ]
        else:
            resolver = dns.asyncresolver.Resolver(configure=True)
        # One server's timeout, and the whole lookup's lifetime (all servers, retries).
        resolver.timeout = config.dns_timeout
        resolver.lifetime = config.dns_timeout * max(1, len(resolver.nameservers))
        self._resolver = resolver

    def static_route(self, domain: str) -> tuple[Hop, ...] | None:
        """The configured hosts for `domain`: exact, then ".parent" patterns, then "*";
        None when no route matches or the matching route says "dns"."""
        routes = self._config.routes
        domain = domain.lower().rstrip(".")
        route = routes.get(domain)
        if route is None:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                route = routes.get("." + ".".join(labels[i:]))
                if route is not None:
                    break
        if route is None:
            route = routes.get("*")
        if route is None or route.use_dns:
            return None
        return route.hosts

    async def resolve(self, domain: str) -> Resolution:
        """Hosts to try for `domain`, in order, or why there are none."""
        key = domain.lower().rstrip(".")
        now = self._clock()
        answer = self._cache.get(key)
        if answer is None or answer.expires <= now:
            answer = await self._resolve(key)
            if answer.ttl > 0:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
                    if len(self._cache) >= _CACHE_MAX:
                        self._cache.clear()
                answer.expires = now + answer.ttl
                self._cache[key] = answer
        return self._order(answer)

    def _order(self, answer: _Answer) -> Resolution:
        if answer.groups is None:
            return answer.resolution
        hosts: list[Hop] = []
        for group in answer.groups:
            exchanges = list(group)
            # RFC 5321 5.1: spread load across MX hosts of equal preference.
            self._rng.shuffle(exchanges)
            for exchange in exchanges:
                hosts.extend(exchange)
        return Resolution(hosts=tuple(hosts), names=answer.resolution.names)

    async def _resolve(self, domain: str) -> _Answer:
        static = self.static_route(domain)
        if static is not None:
            return await self._resolve_static(domain, static)
        if domain.startswith("[") and domain.endswith("]"):
            return _Answer(self._literal(domain), ttl=3600.0)
        if not domain or len(domain) > 253:
            return _Answer(Resolution.failed(f"invalid domain {domain!r}"), ttl=_NEGATIVE_TTL)
        try:
            return await self._resolve_mx(domain)
        except _NoDomain:
            failure = Resolution.failed(f"domain {domain} does not exist", 550, "5.1.2")
            return _Answer(failure, ttl=_NEGATIVE_TTL)
        except _Temporary as exc:
            return _Answer(Resolution.temporary(f"DNS lookup for {domain} failed: {exc}"))

    def _literal(self, domain: str) -> Resolution:
        """RFC 5321 4.1.3: address-literal = "[" ( IPv4-address-literal /
        IPv6-address-literal / General-address-literal ) "]";
        IPv6-address-literal = "IPv6:" IPv6-addr."""
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                address: str = str(ipaddress.IPv6Address(inner[5:]))
            else:
                address = str(ipaddress.IPv4Address(inner))
        except ValueError:
            return Resolution.failed(f"invalid address literal {domain}", 553, "5.1.2")
        return Resolution(hosts=((address, self._port),), names={address: domain})

    async def _resolve_static(self, domain: str, static: tuple[Hop, ...]) -> _Answer:
        hosts: list[Hop] = []
        names: dict[str, str] = {}
        ttl = 3600.0
        errors: list[str] = []
        for host, port in static:
            if _is_ip(host):
                hosts.append((host, port))
                names.setdefault(host, host)
                continue
            try:
                addresses, host_ttl = await self._addresses(host)
            except (_Temporary, _NoDomain) as exc:
                errors.append(f"{host}: {exc or 'no such host'}")
                ttl = 0.0
                continue
            ttl = min(ttl, host_ttl)
            for address in addresses:
                hosts.append((address, port))
                names.setdefault(address, host)
        if not hosts:
            # A broken static route is the operator's to fix; mail waits rather than bounce.
            reason = f"no address for the route of {domain}: " + "; ".join(errors)
            return _Answer(Resolution.temporary(reason))
        return _Answer(Resolution(hosts=tuple(hosts), names=names), ttl=ttl)

    async def _resolve_mx(self, domain: str) -> _Answer:
        try:
            records, ttl = await self._query_mx(domain)
        except _NoAnswer:
            # RFC 5321 5.1: no MX records -> the domain itself is the implicit MX.
            try:
                addresses, ttl = await self._addresses(domain)
            except _NoAnswer:
                failure = Resolution.failed(
                    f"domain {domain} has no MX or address records", 550, "5.1.2"
                )
                return _Answer(failure, ttl=_NEGATIVE_TTL)
            hops = tuple((a, self._port) for a in addresses)
            return _Answer(Resolution(hosts=hops, names=dict.fromkeys(addresses, domain)), ttl=ttl)
        exchanges = [(pref, name) for pref, name in records if name not in ("", ".")]
        if not exchanges:
            # RFC 7505 3: a null MX ("0 .") says the domain accepts no mail at all.
            failure = Resolution.failed(
                f"domain {domain} does not accept mail (null MX)", 556, "5.1.10"
            )
            return _Answer(failure, ttl=ttl)
        by_pref: dict[int, list[str]] = {}
        for pref, name in exchanges:
            by_pref.setdefault(pref, []).append(name)
        groups: list[list[tuple[Hop, ...]]] = []
        names: dict[str, str] = {}
        errors: list[str] = []
        temporary = False
        for pref in sorted(by_pref):
            group: list[tuple[Hop, ...]] = []
            for name in by_pref[pref]:
                try:
                    addresses, host_ttl = await self._addresses(name)
                except _Temporary as exc:
                    errors.append(f"{name}: {exc}")
                    temporary = True
                    continue
                except (_NoDomain, _NoAnswer):
                    errors.append(f"{name}: no address")
                    continue
                ttl = min(ttl, host_ttl)
                group.append(tuple((a, self._port) for a in addresses))
                for address in addresses:
                    names.setdefault(address, name)
            if group:
                groups.append(group)
        if not groups:
            # Unresolvable exchanges are a DNS mistake the domain's owner may fix soon;
            # retrying until the queue lifetime runs out is the conservative choice.
            reason = f"no MX host of {domain} has an address: " + "; ".join(errors)
            failure = Resolution.temporary(reason, "4.4.4")
            return _Answer(failure, ttl=0.0 if temporary else _NEGATIVE_TTL)
        # An MX host that failed temporarily is simply skipped: the others may work, and
        # the answer is not cached so the next attempt asks again.
        return _Answer(Resolution(names=names), groups, ttl=0.0 if temporary else ttl)

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        """IPv4 then IPv6 addresses of `name` and the smaller TTL; raises _NoAnswer when
        the name exists with neither, _NoDomain when it does not exist."""
        addresses: list[str] = []
        ttl = 3600.0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query_addresses(name, rdtype)
            except _NoAnswer:
                continue
            found, rr_ttl = answer
            addresses.extend(found)
            ttl = min(ttl, rr_ttl)
        if not addresses:
            raise _NoAnswer(name)
        return addresses, ttl

    async def _query_mx(self, name: str) -> tuple[list[tuple[int, str]], float]:
        try:
            answer = await self._resolver.resolve(name, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise _NoDomain(name) from None
        except dns.resolver.NoAnswer:
            raise _NoAnswer(name) from None
        except dns.exception.DNSException as exc:
            raise _Temporary(_short(exc)) from None
        records = [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower()) for r in answer
        ]
        assert answer.rrset is not None
        return records, float(answer.rrset.ttl)

    async def _query_addresses(self, name: str, rdtype: str) -> tuple[list[str], float]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise _NoDomain(name) from None
        except dns.resolver.NoAnswer:
            raise _NoAnswer(name) from None
        except dns.exception.DNSException as exc:
            raise _Temporary(_short(exc)) from None
        assert answer.rrset is not None
        return [r.address for r in answer], float(answer.rrset.ttl)


def _short(exc: Exception) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no server answered (SERVFAIL or REFUSED)"
    return type(exc).__name__


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
