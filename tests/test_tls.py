"""STARTTLS (RFC 3207) on a real `sluice run`, with real clients: openssl s_client, swaks,
smtplib, and raw sockets wrapped by Python's ssl module for the injection cases.

What must hold:
- STARTTLS is offered by default with a self-signed certificate for the hostname, made
  once in <data_dir>/tls (key mode 0600) and reused; a configured PEM pair replaces it.
- A message sent over TLS is queued with `with ESMTPS` and the TLS version and cipher
  suite in its Received: header.
- Plain-text commands pipelined after STARTTLS never run (CVE-2011-0411): neither as a
  reply after the handshake nor as state (an injected MAIL opens no transaction).
- After the handshake the session starts afresh and STARTTLS is no longer offered.
- An unusable certificate setting is named, with its file, by `sluice config check`,
  by `sluice run`, and by the native Server.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from appliance._native import ListenerSpec, Server, TlsError
from tests.conftest import SinkFactory
from tests.listener_harness import HOSTNAME, Lines, ServerFactory, sluice_server

__all__ = ["sluice_server"]  # the fixture, imported for pytest

RECEIVED_TLS = re.compile(rb"with ESMTPS id \w+ \((TLSv1\.[23]) (TLS\w+)\)")


def client_context(cafile: Path | None = None) -> ssl.SSLContext:
    """Verifying against `cafile` when given, else accepting any certificate."""
    if cafile is not None:
        return ssl.create_default_context(cafile=str(cafile))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-days",
            "30",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def ehlo_keywords(lines: Lines, sock: socket.socket) -> list[bytes]:
    sock.sendall(b"EHLO client.test\r\n")
    reply = lines.reply()
    assert reply[0].startswith(b"250"), reply
    return [line[4:].split(b" ")[0].upper() for line in reply[1:]]


def handshake(
    sock: socket.socket,
    lines: Lines,
    context: ssl.SSLContext,
    name: str = HOSTNAME,
    injected: bytes = b"",
) -> ssl.SSLSocket:
    """EHLO, STARTTLS and the TLS handshake; `injected` rides in the same write as the
    STARTTLS command (the command-injection attack of RFC 3207 section 4.2)."""
    assert b"STARTTLS" in ehlo_keywords(lines, sock)
    sock.sendall(b"STARTTLS\r\n" + injected)
    assert lines.reply() == [b"220 2.0.0 Ready to start TLS"]
    tls = context.wrap_socket(sock, server_hostname=name)
    lines.rebind(tls)
    return tls


# -- certificates ------------------------------------------------------------------------------


def test_openssl_s_client_verifies_the_self_signed_certificate(
    sluice_server: ServerFactory,
) -> None:
    server = sluice_server()
    cert = server.data_dir / "tls" / "self-signed.pem"
    res = subprocess.run(
        [
            "openssl",
            "s_client",
            "-starttls",
            "smtp",
            "-crlf",
            "-ign_eof",
            "-connect",
            f"127.0.0.1:{server.port}",
            "-CAfile",
            str(cert),
            "-verify_return_error",
            "-verify_hostname",
            HOSTNAME,
        ],
        input=b"EHLO client.test\nQUIT\n",
        capture_output=True,
        timeout=30,
    )
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out
    assert re.search(r"New, TLSv1\.3, Cipher is TLS_AES_\d+_GCM_SHA\d+", out), out
    assert "221 2.0.0" in out


def test_self_signed_certificate_is_made_once_private_and_reused(
    sluice_server: ServerFactory,
) -> None:
    server = sluice_server()
    cert = server.data_dir / "tls" / "self-signed.pem"
    key = server.data_dir / "tls" / "self-signed.key"
    assert key.stat().st_mode & 0o777 == 0o600
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"CN = {HOSTNAME}" in subject and f"DNS:{HOSTNAME}" in subject
    before = cert.read_bytes(), key.read_bytes()
    server.stop()
    server.start()
    assert (cert.read_bytes(), key.read_bytes()) == before
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        tls = handshake(sock, lines, client_context(cert))
        assert tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(cert.read_text())


def test_configured_certificate_is_used_instead(
    sluice_server: ServerFactory, tmp_path: Path
) -> None:
    server = sluice_server(start=False)
    cert, key = make_certificate(server.workdir, "mx.configured.test")
    # Relative paths are relative to the configuration file.
    text = server.config_path.read_text()
    text = text.replace(
        "[[listeners]]\n",
        f'[[listeners]]\ntls_certificate = "{cert.name}"\ntls_key = "{key.name}"\n',
    )
    server.config_path.write_text(text)
    server.start()
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        tls = handshake(sock, lines, client_context(cert), "mx.configured.test")
        assert tls.getpeercert()["subject"] == ((("commonName", "mx.configured.test"),),)
    assert not (server.data_dir / "tls").exists()


# -- messages over TLS ---------------------------------------------------------------------


def test_swaks_tls_message_is_queued_and_received_names_tls(
    sluice_server: ServerFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    server = sluice_server(routes={"*": [f"{sink.host}:{sink.port}"]})
    res = subprocess.run(
        [
            "swaks",
            "--tls",
            "--server",
            f"127.0.0.1:{server.port}",
            "--helo",
            "client.test",
            "--from",
            "sender@example.org",
            "--to",
            "rcpt@example.org",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in res.stdout
    assert "=== TLS started with cipher TLSv1.3:" in res.stdout, res.stdout
    assert re.search(r"250 2\.0\.0 Ok: queued as \w+", res.stdout), res.stdout
    [message] = sink.wait_for(1)
    first_header = message.data.split(b"\n\t")[0:3]
    assert first_header[0].startswith(b"Received: from client.test ([127.0.0.1])")
    found = RECEIVED_TLS.search(message.data.replace(b"\n", b"\r\n"))
    assert found is not None, message.data[:400]
    assert found.group(1) == b"TLSv1.3"
    assert found.group(2).startswith(b"TLS13_")


def test_smtplib_starttls_sendmail_records_version_and_cipher(
    sluice_server: ServerFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    server = sluice_server(routes={"*": [f"{sink.host}:{sink.port}"]})
    context = client_context()
    # TLS 1.2 here (1.3 above), so the header is seen to follow what was negotiated.
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=20) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        code, text = smtp.starttls(context=context)
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        cipher = smtp.sock.cipher()  # type: ignore[union-attr]
        refused = smtp.sendmail(
            "sender@example.org", ["rcpt@example.org"], b"Subject: over TLS\r\n\r\nhello\r\n"
        )
        assert refused == {}
    [message] = sink.wait_for(1)
    found = RECEIVED_TLS.search(message.data.replace(b"\n", b"\r\n"))
    assert found is not None, message.data[:400]
    assert found.group(1) == b"TLSv1.2"
    # rustls names the suite by its IANA name; OpenSSL uses its own (ECDHE-ECDSA-...).
    assert found.group(2).startswith(b"TLS_ECDHE_ECDSA_WITH_AES_"), cipher
    assert b"Subject: over TLS" in message.data


# -- the session after STARTTLS ----------------------------------------------------------


def test_injected_mail_before_the_handshake_opens_no_transaction(
    sluice_server: ServerFactory,
) -> None:
    server = sluice_server()
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        # One write: the MAIL rides in the same segment as STARTTLS.
        tls = handshake(sock, lines, client_context(), injected=b"MAIL FROM:<x@example.org>\r\n")
        tls.sendall(b"RCPT TO:<y@example.org>\r\n")
        # The first reply after the handshake answers RCPT: no 250 for the injected MAIL.
        reply = lines.reply()
        assert reply[-1].startswith(b"503 5.5.1"), reply
        tls.sendall(b"MAIL FROM:<x@example.org>\r\n")
        assert lines.reply()[-1].startswith(b"250 2.1.0")


def test_injected_rset_reply_never_appears(sluice_server: ServerFactory) -> None:
    server = sluice_server()
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        tls = handshake(sock, lines, client_context(), injected=b"RSET\r\n")
        # No EHLO after the handshake: require_helo is off, so MAIL is fine at once.
        tls.sendall(b"MAIL FROM:<x@example.org>\r\nNOOP\r\n")
        assert lines.reply()[-1].startswith(b"250 2.1.0"), "first reply must answer MAIL"
        assert lines.reply() == [b"250 2.0.0 OK"]
        tls.sendall(b"QUIT\r\n")
        assert lines.code() == 221


def test_plain_text_after_the_220_fails_the_handshake(sluice_server: ServerFactory) -> None:
    server = sluice_server()
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        sock.sendall(b"STARTTLS\r\n")
        assert lines.code() == 220
        # Sent after the 220, so it reaches the handshake: never run as a command.
        sock.sendall(b"MAIL FROM:<x@example.org>\r\n")
        sock.settimeout(10)
        received = b""
        with pytest.raises(ConnectionError):
            while chunk := sock.recv(4096):
                received += chunk
            raise ConnectionResetError
        assert b"250" not in received
    with server.connect() as sock:  # the listener carries on
        assert Lines(sock).code() == 220


def test_after_tls_ehlo_omits_starttls_and_a_second_one_is_refused(
    sluice_server: ServerFactory,
) -> None:
    server = sluice_server()
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        tls = handshake(sock, lines, client_context())
        keywords = ehlo_keywords(lines, tls)
        assert b"STARTTLS" not in keywords
        assert b"PIPELINING" in keywords
        tls.sendall(b"STARTTLS\r\n")
        assert lines.code() // 100 == 5


def test_starttls_off_is_not_offered(sluice_server: ServerFactory) -> None:
    server = sluice_server(listener={"starttls": False})
    with server.connect() as sock:
        lines = Lines(sock)
        assert lines.code() == 220
        assert b"STARTTLS" not in ehlo_keywords(lines, sock)
        sock.sendall(b"STARTTLS\r\n")
        assert lines.code() // 100 == 5
    assert not (server.data_dir / "tls").exists()


# -- bad certificate settings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "named", "file", "expected"),
    [
        ({"tls_certificate": "missing.pem", "tls_key": "key.pem"}, "tls_certificate",
         "missing.pem", "cannot read"),
        ({"tls_certificate": "notpem.pem", "tls_key": "key.pem"}, "tls_certificate",
         "notpem.pem", "expected a PEM CERTIFICATE"),
        ({"tls_certificate": "cert.pem", "tls_key": "cert.pem"}, "tls_key",
         "cert.pem", "expected a PEM PRIVATE KEY"),
        ({"tls_certificate": "cert.pem"}, "tls_key", None, "expected together with"),
        ({"tls_certificate": "cert.pem", "tls_key": "other.key"}, "tls_certificate",
         "other.key", "belong together"),
    ],
)  # fmt: skip
def test_config_check_names_the_key_and_the_file(
    sluice_server: ServerFactory,
    setting: dict[str, str],
    named: str,
    file: str | None,
    expected: str,
) -> None:
    server = sluice_server(listener=setting, start=False)
    cert, key = make_certificate(server.workdir, "mx.configured.test")
    cert.rename(server.workdir / "cert.pem")
    key.rename(server.workdir / "key.pem")
    make_certificate(server.workdir, "other")
    (server.workdir / "notpem.pem").write_text("hello\n")
    res = server.cli("config", "check", str(server.config_path))
    assert res.returncode != 0
    assert f"listeners[0].{named}:" in res.stderr, res.stderr
    assert expected in res.stderr, res.stderr
    if file is not None:
        assert str(server.workdir / file) in res.stderr, res.stderr
    # `sluice run` refuses the same setting before it listens.
    run = server.cli("run", "--config", str(server.config_path))
    assert run.returncode != 0
    assert f"listeners[0].{named}:" in run.stderr


def test_native_server_names_an_unusable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    spec = ListenerSpec(
        "edge", "127.0.0.1:0", HOSTNAME, starttls=True, tls_certificate=missing, tls_key=missing
    )
    with pytest.raises(TlsError, match=r"listener edge: tls_certificate .*missing\.pem"):
        Server([spec])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    spec = ListenerSpec(
        "edge", "127.0.0.1:0", HOSTNAME, starttls=True, tls_certificate=garbage, tls_key=garbage
    )
    with pytest.raises(OSError, match=r"garbage\.pem"):
        Server([spec])


def test_native_server_makes_the_self_signed_pair_in_tls_dir(tmp_path: Path) -> None:
    spec = ListenerSpec("edge", "127.0.0.1:0", HOSTNAME, starttls=True, tls_dir=tmp_path / "tls")
    server = Server([spec])
    try:
        assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == [
            "self-signed.key",
            "self-signed.pem",
        ]
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="starttls"):
        ListenerSpec("edge", "127.0.0.1:0", HOSTNAME, starttls=True)
