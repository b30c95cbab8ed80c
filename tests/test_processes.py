"""Several delivery processes (`[delivery] processes = N`): the configuration key, the
limits each process gets (`process_share`), the sharded scheduler and the merged
`sluice hosts` view. The processes themselves are tested in tests/e2e/test_e2e_processes.py.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import (
    Config,
    ConfigError,
    DeliveryConfig,
    DestinationConfig,
    load_config,
    process_share,
)
from appliance.delivery.destinations import (
    HOSTS_FILE,
    hosts_file,
    merge_snapshots,
    read_snapshot,
    write_snapshot,
)
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DeliveryScheduler
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id, shard_of
from tests.conftest import SinkFactory, free_port
from tests.delivery_support import hop

# -- the configuration key --------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "sluice.toml"
    path.write_text(text)
    return load_config(str(path))


def test_processes_defaults_to_one_and_is_read(tmp_path: Path) -> None:
    assert load(tmp_path, "").delivery.processes == 1
    assert load(tmp_path, "[delivery]\nprocesses = 4\n").delivery.processes == 4
    assert load(tmp_path, "[delivery]\nprocesses = 64\n").delivery.processes == 64


@pytest.mark.parametrize("value", ["0", "-1", "65", '"2"', "2.0", "true"])
def test_bad_processes_is_refused_with_the_key_and_file(tmp_path: Path, value: str) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(f"[delivery]\nprocesses = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: delivery.processes: expected an integer from 1 to 64")
    assert message.endswith(f"got {value}")


# -- the limits of one process ----------------------------------------------------------------


def config_with(processes: int, **destinations: DestinationConfig) -> Config:
    return Config(
        source="test",
        hostname="mta.test",
        data_dir=Path("/nonexistent"),
        delivery=DeliveryConfig(max_connections=50, processes=processes),
        destinations=destinations,
    )


def test_one_process_keeps_the_configuration_exactly() -> None:
    config = config_with(1, big=DestinationConfig(max_connections=3, messages_per_minute=7))
    assert process_share(config) is config


def test_limits_are_divided_between_the_processes() -> None:
    config = config_with(
        4,
        big=DestinationConfig(max_connections=10, messages_per_minute=600),
        small=DestinationConfig(max_connections=2, messages_per_minute=5),
        unset=DestinationConfig(),
    )
    share = process_share(config)
    assert share.delivery.max_connections == 12  # 50 // 4
    assert share.delivery.processes == 4
    big, small, unset = (share.destinations[k] for k in ("big", "small", "unset"))
    assert big.max_connections == 2  # 10 // 4
    assert big.messages_per_minute == 150 and isinstance(big.messages_per_minute, int)
    # Below N: rounded up to one connection per process (so N in all), the rate a fraction.
    assert small.max_connections == 1
    assert small.messages_per_minute == pytest.approx(1.25)
    # Not set: the [delivery] limit applies, which is divided already; no rate stays none.
    assert unset.max_connections is None and unset.messages_per_minute == 0
    # Everything else is left alone.
    assert big.recipients_per_message == config.destinations["big"].recipients_per_message
    assert share.delivery.connect_timeout == config.delivery.connect_timeout


def test_a_small_global_limit_is_at_least_one_per_process() -> None:
    config = Config(
        source="test",
        hostname="mta.test",
        data_dir=Path("/nonexistent"),
        delivery=DeliveryConfig(max_connections=3, processes=8),
    )
    assert process_share(config).delivery.max_connections == 1


def test_a_fractional_rate_spaces_messages_by_its_share() -> None:
    from appliance.delivery.destinations import DestinationState

    share = process_share(config_with(2, d=DestinationConfig(messages_per_minute=3)))
    state = DestinationState("d", "d", share.destinations["d"])
    assert state.reserve(1000.0) == 0
    assert state.reserve(1000.0) == pytest.approx(40.0)  # 60 / 1.5 per minute


# -- the scheduler of one shard -----------------------------------------------------------------


async def test_a_scheduler_delivers_only_its_shard(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    config = Config(
        source="test",
        hostname="mta.test",
        data_dir=tmp_path,
        routes={"ok.test": hop(sink.host, sink.port)},
        durable=False,
        dns_servers=(("127.0.0.1", free_port()),),
        delivery=DeliveryConfig(connect_timeout=3, command_timeout=5, data_timeout=5, processes=2),
    )
    queue = Queue(tmp_path, durable=False)
    now = time.time()
    qids = []
    for i in range(20):
        body = f"Subject: {i}\r\n\r\nx\r\n".encode()
        rec = MessageRecord(
            qid=new_queue_id(),
            arrived=now,
            sender="a@src.test",
            mail_params=[],
            recipients=[RecipientRecord(f"r{i}@ok.test", [])],
            size=len(body),
            next_attempt=now,
        )
        await queue.submit(rec, body)
        qids.append(rec.qid)
    mine = {q for q in qids if shard_of(q, 2) == 1}
    assert 0 < len(mine) < 20
    sched = DeliveryScheduler(
        queue, Router(config), process_share(config), rng=random.Random(1), shard=(1, 2)
    )
    try:
        assert await sched.run_once() == len(mine)
        sched.publish()
    finally:
        await sched.close()
    left = {rec.qid for rec in queue.all()}
    await queue.close()
    assert left == set(qids) - mine
    assert len(sink.wait_for(len(mine))) == len(mine)
    # Its state goes to its own file, named by its shard.
    doc = json.loads((tmp_path / "hosts-1.json").read_text())
    assert doc["shard"] == [1, 2]
    assert doc["destinations"]["ok.test"]["delivered"] == len(mine)
    assert not (tmp_path / HOSTS_FILE).exists()


# -- the merged `sluice hosts` view -------------------------------------------------------------


def row(domain: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "domain": domain,
        "settings": "*",
        "active_connections": 0,
        "connection_limit": 25,
        "delivered": 0,
        "deferred": 0,
        "bounced": 0,
        "last_reply": "",
        "last_reply_at": None,
        "consecutive_failures": 0,
        "paused_until": None,
        "pause_reason": "",
    }
    base.update(fields)
    return base


def snap(pid: int, shard: int, updated: float, *rows: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "pid": pid,
        "shard": [shard, 2],
        "started": f"2026-05-01T08:00:0{shard}Z",
        "updated": f"2026-05-01T10:00:0{shard}Z",
        "updated_ts": updated,
        "destinations": {r["domain"]: r for r in rows},
    }


def test_hosts_file_per_shard() -> None:
    assert hosts_file(None) == HOSTS_FILE == "hosts.json"
    assert hosts_file((0, 1)) == "hosts.json"
    assert hosts_file((0, 2)) == "hosts-0.json" and hosts_file((1, 2)) == "hosts-1.json"


def test_merge_sums_counts_and_keeps_the_latest_reply_and_any_pause() -> None:
    a = snap(
        7,
        0,
        100.0,
        row("ok.test", active_connections=2, delivered=10, bounced=1,
            last_reply="mx: 250 older", last_reply_at="2026-05-01T09:59:00Z"),
        row("down.test", deferred=3, consecutive_failures=2, connection_limit=6),
        row("only0.test", delivered=1),
    )  # fmt: skip
    b = snap(
        7,
        1,
        101.0,
        row("ok.test", active_connections=1, delivered=5, deferred=2,
            last_reply="mx: 250 newer", last_reply_at="2026-05-01T09:59:30Z"),
        row("down.test", deferred=4, consecutive_failures=5, connection_limit=1,
            paused_until="2026-05-01T11:00:00Z", pause_reason="5 consecutive failures"),
    )  # fmt: skip
    merged = merge_snapshots([a, b])
    assert merged["pid"] == 7 and merged["shards"] == 2
    assert merged["started"] == "2026-05-01T08:00:00Z"  # the earliest
    assert merged["updated"] == "2026-05-01T10:00:01Z" and merged["updated_ts"] == 101.0
    ok, down, only0 = (merged["destinations"][d] for d in ("ok.test", "down.test", "only0.test"))
    assert (ok["active_connections"], ok["delivered"], ok["deferred"], ok["bounced"]) == (
        3, 15, 2, 1
    )  # fmt: skip
    assert ok["connection_limit"] == 50
    assert ok["last_reply"] == "mx: 250 newer" and ok["last_reply_at"] == "2026-05-01T09:59:30Z"
    assert down["deferred"] == 7 and down["consecutive_failures"] == 5
    assert down["paused_until"] == "2026-05-01T11:00:00Z"
    assert down["pause_reason"] == "5 consecutive failures"
    assert down["connection_limit"] == 7
    assert only0["delivered"] == 1
    # The inputs are not modified.
    assert a["destinations"]["ok.test"]["delivered"] == 10
    # Merging in the other order gives the same view.
    again = merge_snapshots([b, a])
    assert again["destinations"] == merged["destinations"]


def test_read_snapshot_merges_the_files_of_the_running_sluice(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path) is None
    # Left by an earlier run with one delivery process (another pid, older).
    old = snap(5, 0, 50.0, row("ok.test", delivered=99))
    old["shard"] = None
    write_snapshot(tmp_path, old)
    single = read_snapshot(tmp_path)
    assert single is not None and single["destinations"]["ok.test"]["delivered"] == 99
    write_snapshot(tmp_path, snap(7, 0, 100.0, row("ok.test", delivered=1)), (0, 2))
    write_snapshot(tmp_path, snap(7, 1, 101.0, row("ok.test", delivered=2)), (1, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hosts-0.json", "hosts-1.json", "hosts.json"
    ]  # fmt: skip
    merged = read_snapshot(tmp_path)
    assert merged is not None and merged["pid"] == 7
    assert merged["destinations"]["ok.test"]["delivered"] == 3
