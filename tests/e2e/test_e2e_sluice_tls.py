"""End to end: outbound STARTTLS from one `sluice run` to another (RFC 3207).

The second Sluice ("relay2.test") offers STARTTLS with the self-signed certificate it
makes for its hostname on first start (`<data_dir>/tls/self-signed.pem`) and relays
everything to an smtp-sink. The first routes several domains to it by name; dnsmasq
answers `relay2.test` with 127.0.0.1, so under "required-verified" the certificate is
checked against the name written in the route. Per domain (`[destinations]`):

- "opportunistic": delivered, and the second Sluice's Received: header says ESMTPS with
  the TLS version and cipher;
- "required-verified" with `tls_ca_file` = the second instance's self-signed.pem:
  delivered over a verified session;
- "required-verified" with the system store: the chain does not verify, so the mail is
  deferred with `451 4.7.5` (visible in `sluice queue --json`) and never sent in clear;
- "required-verified" with the right CA but the route naming the IP address: the name
  does not match the certificate, deferred the same way.
"""

from __future__ import annotations

import email
import email.policy
import re
from typing import TYPE_CHECKING

from tests.e2e.harness import Json, Sluice, SluiceFactory, route_to, wait_until

if TYPE_CHECKING:
    from tests.conftest import DnsFactory, SinkFactory

RELAY = "relay2.test"


def send(server: Sluice, rcpt: str) -> str:
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("alice@src.test")[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(f"Subject: to {rcpt}\r\n\r\nbody\r\n".encode())
    assert code == 250, text
    m = re.search(rb"queued as (\S+)", text)
    assert m, text
    return m.group(1).decode()


def unfold(value: str) -> str:
    return " ".join(value.split())


def test_sluice_to_sluice_starttls_policies(
    sluice: SluiceFactory, smtp_sink: SinkFactory, dns_server: DnsFactory
) -> None:
    sink = smtp_sink()
    second = sluice(top={"hostname": RELAY}, routes={"*": route_to(sink)})
    ca = second.data_dir / "tls" / "self-signed.pem"
    assert ca.exists(), "the second Sluice made no self-signed certificate"
    dns = dns_server(hosts=[(RELAY, "127.0.0.1")])
    by_name = [f"{RELAY}:{second.port}"]
    first = sluice(
        routes={
            "opp.test": by_name,
            "verified.test": by_name,
            "noca.test": by_name,
            "byip.test": [f"127.0.0.1:{second.port}"],
        },
        dns={"servers": [f"{dns.host}:{dns.port}"], "timeout": 3},
        destinations={
            "opp.test": {"tls": "opportunistic"},
            "verified.test": {"tls": "required-verified", "tls_ca_file": str(ca)},
            "noca.test": {"tls": "required-verified"},
            "byip.test": {"tls": "required-verified", "tls_ca_file": str(ca)},
        },
    )
    qids = {rcpt: send(first, rcpt) for rcpt in ("o@opp.test", "v@verified.test")}
    stuck = {rcpt: send(first, rcpt) for rcpt in ("n@noca.test", "i@byip.test")}

    # Delivered: over TLS, as the first Sluice logged and the second one wrote down.
    arrived = sink.wait_for(2, timeout=30)
    assert sorted(m.recipients[0] for m in arrived) == ["o@opp.test", "v@verified.test"], (
        first.log_tail()
    )
    for rcpt, qid in qids.items():
        (attempt,) = first.events("delivery_attempt", qid=qid)
        assert attempt["host"] == f"{RELAY}[127.0.0.1]"
        assert re.fullmatch(r"TLSv1\.[23] \S+", attempt["tls"]), attempt
        (message,) = [m for m in arrived if m.recipients == [rcpt]]
        headers = email.message_from_bytes(message.data, policy=email.policy.compat32)
        relay_received, first_received, *_ = headers.get_all("Received") or []
        trace = unfold(relay_received)
        # "from gw.sluice.test ([127.0.0.1]) by relay2.test (Sluice) with ESMTPS id Q
        # (TLSv1.3 TLS13_AES_256_GCM_SHA384) for <rcpt>; date"
        assert trace.startswith(f"from gw.sluice.test ([127.0.0.1]) by {RELAY} (Sluice)"), trace
        m = re.search(
            r"with ESMTPS id \S+ \((TLSv1\.[23]) [A-Z0-9_]+\) for <" + re.escape(rcpt), trace
        )
        assert m, trace
        assert attempt["tls"].startswith(m.group(1))  # the version both ends agreed on
        assert f"by gw.sluice.test (Sluice) with ESMTP id {qid}" in unfold(first_received)

    # Not verified: deferred with 4.7.5 and the reason, nothing sent in clear text.
    def deferred_rows() -> list[Json]:
        rows = [r for r in first.queue_json() if r["qid"] in stuck.values()]
        ready = len(rows) == 2 and all(
            r["recipients"][0]["state"] == "deferred" and r["recipients"][0]["attempts"] >= 1
            for r in rows
        )
        return rows if ready else []

    rows = wait_until(deferred_rows, timeout=20)
    assert rows, first.queue_json()
    replies = {r["recipients"][0]["address"]: r["recipients"][0]["last_reply"] for r in rows}
    noca = replies["n@noca.test"]
    handshake = f"451 4.7.5 TLS handshake with 127.0.0.1:{second.port} failed"
    assert noca == f"{RELAY}[127.0.0.1]: {handshake}: certificate not verified: " + (
        "self-signed certificate"
    ), noca
    byip = replies["i@byip.test"]
    assert byip.startswith(f"127.0.0.1: {handshake}: certificate not verified: "), byip
    assert "mismatch" in byip, byip
    for qid in stuck.values():
        assert first.events("connect_failed", qid=qid), first.log_tail()
        assert first.events("delivery_attempt", qid=qid) == []
    assert len(sink.messages()) == 2
    assert second.events("accepted", recipients=["n@noca.test"]) == []
    assert second.events("accepted", recipients=["i@byip.test"]) == []
