"""One sender per clinic and destination at a time (a lease row in the staging database), and
one writer per run folder (``hold_run_folder``, a file lock).

The ledger keeps a batch from being sent twice once its outcome is recorded, but two processes
that read the ledger at the same moment (a CLI backfill started beside the nightly DAG, two
Airflow workers) could both send the same batch before either records it, and Data Manager
counts a re-sent conversion twice. Airflow's own limits only bind Airflow's tasks, so the
lease lives where every sender looks: the staging database that holds the ledger.

A holder renews its lease from a heartbeat thread while it sends; a lease not renewed for
``TTL`` (its process died on another machine), or one held by a process on this machine (and
in this PID namespace) that no longer exists, is taken over. Anything else refuses the second sender with
``SendInProgress`` before it reads the ledger: nothing was sent, and a rerun after the first
one ends is safe.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.errors import RunInProgress, SendInProgress
from etl.store import send_leases

log = logging.getLogger(__name__)

TTL = timedelta(minutes=5)
HEARTBEAT_SECONDS = 60.0
# a holder whose heartbeat has not renewed for this long stops before its next request: another
# machine may take the lease over at TTL, and a batch in flight must not cross that
UNRENEWED_LIMIT_SECONDS = TTL.total_seconds() / 2

Clock = Callable[[], datetime]


def _wall_clock() -> datetime:
    return datetime.now(UTC)  # lease times only, never a rule input


class Lease:
    """A held lease: ``check()`` before each request raises if another sender took it over."""

    def __init__(self, engine: Engine, clinic_id: str, destination: str, holder: str, clock: Clock) -> None:
        self._engine, self._clinic_id, self._destination = engine, clinic_id, destination
        self.holder = holder
        self._clock = clock
        self._lost = threading.Event()
        self._renewed = time.monotonic()  # acquired just now

    def _where(self) -> sa.ColumnElement[bool]:
        return sa.and_(
            send_leases.c.clinic_id == self._clinic_id,
            send_leases.c.destination == self._destination,
            send_leases.c.holder == self.holder,
        )

    def renew(self) -> None:
        with self._engine.begin() as conn:
            renewed = conn.execute(send_leases.update().where(self._where()).values(renewed_at=self._clock()))
        if renewed.rowcount != 1:
            self._lost.set()
        else:
            self._renewed = time.monotonic()

    def check(self) -> None:
        """Raises:
        SendInProgress: the lease went to another sender (this one's heartbeat could not renew
            it for ``TTL``), or it has not been renewed for ``UNRENEWED_LIMIT_SECONDS`` (a
            renewal that fails, say on a busy database, does not tell this holder it lost the
            lease; another may take it over at ``TTL``); stop before the next request.
        """
        if time.monotonic() - self._renewed >= UNRENEWED_LIMIT_SECONDS:
            self._lost.set()
        if self._lost.is_set():
            raise SendInProgress(
                f"{self._destination} for clinic {self._clinic_id}: this sender's lease was taken over "
                "(it could not be renewed in time); stopped before the next request. What was sent is "
                "in the ledger; rerun to send the rest"
            )

    def release(self) -> None:
        with self._engine.begin() as conn:
            conn.execute(send_leases.delete().where(self._where()))


@contextmanager
def hold(
    engine: Engine,
    clinic_id: str,
    destination: str,
    *,
    run_id: str,
    clock: Clock = _wall_clock,
    heartbeat_seconds: float | None = None,
) -> Iterator[Lease]:
    """Hold the send lease of one clinic's destination for the duration of the block.

    Raises:
        SendInProgress: another live sender holds it; nothing was read or sent.
    """
    lease = _acquire(engine, clinic_id, destination, run_id=run_id, clock=clock)
    stop = threading.Event()
    every = HEARTBEAT_SECONDS if heartbeat_seconds is None else heartbeat_seconds

    def beat() -> None:
        while not stop.wait(every):
            try:
                lease.renew()
            except Exception as exc:  # a busy database, say: the next beat tries again
                log.warning("%s: could not renew the send lease (%s)", destination, type(exc).__name__)

    heartbeat = None
    if engine.url.database not in (None, "", ":memory:"):  # an in-memory database has one user
        heartbeat = threading.Thread(target=beat, name=f"lease-{destination}", daemon=True)
        heartbeat.start()
    try:
        yield lease
    finally:
        stop.set()
        if heartbeat is not None:
            heartbeat.join()
        try:
            lease.release()
        except sa.exc.SQLAlchemyError as exc:
            # not worth hiding the send's own outcome for: the lease frees itself when this
            # process is gone (this machine) or after TTL without a heartbeat (another one)
            log.warning("%s: could not release the send lease (%s)", destination, type(exc).__name__)


def process_space() -> str:
    """Where this process's PID means something: the host name, plus the PID namespace on Linux.

    Containers sharing a host name (``network_mode: host``) each number their processes from 1:
    a PID that does not exist here may be a live sender in the container next door, so a lease
    is only judged "process gone" from within the same namespace.
    """
    host = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:  # not Linux, or no /proc: the host name alone
        return host
    return f"{host} {namespace}"


def _acquire(engine: Engine, clinic_id: str, destination: str, *, run_id: str, clock: Clock) -> Lease:
    host, pid = process_space(), os.getpid()
    holder = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:12]}"
    now = clock()
    row = {"clinic_id": clinic_id, "destination": destination, "holder": holder, "run_id": run_id,
           "host": host, "pid": pid, "acquired_at": now, "renewed_at": now}  # fmt: skip
    with engine.begin() as conn:
        if _insert_if_absent(conn, row):
            return Lease(engine, clinic_id, destination, holder, clock)
        current = (
            conn.execute(
                sa.select(send_leases).where(
                    send_leases.c.clinic_id == clinic_id, send_leases.c.destination == destination
                )
            )
            .mappings()
            .one_or_none()
        )
        if current is None:  # released between the insert and the read (PostgreSQL): free again
            if _insert_if_absent(conn, row):
                return Lease(engine, clinic_id, destination, holder, clock)
            raise _raced(destination, clinic_id)
        renewed_at = _utc(current["renewed_at"])
        gone = current["host"] == host and not _alive(current["pid"])
        if not gone and now - renewed_at < TTL:
            raise SendInProgress(
                f"{destination} for clinic {clinic_id}: another sender holds it (run {current['run_id']}, "
                f"{str(current['host']).split()[0]} pid {current['pid']}, since {_utc(current['acquired_at']):%Y-%m-%d %H:%M:%S} "
                f"UTC); nothing was sent. Rerun when it has ended (a sender that died is taken over after "
                f"{int(TTL.total_seconds() // 60)} minutes without a heartbeat)"
            )
        # compare-and-swap on the old holder: of two senders taking over, one wins
        taken = conn.execute(
            send_leases.update()
            .where(
                send_leases.c.clinic_id == clinic_id,
                send_leases.c.destination == destination,
                send_leases.c.holder == current["holder"],
            )
            .values(**{k: v for k, v in row.items() if k not in ("clinic_id", "destination")})
        )
        if taken.rowcount != 1:
            raise _raced(destination, clinic_id)
    log.warning(
        "%s: took over the send lease of run %s (%s); that sender stopped without releasing it",
        destination,
        current["run_id"],
        "process gone" if gone else "no heartbeat",
    )
    return Lease(engine, clinic_id, destination, holder, clock)


def _raced(destination: str, clinic_id: str) -> SendInProgress:
    return SendInProgress(
        f"{destination} for clinic {clinic_id}: another sender took the lease at the same moment; "
        "nothing was sent. Rerun when it has ended"
    )


def _insert_if_absent(conn: Connection, row: dict[str, object]) -> bool:
    from etl.ledger import dialect_insert

    insert = dialect_insert(conn, send_leases).on_conflict_do_nothing(
        index_elements=["clinic_id", "destination"]
    )
    return bool(conn.execute(insert, row).rowcount == 1)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_folders: dict[Path, tuple[int, int, bool]] = {}  # run folder -> (lock descriptor, depth, shared) held here
_folders_guard = threading.Lock()


@contextmanager
def hold_run_folder(run_dir: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a run's folder: exclusively for the steps that write it (extract, stage, plan,
    publish, report), shared for the uploads that read its outbox.

    A second run of the same interval started meanwhile (a CLI run beside another, or beside
    the DAG) would otherwise clear the first one's outbox and pending plan under it. Taken
    again by a process that holds it (the CLI's run around its own steps), it is not locked
    twice.

    Raises:
        RunInProgress: another process holds the folder; this step changed nothing.
    """
    import fcntl

    key = run_dir.resolve()
    with _folders_guard:  # the check and the lock as one step: threads of this process too
        held = _folders.get(key)
        if held is not None:
            fd, depth, was_shared = held
            if was_shared and not shared:  # this process only reads it: it cannot write it too
                raise RunInProgress(f"the run in {run_dir} is being read (an upload); nothing was changed")
            _folders[key] = (fd, depth + 1, was_shared)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:  # never waits, so holding the guard meanwhile is fine
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunInProgress(
                    f"another process is working on the run in {run_dir} (extract, plan, publish, an "
                    "upload or the report); nothing was changed. Rerun when it has ended"
                ) from None
            _folders[key] = (fd, 1, shared)
    try:
        yield
    finally:
        with _folders_guard:
            fd, depth, was_shared = _folders[key]
            if depth > 1:
                _folders[key] = (fd, depth - 1, was_shared)
            else:
                del _folders[key]
                os.close(fd)  # closing the descriptor releases the lock
