"""End to end: `sluice hosts` and `sluice hosts --json` against a real `sluice run`.

The running process publishes its destination state in <data_dir>/hosts.json every few
seconds and at shutdown; the CLI (another process) reads it and adds the recipients
queued per domain from the LMDB queue. One destination delivers (smtp-sink), the other
refuses connections and is paused by the adaptive back-off after its first failure.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tests.e2e.harness import SluiceFactory, free_port, loopback_hosts, route_to, wait_until

if TYPE_CHECKING:
    from tests.conftest import SinkFactory


def hosts_json(server: Any) -> dict[str, Any]:
    res = server.cli("hosts", "--config", str(server.config_path), "--json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def by_domain(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["domain"]: row for row in doc["destinations"]}


def test_sluice_hosts_shows_counts_queue_and_pause(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    (dead,) = loopback_hosts(1)
    server = sluice(
        routes={"ok.test": route_to(sink), "down.test": [f"{dead}:{free_port(dead)}"]},
        start=False,
    )
    with open(server.config_path, "a") as f:
        f.write('\n[destinations."down.test"]\npause_after = 1\npause_initial = "1h"\n')
        f.write('pause_max = "2h"\n')
    # Before the first start there is no snapshot and no queue: an empty answer.
    server.data_dir.mkdir(parents=True)
    empty = hosts_json(server)
    assert empty == {
        "updated": None, "started": None, "pid": None, "running": False, "destinations": []
    }  # fmt: skip
    server.start()

    with server.smtp() as client:
        refused = client.sendmail(
            "alice@src.test",
            ["a@ok.test", "b@down.test", "c@down.test"],
            b"Subject: hosts\r\n\r\nx\r\n",
        )
        assert refused == {}
    server.wait_event("delivered", recipient="a@ok.test")
    (paused,) = server.wait_event("destination_paused", destination="down.test")
    assert paused["seconds"] == 3600

    def published() -> dict[str, Any] | None:
        doc = hosts_json(server)
        rows = by_domain(doc)
        down, ok = rows.get("down.test"), rows.get("ok.test")
        if down and ok and down["paused_until"] and ok["delivered"] == 1:
            return doc
        return None

    doc = wait_until(published)
    assert doc, hosts_json(server)
    assert doc["pid"] == server.proc.pid if server.proc else False
    assert doc["running"] is True
    rows = by_domain(doc)
    down, ok = rows["down.test"], rows["ok.test"]
    assert doc["destinations"][0]["domain"] == "down.test"  # most queued first
    assert down["queued"] == 2 and down["deferred"] == 2 and down["delivered"] == 0
    assert down["active_connections"] == 0 and down["consecutive_failures"] == 1
    assert "1 consecutive failures" in down["pause_reason"]
    assert "connect to" in down["pause_reason"] and dead in down["pause_reason"]
    assert down["settings"] == "down.test"
    assert ok["queued"] == 0 and ok["delivered"] == 1 and ok["bounced"] == 0
    assert ok["last_reply"].startswith(f"{sink.host}: 250")
    assert ok["settings"] == "*"

    # The queue agrees: both held recipients wait for the end of the pause.
    (queued,) = server.queue_json()
    held = [r for r in queued["recipients"] if r["state"] == "deferred"]
    assert [r["address"] for r in held] == ["b@down.test", "c@down.test"]

    text = server.cli("hosts", "--config", str(server.config_path))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("state as of ")
    assert lines[1].split() == [
        "destination", "active", "queued", "delivered", "deferred", "bounced", "status"
    ]  # fmt: skip
    down_line = next(line for line in lines if line.startswith("down.test"))
    assert down_line.split()[1:6] == ["0", "2", "0", "2", "0"]
    assert "paused until" in down_line
    ok_line = next(line for line in lines if line.startswith("ok.test"))
    # Its connection may still be open (idle, kept a few seconds for the next message).
    assert ok_line.split()[1] in ("0", "1") and ok_line.split()[2:6] == ["0", "1", "0", "0"]

    # At shutdown the last state is written; the CLI still reads it afterwards.
    assert server.stop() == 0
    stopped = hosts_json(server)
    after = by_domain(stopped)
    assert after["down.test"]["queued"] == 2 and after["ok.test"]["delivered"] == 1
    # ... and says plainly that this is the last state of a sluice no longer running.
    assert stopped["running"] is False
    table = server.cli("hosts", "--config", str(server.config_path))
    assert f"sluice (pid {stopped['pid']}) is not running" in table.stdout
