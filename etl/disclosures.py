"""What left the building, and under which consent: the accounting a compliance officer asks for.

Read-only over the tables the sends write (``send_ledger``, ``audience_sync_log``,
``audience_state``, ``ledger_targets``) and, for one person, the staged rows; nothing here
changes them. The answer is counts plus,
on request, one line per conversion that left, keyed by its opaque ID: the same ID the platform
holds, so a deletion request or a breach review can name it, and nothing that identifies the
person outside this database (``MEDSPA_ID_SECRET`` and the staged rows are needed to go back
from an ID to an appointment).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.store import audience_state, audience_sync_log, ledger_targets, send_ledger, validation_sends

# one line per conversion that left, in this column order (docs: README "Disclosures")
CSV_COLUMNS = (
    "destination",
    "stage",
    "opaque_id",
    "status",
    "code",
    "request_id",
    "run_id",
    "sent_at",
    "consent_at",
    # "export": the export stated the consent time; "row_time": it flagged consent without a
    # time, and the lead's created_at or the appointment's start_at stands in (rule 6)
    "consent_at_source",
)
LIST_DESTINATIONS = ("google_customer_match", "meta_audience")


@dataclass
class Accounting:
    """Counts of what left ``clinic_id``'s database for the platforms in ``[since, until)``."""

    clinic_id: str
    since: datetime | None
    until: datetime | None
    target: str | None  # sandbox or live, as the first send claimed this database (None: never sent)
    # (destination, stage, status) -> rows, and of those the rows with their consent recorded
    conversions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    consent_recorded: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # destination -> {"syncs", "adds", "removes"} applied in the period, plus "members_now"
    lists: dict[str, dict[str, int]] = field(default_factory=dict)
    # (destination, target) -> {"conversions", "list_adds", "list_removes"} that validate-only
    # requests carried in the period: the platform kept nothing, but the hashes left
    validated: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "clinic_id": self.clinic_id,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "target": self.target,
            "conversions": [
                {
                    "destination": d,
                    "stage": s,
                    "status": st,
                    "rows": n,
                    "consent_recorded": self.consent_recorded[(d, s, st)],
                }
                for (d, s, st), n in sorted(self.conversions.items())
            ],
            "lists": self.lists,
            "validate_only": [
                {"destination": d, "target": t, **counts} for (d, t), counts in sorted(self.validated.items())
            ],
        }


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive UTC datetimes; PostgreSQL aware ones
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _bound(engine: Engine, value: datetime | None) -> datetime | None:
    """A period boundary as the dialect compares it: naive UTC for SQLite, aware otherwise."""
    if value is None:
        return None
    return (
        value.astimezone(UTC).replace(tzinfo=None)
        if engine.dialect.name == "sqlite"
        else value.astimezone(UTC)
    )


def _column(name: str, columns: Collection[str] | None) -> sa.ColumnElement[Any]:
    # a ledger an earlier version made lacks the consent columns: its rows read "not recorded"
    return send_ledger.c[name] if columns is None or name in columns else sa.null()


def target_of(engine: Engine, clinic_id: str) -> str | None:
    """The target (sandbox or live) the clinic's first send claimed this database for."""
    with engine.connect() as conn:
        target: str | None = conn.execute(
            sa.select(ledger_targets.c.target).where(ledger_targets.c.clinic_id == clinic_id)
        ).scalar()
    return target


def sent_live(engine: Engine, clinic_id: str) -> bool:
    """Whether anything of the clinic left for the live platforms from this database: a live
    claim, or a live validate-only request (made before any live send, often). Such rows carry
    opaque IDs made with the real ``MEDSPA_ID_SECRET``."""
    if target_of(engine, clinic_id) == "live":
        return True
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("validation_sends"):
            return False
        v = validation_sends.c
        query = sa.select(v.id).where(v.clinic_id == clinic_id, v.target == "live").limit(1)
        return conn.execute(query).first() is not None


def account(
    engine: Engine,
    clinic_id: str,
    *,
    since: datetime | None,
    until: datetime | None,
    columns: Collection[str] | None = None,
) -> Accounting:
    """Count the conversions that left in ``[since, until)`` (by the time the row was sent) per
    destination, stage and outcome, and the list syncs applied in it.

    A conversion "left" once a request carried it (``send_ledger.sent_at``, the first time):
    sent, accepted, rejected by the platform, already_sent (the platform said it holds it), and
    deferred after a request (throttled, too recent). Planned rows, rows our own checks refused
    and rows deferred without a request did not leave.
    """
    result = Accounting(clinic_id=clinic_id, since=since, until=until, target=None)
    lo, hi = _bound(engine, since), _bound(engine, until)
    result.target = target_of(engine, clinic_id)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                send_ledger.c.destination,
                sa.func.coalesce(send_ledger.c.stage, ""),
                send_ledger.c.status,
                sa.func.count(),
                sa.func.count(_column("consent_at", columns)),
            )
            .where(send_ledger.c.clinic_id == clinic_id, _sent_in(lo, hi))
            .group_by(
                send_ledger.c.destination, sa.func.coalesce(send_ledger.c.stage, ""), send_ledger.c.status
            )
        )
        for destination, stage, status, n, with_consent in rows:
            result.conversions[(destination, stage, status)] = int(n)
            result.consent_recorded[(destination, stage, status)] = int(with_consent)
        log = audience_sync_log.c
        synced = {
            destination: (int(n), int(adds or 0), int(removes or 0))
            for destination, n, adds, removes in conn.execute(
                sa.select(log.destination, sa.func.count(), sa.func.sum(log.adds), sa.func.sum(log.removes))
                .where(log.clinic_id == clinic_id, _synced_in(lo, hi))
                .group_by(log.destination)
            )
        }
        for destination in LIST_DESTINATIONS:
            members = conn.execute(
                sa.select(sa.func.count()).where(
                    audience_state.c.clinic_id == clinic_id, audience_state.c.destination == destination
                )
            ).scalar_one()
            syncs, adds, removes = synced.get(destination, (0, 0, 0))
            if syncs or members:
                result.lists[destination] = {
                    "syncs": syncs, "adds": adds, "removes": removes, "members_now": int(members)
                }  # fmt: skip
        if sa.inspect(conn).has_table("validation_sends"):  # a read-only copy an earlier version made
            v = validation_sends.c
            for destination, target, conversions, adds, removes in conn.execute(
                sa.select(v.destination, v.target, sa.func.count(v.opaque_id), sa.func.sum(v.adds), sa.func.sum(v.removes))
                .where(v.clinic_id == clinic_id, *_period(v.sent_at, lo, hi))
                .group_by(v.destination, v.target)
            ):  # fmt: skip
                result.validated[(destination, target)] = {
                    "conversions": int(conversions), "list_adds": int(adds or 0), "list_removes": int(removes or 0)
                }  # fmt: skip
    return result


def _period(
    column: sa.ColumnElement[Any], lo: datetime | None, hi: datetime | None
) -> list[sa.ColumnElement[bool]]:
    return [*([] if lo is None else [column >= lo]), *([] if hi is None else [column < hi])]


def _sent_in(lo: datetime | None, hi: datetime | None) -> sa.ColumnElement[bool]:
    return sa.and_(send_ledger.c.sent_at.is_not(None), *_period(send_ledger.c.sent_at, lo, hi))


def _synced_in(lo: datetime | None, hi: datetime | None) -> sa.ColumnElement[bool]:
    return sa.and_(sa.true(), *_period(audience_sync_log.c.synced_at, lo, hi))


def conversion_lines(
    engine: Engine,
    clinic_id: str,
    *,
    since: datetime | None,
    until: datetime | None,
    ids: Sequence[str] | None = None,
    columns: Collection[str] | None = None,
) -> Iterator[tuple[str, ...]]:
    """One tuple per conversion that left in ``[since, until)`` (only ``ids``, when given), in
    ``CSV_COLUMNS`` order, sorted by send time then destination and opaque ID; times in UTC
    ISO 8601. A validate-only request's rows are lines too, status ``validate_only`` (the
    platform's verdict in ``code``; no consent recorded: the ledger was not written)."""
    lo, hi = _bound(engine, since), _bound(engine, until)
    sent = sa.select(
        send_ledger.c.destination,
        send_ledger.c.stage,
        send_ledger.c.opaque_id,
        send_ledger.c.status,
        send_ledger.c.code,
        send_ledger.c.request_id,
        send_ledger.c.run_id,
        send_ledger.c.sent_at,
        _column("consent_at", columns).label("consent_at"),
        _column("consent_stated", columns).label("consent_stated"),
    ).where(
        send_ledger.c.clinic_id == clinic_id,
        _sent_in(lo, hi),
        sa.true() if ids is None else send_ledger.c.opaque_id.in_(ids),
    )
    with engine.connect() as conn:
        query: sa.Select[Any] | sa.CompoundSelect = sent
        if sa.inspect(conn).has_table("validation_sends"):  # a read-only copy an earlier version made
            v = validation_sends.c
            checked = sa.select(
                v.destination, v.stage, v.opaque_id, sa.literal("validate_only").label("status"), v.code,
                v.request_id, v.run_id, v.sent_at,
                sa.cast(sa.null(), send_ledger.c.consent_at.type).label("consent_at"),
                sa.cast(sa.null(), sa.Boolean).label("consent_stated"),
            ).where(
                v.clinic_id == clinic_id, v.opaque_id.is_not(None), *_period(v.sent_at, lo, hi),
                sa.true() if ids is None else v.opaque_id.in_(ids),
            )  # fmt: skip
            query = sa.union_all(sent, checked)
        ordered = query.order_by(sa.literal_column("sent_at"), sa.literal_column("destination"),
                                 sa.literal_column("opaque_id"))  # fmt: skip
        for row in conn.execution_options(stream_results=True).execute(ordered):
            *head, sent_at, consent_at, stated = row
            yield (
                *(value or "" for value in head),
                _iso(_as_datetime(sent_at)),
                _iso(_as_datetime(consent_at)),
                "" if consent_at is None or stated is None else ("export" if stated else "row_time"),
            )


def _as_datetime(value: Any) -> datetime | None:
    # a UNION's column may come back from SQLite as text: the column type no longer applies
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _iso(value: datetime | None) -> str:
    moment = _utc(value)
    return moment.isoformat() if moment else ""


def write_csv(path: Path, lines: Iterator[tuple[str, ...]]) -> int:
    """Write the lines to ``path`` (owner read/write only: it is an internal record), replacing
    it only once complete. Returns the number of conversion lines."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for line in lines:
                writer.writerow(line)
                count += 1
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a database error mid-stream leaves no half file
    return count


# --- one person: what left about them (a patient's access or deletion request, a revocation) ---

PERSON_KINDS = ("email", "phone", "patient_id")


@dataclass
class Recall:
    """What the ledger and the lists hold about one person, found from identifiers the officer
    supplied (never echoed): counts here, the lines by opaque ID in ``lines``."""

    persons: int  # linked persons the identifiers found (more than one: they name several people)
    appointments: int
    leads: int
    lines: list[tuple[str, ...]]  # CSV_COLUMNS, one per conversion of theirs that left
    lists: dict[str, int]  # destination -> list entries holding one of their hashes now


def read_person_file(path: Path) -> list[tuple[str, str]]:
    """``kind: value`` lines (``email``, ``phone``, ``patient_id``); blank and ``#`` lines skipped.

    Raises:
        ConfigError: naming the file and line, never the value.
    """
    from etl.errors import ConfigError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the person file ({type(exc).__name__})") from None
    out: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kind, sep, value = line.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in PERSON_KINDS or not value.strip():
            raise ConfigError(
                f"{path}, line {number}: expected 'email: ...', 'phone: ...' or 'patient_id: ...'"
            )
        out.append((kind, value.strip()))
    if not out:
        raise ConfigError(f"{path}: no identifier in the person file")
    return out


def recall(
    engine: Engine,
    config: Any,
    secret: bytes,
    identities: list[tuple[str, str]],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: Collection[str] | None = None,
) -> Recall:
    """Everything sent about the person (or people) the identities name.

    The identities are normalized and hashed as the pipeline does (SPEC rule 9, Google form, as
    rule 2 links), matched against every staged row, and widened to the whole linked person
    (rule 2, today's staging). Each of their appointments names two opaque IDs (consultation,
    purchase): the ledger rows under those that left are theirs, whichever journey sent them.
    The lists hold their hashes when a current member entry carries any of them.

    Raises:
        ConfigError: no identity normalizes to anything usable.
    """
    import numpy as np

    from etl import staging
    from etl.errors import ConfigError
    from etl.identifiers import normalize_email_google, normalize_phone_e164, sha256_hex
    from etl.rules.persons import link_persons
    from etl.rules.stages import opaque_id

    emails, phones, patients = set(), set(), set()
    for kind, value in identities:
        if kind == "email" and (email := normalize_email_google(value)) is not None:
            emails.add(sha256_hex(email))
        elif kind == "phone" and (phone := normalize_phone_e164(value, config.default_region)) is not None:
            phones.add(sha256_hex(phone))
        elif kind == "patient_id":
            patients.add(value)
    if not (emails or phones or patients):
        raise ConfigError("no email, phone or patient_id in the person file is usable (rule 9 normalization)")
    everything = datetime(9999, 1, 1, tzinfo=UTC)
    # test records take no part in linking (rule 1), as in a run
    appts = staging.load_staged(engine, "appointments", config.clinic_id, before=everything)
    appts = appts[~appts["is_test"].to_numpy(dtype=bool)].reset_index(drop=True)
    leads = staging.load_staged(engine, "leads", config.clinic_id, before=everything)
    leads = leads[~leads["is_test"].to_numpy(dtype=bool)].reset_index(drop=True)
    a_person, l_person = link_persons(appts, leads)
    seed_a = appts["em_g"].isin(emails) | appts["ph_g"].isin(phones) | appts["patient_id"].isin(patients)
    seed_l = leads["em_g"].isin(emails) | leads["ph_g"].isin(phones)
    persons = np.union1d(a_person[seed_a.to_numpy()], l_person[seed_l.to_numpy()])
    mine_a = appts[np.isin(a_person, persons)]
    mine_l = leads[np.isin(l_person, persons)]
    ids = [
        opaque_id(secret, config.clinic_id, stage, str(aid))
        for aid in mine_a["appointment_id"]
        for stage in ("consultation", "purchase")
    ]
    lines: list[tuple[str, ...]] = []
    for lo in range(0, len(ids), 500):
        chunk = ids[lo : lo + 500]
        lines.extend(
            conversion_lines(engine, config.clinic_id, since=since, until=until, ids=chunk, columns=columns)
        )
    lines.sort(key=lambda line: (line[7], line[0], line[2]))
    hashes = {
        h
        for frame in (mine_a, mine_l)
        for column in ("em_g", "em_m", "ph_g", "ph_m")
        for h in frame[column].dropna()
    }
    lists: dict[str, int] = {}
    with engine.connect() as conn:
        for destination in LIST_DESTINATIONS:
            payloads = conn.execute(
                sa.select(audience_state.c.payload).where(
                    audience_state.c.clinic_id == config.clinic_id,
                    audience_state.c.destination == destination,
                )
            ).scalars()
            lists[destination] = sum(1 for payload in payloads if any(h in payload for h in hashes))
    return Recall(persons=len(persons), appointments=len(mine_a), leads=len(mine_l), lines=lines, lists=lists)
