"""End to end: the operator's side. Configuration errors at start-up, `sluice config
check`, and a clean SIGTERM shutdown with a client mid-session."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.e2e.harness import SLUICE, RawSmtp, SluiceFactory, wait_until

if TYPE_CHECKING:
    from tests.conftest import SinkFactory


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SLUICE, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_run_refuses_unknown_key(sluice: SluiceFactory, tmp_path: Path) -> None:
    server = sluice(start=False)
    bad = tmp_path / "bad.toml"
    text = server.config_path.read_text().replace(
        "[delivery]\n", '[delivery]\nretry_intial = "1s"\n'
    )
    bad.write_text(text)
    result = run_cli("run", "--config", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    assert str(bad) in result.stderr
    assert "delivery.retry_intial" in result.stderr
    assert "unknown key" in result.stderr
    # It stopped before listening or creating anything.
    assert not server.log_path.exists()
    assert not server.data_dir.exists()


def test_config_check_good_and_bad(sluice: SluiceFactory, tmp_path: Path) -> None:
    server = sluice(start=False)
    good = run_cli("config", "check", str(server.config_path), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert f"{server.config_path}: ok" in good.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(
        server.config_path.read_text().replace(
            "[[listeners]]\n", '[[listeners]]\nrelay_network = ["10.0.0.0/8"]\n'
        )
    )
    result = run_cli("config", "check", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "listeners[0].relay_network" in result.stderr

    wrong_value = tmp_path / "wrong-value.toml"
    wrong_value.write_text(
        server.config_path.read_text()
        .replace("[[listeners]]\n", '[[listeners]]\nrelay_networks = ["10.1.2.3/8"]\n', 1)
        .replace('"relay_networks" = ["127.0.0.0/8"]\n', "")
    )
    result = run_cli("config", "check", str(wrong_value), cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert str(wrong_value) in result.stderr
    assert "listeners[0].relay_networks[0]" in result.stderr


def test_sigterm_says_421_and_exits_cleanly(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    # One message stays queued (the next hop defers it) to show the queue survives.
    deferring = smtp_sink(soft=["RCPT"])
    server = sluice(routes={"later.test": [f"{deferring.host}:{deferring.port}"]})
    with server.smtp() as client:
        assert client.sendmail("a@src.test", ["b@later.test"], b"Subject: stays\r\n\r\nx\r\n") == {}
    [accepted] = server.wait_event("accepted")
    server.wait_event("deferred", qid=accepted["qid"])

    idle = RawSmtp(server.host, server.port)
    try:
        assert idle.reply()[0] == 220
        assert idle.command(b"EHLO idle.test")[0] == 250
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code, text = idle.reply()
        assert (code, text[:5]) == (421, "4.3.2"), (code, text)
        assert idle.closed_by_peer(timeout=10)
        assert server.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 8
    finally:
        idle.close()
    assert server.events("shutdown", phase="done")

    # The queue reopens: `sluice queue` reads it, and so does a new server.
    rows = server.queue_json()
    assert [row["qid"] for row in rows] == [accepted["qid"]]
    listing = server.cli("queue", "--config", str(server.config_path))
    assert listing.returncode == 0 and accepted["qid"] in listing.stdout
    server.start()
    assert server.events("startup")[-1]["queued"] == 1
    assert wait_until(lambda: len(server.events("deferred", qid=accepted["qid"])) >= 2)


def test_second_instance_on_the_same_data_dir_is_refused(
    sluice: SluiceFactory, tmp_path: Path
) -> None:
    first = sluice()
    second_config = tmp_path / "second.toml"
    # Same data directory and log, another port: it must not start a second writer.
    second_config.write_text(
        first.config_path.read_text().replace(f':{first.port}"', f':{first.port + 1}"')
    )
    result = run_cli("run", "--config", str(second_config), cwd=tmp_path)
    assert result.returncode == 1
    assert "in use by sluice pid" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # The first one is unharmed.
    with RawSmtp(first.host, first.port) as client:
        assert client.reply()[0] == 220


def test_unwritable_log_file_is_a_one_line_error(sluice: SluiceFactory, tmp_path: Path) -> None:
    server = sluice(start=False)
    bad = tmp_path / "bad-log.toml"
    bad.write_text(
        server.config_path.read_text().replace(
            str(server.log_path), str(tmp_path / "no" / "such" / "dir" / "events.jsonl")
        )
    )
    result = run_cli("run", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("sluice: log_file "), result.stderr
    assert "No such file or directory" in result.stderr


def test_sighup_reopens_the_event_log(sluice: SluiceFactory, tmp_path: Path) -> None:
    server = sluice()
    assert server.proc is not None
    rotated = server.log_path.with_suffix(".1")
    server.log_path.rename(rotated)
    server.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: server.log_path.exists(), timeout=10)
    assert server.proc.poll() is None, "SIGHUP must not stop the gateway"
    with RawSmtp(server.host, server.port) as client:
        assert client.reply()[0] == 220
    assert wait_until(lambda: '"event":"connect"' in server.log_path.read_text(), timeout=10)
    assert '"event":"connect"' not in rotated.read_text()


def test_refused_recipient_is_logged_with_the_reason(sluice: SluiceFactory) -> None:
    server = sluice(listener={"relay_networks": ["192.0.2.0/24"]})
    with RawSmtp(server.host, server.port) as client:
        client.reply()
        client.command(b"EHLO client.test")
        client.command(b"MAIL FROM:<a@src.test>")
        assert client.command(b"RCPT TO:<b@elsewhere.test>") == (550, "5.7.1 relaying denied")
    [event] = server.wait_event("reject", stage="rcpt")
    assert event["recipient"] == "b@elsewhere.test"
    assert event["sender"] == "a@src.test"
    assert event["reply"].startswith("550 5.7.1")
