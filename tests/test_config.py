"""Tests for appliance.config (TOML loading and validation) and `sluice config check`."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop

from appliance.config import (
    DEFAULT_SOURCE,
    Config,
    ConfigError,
    DeliveryConfig,
    ListenerConfig,
    Route,
    default_config,
    load_config,
    parse_duration,
)

REPO = Path(__file__).resolve().parent.parent

FULL_EXAMPLE = """
# A complete configuration exercising every key.
hostname = "mx1.example.com"
data_dir = "/var/lib/sluice"
max_queue_time = "5d"
postmaster = "postmaster@example.com"
durable = true
log_file = "/var/log/sluice/events.log"
metrics_address = "127.0.0.1:9125"

[[listeners]]
name = "inbound"
address = "0.0.0.0:25"
relay_networks = []
accepted_domains = ["Example.COM", ".example.net"]
max_message_size = 52428800
max_recipients = 500
max_line_length = 8192
require_helo = true
bare_lf_ends_command = false
bare_linefeed = "normalise"
address_parsing = "strict"
max_bad_commands = 5
command_timeout = "5m"
data_timeout = 900
max_connections = 2000

[[listeners]]
name = "outbound"
address = "[::1]:587"
relay_networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]

[routes]
"example.com" = ["mail1.internal:2525", "[2001:db8::25]:25", "192.0.2.25"]
".example.net" = ["relay.internal"]
"*" = ["smarthost.example.org:587"]

[dns]
servers = ["127.0.0.1:5353", "::1"]
timeout = "2s"

[delivery]
max_connections = 20
connect_timeout = "10s"
command_timeout = "2m"
data_timeout = "10m"
retry_initial = "1m"
retry_max = "1h"
mx_port = 2525
helo_name = "mx1.example.com"
messages_per_connection = 50
"""


def write(tmp_path: Path, text: str, name: str = "sluice.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(path + ": "), message
    return message


def test_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_DATA", raising=False)
    config = default_config()
    assert load_config(None) == config
    assert config.source == DEFAULT_SOURCE
    assert config.data_dir == Path("./var")
    assert config.hostname
    assert config.listeners == (ListenerConfig(),)
    listener = config.listeners[0]
    assert listener.name == "inbound" and listener.address == "127.0.0.1:2525"
    assert listener.host_port == ("127.0.0.1", 2525)
    assert ipaddress.ip_address("127.0.0.5") in listener.relay_networks[0]
    assert ipaddress.ip_network("::1/128") in listener.relay_networks
    assert listener.bare_linefeed == "reject" and listener.address_parsing == "loose"
    assert not listener.require_helo and listener.bare_lf_ends_command
    assert config.routes == {}  # delivery by MX
    assert config.delivery == DeliveryConfig()
    assert config.durable and config.postmaster is None and config.dns_servers == ()
    assert config.max_queue_time == 5 * 86400


def test_sluice_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLUICE_DATA", "/srv/sluice")
    assert default_config().data_dir == Path("/srv/sluice")
    # The environment only replaces the default, never a file's own setting.
    path = write(tmp_path, 'data_dir = "/var/lib/sluice"\n')
    assert load_config(path).data_dir == Path("/var/lib/sluice")
    path = write(tmp_path, 'hostname = "a.example"\n')
    assert load_config(path).data_dir == Path("/srv/sluice")


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'data_dir = "spool"\n')
    assert load_config(path).data_dir == tmp_path / "spool"


def test_full_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_EXAMPLE))
    assert isinstance(config, Config)
    assert config.hostname == "mx1.example.com"
    assert config.data_dir == Path("/var/lib/sluice")
    assert config.max_queue_time == 5 * 86400
    assert config.postmaster == "postmaster@example.com"
    assert config.log_file == "/var/log/sluice/events.log"
    assert config.metrics_address == "127.0.0.1:9125"
    inbound, outbound = config.listeners
    assert inbound.relay_networks == ()
    assert inbound.accepted_domains == ("example.com", ".example.net")
    assert inbound.max_message_size == 52428800 and inbound.max_recipients == 500
    assert inbound.max_line_length == 8192 and inbound.require_helo
    assert not inbound.bare_lf_ends_command and inbound.bare_linefeed == "normalise"
    assert inbound.address_parsing == "strict" and inbound.max_bad_commands == 5
    assert inbound.command_timeout == 300 and inbound.data_timeout == 900
    assert inbound.max_connections == 2000
    assert outbound.address == "[::1]:587" and outbound.host_port == ("::1", 587)
    assert [str(n) for n in outbound.relay_networks] == [
        "10.0.0.0/8",
        "2001:db8::/32",
        "192.0.2.7/32",
    ]
    assert outbound.max_recipients == 1000  # defaults fill in
    assert config.routes == {
        "example.com": Route((("mail1.internal", 2525), ("2001:db8::25", 25), ("192.0.2.25", 25))),
        ".example.net": Route((("relay.internal", 25),)),
        "*": Route((("smarthost.example.org", 587),)),
    }
    assert config.dns_servers == (("127.0.0.1", 5353), ("::1", 53))
    assert config.dns_timeout == 2.0
    assert config.delivery == DeliveryConfig(
        max_connections=20,
        connect_timeout=10,
        command_timeout=120,
        data_timeout=600,
        retry_initial=60,
        retry_max=3600,
        mx_port=2525,
        helo_name="mx1.example.com",
        messages_per_connection=50,
    )


def test_durations() -> None:
    assert parse_duration(30) == 30
    assert parse_duration(1.5) == 1.5
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("2h") == 7200
    assert parse_duration("5d") == 432000
    assert parse_duration("0.5m") == 30


def test_unknown_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[[listeners]]\nname = 'a'\nrelay_network = ['10.0.0.0/8']\n")
    assert "listeners[0].relay_network: unknown key" in msg
    assert "relay_networks" in msg  # lists the keys that do exist
    assert "hostnme: unknown key" in error_of(tmp_path, 'hostnme = "x"\n')
    assert "delivery.retries: unknown key" in error_of(tmp_path, "[delivery]\nretries = 3\n")
    assert "dns.server: unknown key" in error_of(tmp_path, "[dns]\nserver = '1.1.1.1'\n")


def test_bad_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[[listeners]]\nmax_recipients = "ten"\n')
    assert msg.endswith('listeners[0].max_recipients: expected a positive integer, got "ten"')
    msg = error_of(tmp_path, "[[listeners]]\nmax_recipients = 0\n")
    assert "listeners[0].max_recipients: expected a positive integer, got 0" in msg
    msg = error_of(tmp_path, '[[listeners]]\nrequire_helo = "yes"\n')
    assert 'listeners[0].require_helo: expected true or false, got "yes"' in msg
    msg = error_of(tmp_path, '[[listeners]]\nbare_linefeed = "accept"\n')
    assert 'listeners[0].bare_linefeed: expected one of "reject", "normalise"' in msg
    msg = error_of(tmp_path, "durable = 1\n")
    assert "durable: expected true or false, got 1" in msg
    msg = error_of(tmp_path, "[[listeners]]\nmax_line_length = 100\n")
    assert "listeners[0].max_line_length: expected an integer of at least 512" in msg
    msg = error_of(tmp_path, "[delivery]\nmx_port = 70000\n")
    assert "delivery.mx_port: expected a port number 1-65535, got 70000" in msg
    msg = error_of(tmp_path, 'postmaster = "nobody"\n')
    assert 'postmaster: expected a mailbox such as "postmaster@example.com"' in msg
    msg = error_of(tmp_path, "listeners = 3\n")
    assert "listeners: expected a non-empty array of tables" in msg


def test_bad_network(tmp_path: Path) -> None:
    text = '[[listeners]]\nrelay_networks = ["10.0.0.0/8", "10.0.0.0/33"]\n'
    msg = error_of(tmp_path, text)
    assert "listeners[0].relay_networks[1]: expected an IP network" in msg
    assert '"10.0.0.0/33"' in msg
    msg = error_of(tmp_path, '[[listeners]]\nrelay_networks = ["192.168.1.1/24"]\n')
    assert "listeners[0].relay_networks[0]" in msg and "host bits set" in msg
    msg = error_of(tmp_path, "[[listeners]]\nrelay_networks = '10.0.0.0/8'\n")
    assert "listeners[0].relay_networks: expected an array" in msg


def test_bad_host_port(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[[listeners]]\naddress = "127.0.0.1"\n')
    assert 'listeners[0].address: expected "host:port"' in msg
    assert error_of(tmp_path, '[[listeners]]\naddress = "::1:25"\n').count("listeners[0].address")
    msg = error_of(tmp_path, '[[listeners]]\naddress = "localhost:99999"\n')
    assert "listeners[0].address" in msg and "port" in msg
    msg = error_of(tmp_path, '[routes]\n"example.com" = ["mx.example.com:smtp"]\n')
    assert 'routes."example.com"[0]: expected "host" or "host:port"' in msg
    msg = error_of(tmp_path, '[routes]\nexample.com = ["mx:25"]\n')
    assert "routes.example: expected an array" in msg and "quote domain keys" in msg
    msg = error_of(tmp_path, '[dns]\nservers = ["ns.example.com"]\n')
    assert "dns.servers[0]: expected an IP address" in msg
    msg = error_of(tmp_path, '[[listeners]]\nname = "a"\n[[listeners]]\nname = "a"\n')
    assert 'listeners[1].name: expected a unique listener name, got "a"' in msg
    text = '[[listeners]]\nname = "a"\n[[listeners]]\nname = "b"\naddress = "127.0.0.1:2525"\n'
    assert "listeners[1].address: expected a unique address" in error_of(tmp_path, text)


def test_bad_duration(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'max_queue_time = "5 weeks"\n')
    assert 'max_queue_time: expected a duration (seconds, or a string like "30s"' in msg
    assert msg.endswith('got "5 weeks"')
    msg = error_of(tmp_path, "[delivery]\nconnect_timeout = -1\n")
    assert "delivery.connect_timeout: expected a duration" in msg
    msg = error_of(tmp_path, "[[listeners]]\ndata_timeout = true\n")
    assert "listeners[0].data_timeout: expected a duration" in msg
    msg = error_of(tmp_path, '[delivery]\nretry_initial = "2h"\nretry_max = "1h"\n')
    assert "delivery.retry_max: expected a duration no shorter than retry_initial" in msg


def test_toml_syntax_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'hostname = "a.example"\n\n[[listeners]\nname = "x"\n')
    assert "TOML syntax error" in msg and "line 3" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(path)


def sluice(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
        timeout=60,
    )


def test_cli_config_check_ok(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE)
    result = sluice("config", "check", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok\n")
    assert "listener inbound: 0.0.0.0:25" in result.stdout
    assert "listener outbound: [::1]:587" in result.stdout
    assert "route example.com -> mail1.internal:2525, [2001:db8::25]:25, 192.0.2.25:25" in (
        result.stdout
    )


def test_cli_config_check_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[[listeners]]\nmax_recipients = "ten"\n')
    result = sluice("config", "check", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f'{path}: listeners[0].max_recipients: expected a positive integer, got "ten"'
    )


def test_cli_version_and_run_config_error(tmp_path: Path) -> None:
    result = sluice("--version")
    assert result.returncode == 0 and result.stdout.startswith("sluice ")
    result = sluice("run", "--config", write(tmp_path, "bogus = 1\n"))
    assert result.returncode == 2 and "bogus: unknown key" in result.stderr


def test_cli_queue(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write(tmp_path, f'data_dir = "{data}"\n')
    result = sluice("queue", "--config", config)
    assert result.returncode == 1 and "does not exist" in result.stderr

    data.mkdir()
    result = sluice("queue", "--config", config)
    assert result.returncode == 0 and result.stdout == "queue is empty\n"

    from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id

    later = time.time() + 3600
    rec = MessageRecord(
        qid=new_queue_id(),
        arrived=time.time(),
        sender="",
        mail_params=[],
        recipients=[
            RecipientRecord("a@example.com", [], state="deferred", attempts=2, last_reply="451 x"),
            RecipientRecord("b@example.com", [], state="delivered", attempts=1),
        ],
        size=1234,
        next_attempt=later,
    )

    async def fill() -> None:
        q = Queue(data)
        await q.submit(rec, b"body")
        await q.close()

    uvloop.run(fill())

    result = sluice("queue", "--config", config)
    assert result.returncode == 0, result.stderr
    assert rec.qid in result.stdout and "<>" in result.stdout and "1234" in result.stdout
    assert "a@example.com" in result.stdout and "deferred" in result.stdout
    assert "451 x" in result.stdout

    result = sluice("queue", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["qid"] == rec.qid and row["sender"] == "" and row["size"] == 1234
    first, second = row["recipients"]
    assert first["state"] == "deferred" and first["attempts"] == 2
    assert first["next_attempt"].startswith(time.strftime("%Y-"))
    assert second["next_attempt"] is None


def test_absurd_duration_is_refused_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text('max_queue_time = "99999999999d"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "max_queue_time" in str(info.value) and "at most 3650d" in str(info.value)
