"""One sender per clinic and destination: two processes never send the same batch.

The ledger alone lets two uploads that read it at the same moment both send a batch (the
nightly DAG and a CLI backfill, say); these tests race real threads and processes on one SQLite
file through ``deliver``, with in-process destinations that record what reached them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from etl import deliver, leases, ledger, store
from etl.destinations.base import AudienceResult, Outcome, RowResult
from etl.errors import SendInProgress
from tests.conftest import BASE_CONFIG, DATA, make_config

CLINIC = "sunrise-medspa"
DEST = "meta_events"
AT = datetime(2026, 6, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


class _SlowPlatform:
    """Accepts every row after a pause, so a second sender has time to collide."""

    name = DEST
    max_batch = 2

    def __init__(self, received: list[str], *, pause: float = 0.2, on_send: Any = None) -> None:
        self.received, self.pause, self.on_send = received, pause, on_send

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        if self.on_send is not None:
            self.on_send()
        time.sleep(self.pause)
        self.received += [r["event_id"] for r in rows]
        return [RowResult(r["event_id"], Outcome.ACCEPTED) for r in rows]


def _outbox(tmp_path: Path, ids: list[str]) -> Path:
    outbox = tmp_path / "outbox"
    outbox.mkdir(exist_ok=True)
    lines = [json.dumps({"event_name": "Purchase", "event_time": 1780000000, "event_id": k,
                         "action_source": "physical_store", "user_data": {"em": ["e" * 64]}})
             for k in ids]  # fmt: skip
    (outbox / "meta_events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return outbox


def _held_elsewhere(engine: sa.Engine, renewed_at: datetime, *, destination: str = DEST) -> None:
    with engine.begin() as conn:
        conn.execute(store.send_leases.insert(), {
            "clinic_id": CLINIC, "destination": destination, "holder": "worker-2:4242:abc",
            "run_id": "scheduled__2026-06-01", "host": "worker-2", "pid": 4242,
            "acquired_at": renewed_at, "renewed_at": renewed_at})  # fmt: skip


def test_two_uploads_at_once_send_each_row_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(4)]
    outbox = _outbox(tmp_path, ids)
    received: list[str] = []
    outcomes: list[object] = []
    start = threading.Barrier(2)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:

        def upload(run_id: str) -> None:
            start.wait()
            try:
                outcomes.append(deliver.upload_conversions(config, engine, outbox, _SlowPlatform(received),  # type: ignore[arg-type]
                                                           run_id=run_id, clock=lambda: AT))  # fmt: skip
            except SendInProgress as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=upload, args=(f"run-{n}",)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        recorded = {k: e.status for k, e in ledger.read_ledger(engine, CLINIC, DEST).items()}
        with engine.connect() as conn:
            left = conn.execute(sa.select(sa.func.count()).select_from(store.send_leases)).scalar()
    assert sorted(received) == ids  # each row reached the platform once
    refused = [o for o in outcomes if isinstance(o, SendInProgress)]
    assert len(refused) == 1 and "another sender holds it" in str(refused[0])
    assert recorded == dict.fromkeys(ids, "accepted")
    assert left == 0  # released at the end


def test_a_lease_held_by_a_live_process_refuses_and_one_killed_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(3)]
    outbox = _outbox(tmp_path, ids)
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from etl import leases, store\n"
         f"with store.engine_for({url!r}) as e, leases.hold(e, {CLINIC!r}, {DEST!r}, run_id='cli-backfill'):\n"
         "    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        received: list[str] = []
        with store.engine_for(url) as engine:
            with pytest.raises(SendInProgress, match="run cli-backfill") as refused:
                deliver.upload_conversions(config, engine, outbox, _SlowPlatform(received, pause=0),  # type: ignore[arg-type]
                                           run_id="nightly", clock=lambda: AT)  # fmt: skip
            assert refused.value.exit_code == 8 and received == []
            assert ledger.read_ledger(engine, CLINIC, DEST) == {}  # nothing planned either
            os.kill(holder.pid, signal.SIGKILL)  # dies holding it: no release, no heartbeat
            holder.wait()
            with caplog.at_level(logging.WARNING, logger="etl.leases"):
                counts = deliver.upload_conversions(config, engine, outbox, _SlowPlatform(received, pause=0),  # type: ignore[arg-type]
                                                    run_id="nightly", clock=lambda: AT)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert sorted(received) == ids and counts["accepted"] == 3
    assert "took over the send lease of run cli-backfill (process gone)" in caplog.text


def test_a_dead_pid_is_only_judged_gone_from_the_holders_own_pid_namespace(tmp_path: Path) -> None:
    # a container beside this one with the same host name (network_mode: host) numbers its
    # processes from 1: a PID missing here may be a live sender there
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that no longer exists here
    now = datetime.now(UTC)
    other_namespace = f"{socket.gethostname()} pid:[1]"
    assert leases.process_space() != other_namespace
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        for space, taken_over in ((other_namespace, False), (leases.process_space(), True)):
            with engine.begin() as conn:
                conn.execute(sa.delete(store.send_leases))
                conn.execute(store.send_leases.insert(), {
                    "clinic_id": CLINIC, "destination": DEST, "holder": f"x:{gone.pid}:abc", "run_id": "next-door",
                    "host": space, "pid": gone.pid, "acquired_at": now, "renewed_at": now})  # fmt: skip
            if taken_over:
                with leases.hold(engine, CLINIC, DEST, run_id="nightly"):
                    pass
            else:
                with (
                    pytest.raises(
                        SendInProgress, match=rf"run next-door, {socket.gethostname()} pid {gone.pid},"
                    ),
                    leases.hold(engine, CLINIC, DEST, run_id="nightly"),
                ):
                    pass


def test_a_process_in_another_pid_namespace_has_another_process_space() -> None:
    import shutil as sh

    if sh.which("unshare") is None:
        pytest.skip("no unshare(1) here to start a process in a new PID namespace")
    inside = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
         "from etl.leases import process_space; print(process_space())"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if inside.returncode != 0:
        pytest.skip("unshare(1) is not permitted here (needs CAP_SYS_ADMIN)")
    assert inside.stdout.split()[0] == leases.process_space().split()[0]  # same host name
    assert inside.stdout.strip() != leases.process_space()


@pytest.mark.parametrize(("silent_for", "taken_over"), [(timedelta(minutes=1), False), (leases.TTL, True)])
def test_a_lease_of_another_machine_is_taken_over_only_after_its_heartbeat_stopped(
    tmp_path: Path, silent_for: timedelta, taken_over: bool
) -> None:
    now = datetime.now(UTC)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        _held_elsewhere(engine, now - silent_for)
        if not taken_over:
            with (
                pytest.raises(SendInProgress, match="worker-2 pid 4242"),
                leases.hold(engine, CLINIC, DEST, run_id="mine", clock=lambda: now),
            ):
                pass
            return
        with leases.hold(engine, CLINIC, DEST, run_id="mine", clock=lambda: now) as lease:
            with engine.connect() as conn:
                held = conn.execute(sa.select(store.send_leases.c.holder)).scalars().all()
            assert held == [lease.holder]


def test_the_heartbeat_renews_and_a_lease_taken_over_stops_before_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases, "HEARTBEAT_SECONDS", 0.02)
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(4)]
    received: list[str] = []
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        times: list[Any] = []

        def taken_over_by_another() -> None:  # as if our heartbeat had failed for longer than TTL
            time.sleep(0.2)  # a few heartbeats
            with engine.begin() as conn:
                times.extend(conn.execute(sa.select(store.send_leases.c.acquired_at,
                                                    store.send_leases.c.renewed_at)).one())  # fmt: skip
                conn.execute(store.send_leases.update().values(holder="worker-2:1:x", run_id="other"))

        with pytest.raises(SendInProgress, match="taken over"):
            deliver.upload_conversions(config, engine, _outbox(tmp_path, ids),
                                       _SlowPlatform(received, on_send=taken_over_by_another),  # type: ignore[arg-type]
                                       run_id="mine", clock=lambda: AT)  # fmt: skip
        recorded = {k: e.status for k, e in ledger.read_ledger(engine, CLINIC, DEST).items()}
        with engine.connect() as conn:
            still = conn.execute(sa.select(store.send_leases.c.run_id)).scalars().all()
    assert received == ids[:2]  # the first batch went; the second was never started
    # the rest stays planned: unfinished, carried over by the next run
    assert recorded == {**dict.fromkeys(ids[:2], "accepted"), **dict.fromkeys(ids[2:], "planned")}
    assert still == ["other"]  # releasing does not delete the new holder's lease
    acquired_at, renewed_at = times
    assert renewed_at > acquired_at  # renewed by the heartbeat while the first batch was out


def test_a_holder_whose_renewals_fail_stops_before_another_can_take_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a renewal that raised (a busy database) was only logged: the holder never learned that
    # another sender could take over at TTL, and both sent the same batch
    monkeypatch.setattr(leases, "HEARTBEAT_SECONDS", 0.02)
    monkeypatch.setattr(leases, "UNRENEWED_LIMIT_SECONDS", 0.15)

    def busy(self: leases.Lease) -> None:
        raise sa.exc.OperationalError("UPDATE send_leases", {}, Exception("database is locked"))

    monkeypatch.setattr(leases.Lease, "renew", busy)
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(4)]
    received: list[str] = []
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        with pytest.raises(SendInProgress, match="taken over"):
            deliver.upload_conversions(config, engine, _outbox(tmp_path, ids),
                                       _SlowPlatform(received, pause=0.3),  # type: ignore[arg-type]
                                       run_id="mine", clock=lambda: AT)  # fmt: skip
        recorded = {k: e.status for k, e in ledger.read_ledger(engine, CLINIC, DEST).items()}
    assert received == ids[:2]  # the batch in flight finished; the next was never started
    assert recorded == {**dict.fromkeys(ids[:2], "accepted"), **dict.fromkeys(ids[2:], "planned")}


class _Audience:
    name = "meta_audience"
    validates_remotely = False

    def __init__(self) -> None:
        self.calls = 0

    def sync(self, adds: Any, removes: Any, *, full_resync: bool = False, validate_only: bool = False) -> Any:
        self.calls += 1
        return AudienceResult(unapplied=set(), replaced=full_resync)


def test_a_list_sync_while_another_sender_holds_the_list_changes_nothing(tmp_path: Path) -> None:
    from etl.payloads import META_AUDIENCE_SCHEMA

    config = make_config(tmp_path)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    row = {"operation": "add", "schema": list(META_AUDIENCE_SCHEMA), "data": [[f"{1:064x}", *[""] * 7]]}
    (outbox / "meta_audience.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    audience = _Audience()
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        _held_elsewhere(engine, datetime.now(UTC), destination="meta_audience")
        with pytest.raises(SendInProgress):
            deliver.sync_audience(config, engine, outbox, audience,  # type: ignore[arg-type]
                                  full_resync=False, clock=lambda: AT, run_id="r", run_end=AT)  # fmt: skip
        assert audience.calls == 0
        assert ledger.read_pending_adds(engine, CLINIC, "meta_audience") == {}
        # validate-only records nothing, so it needs no lease
        deliver.sync_audience(config, engine, outbox, audience, full_resync=False,  # type: ignore[arg-type]
                              clock=lambda: AT, validate_only=True)  # fmt: skip
        assert audience.calls == 1


def _holding_the_folder(run_dir: Path, *, shared: bool) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from etl import leases\n"
         f"with leases.hold_run_folder(Path({str(run_dir)!r}), shared={shared}):\n"
         "    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_of_the_same_interval_is_refused_while_the_first_works(tmp_path: Path) -> None:
    # two CLI runs of one interval at once: the second's extract cleared the first's outbox
    # and pending plan under it, and both died with a traceback
    from typer.testing import CliRunner

    from etl.cli import app
    from etl.errors import RunInProgress

    for name in ("appointments.csv", "leads.csv"):
        shutil.copy(DATA / "rules" / "refund" / name, tmp_path / name)
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    argv = ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01", "--end", "2026-06-30",
            "--dry-run", "--outbox", str(tmp_path / "out")]  # fmt: skip
    assert CliRunner().invoke(app, argv).exit_code == 0
    published = (tmp_path / "out" / "summary.json").read_bytes()
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    holder = _holding_the_folder(run_dir, shared=False)  # the first run, still working
    try:
        second = CliRunner().invoke(app, argv)
        assert second.exit_code == RunInProgress.exit_code == 8
        assert "another process is working on the run" in second.stderr and "Traceback" not in second.output
        assert (tmp_path / "out" / "summary.json").read_bytes() == published  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert CliRunner().invoke(app, argv).exit_code == 0  # the holder is gone: free again


def test_uploads_share_the_run_folder_and_a_writer_waits_for_them(tmp_path: Path) -> None:
    from etl.errors import RunInProgress

    run_dir = tmp_path / "run"
    holder = _holding_the_folder(run_dir, shared=True)  # one platform's upload, reading the outbox
    try:
        with leases.hold_run_folder(run_dir, shared=True):  # the other platform's, side by side
            pass
        with pytest.raises(RunInProgress), leases.hold_run_folder(run_dir):  # an extract would clear it
            pass
        # a process holding the folder takes it again without locking itself out (the CLI's steps)
    finally:
        holder.kill()
        holder.wait()
    with (
        leases.hold_run_folder(run_dir),
        leases.hold_run_folder(run_dir),
        leases.hold_run_folder(run_dir, shared=True),
    ):
        pass


def test_two_threads_sharing_a_run_folder_leave_it_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check and the lock were two steps: two threads both locked, one descriptor leaked
    # (the folder stayed locked for the process's life) and the second release raised KeyError
    import fcntl

    real_flock = fcntl.flock

    def slow_flock(fd: int, op: int) -> None:
        time.sleep(0.1)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", slow_flock)
    run_dir = tmp_path / "run"
    errors: list[BaseException] = []

    def read_outbox() -> None:
        try:
            with leases.hold_run_folder(run_dir, shared=True):
                time.sleep(0.1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read_outbox) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert errors == []
    free = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(run_dir / ".lock")],
        capture_output=True,
    )  # fmt: skip
    assert free.returncode == 0, free.stderr  # no descriptor of ours still holds it


def test_a_lease_that_cannot_be_released_does_not_hide_the_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def busy(self: leases.Lease) -> None:
        raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

    monkeypatch.setattr(leases.Lease, "release", busy)
    with (
        store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine,
        caplog.at_level(logging.WARNING),
        leases.hold(engine, CLINIC, DEST, run_id="r"),
    ):
        sent = "yes"
    assert sent == "yes" and "could not release the send lease (OperationalError)" in caplog.text
