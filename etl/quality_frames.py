"""The frames the quality suites run on, and the run's suite parameters (issue #5, docs/quality.md).

Each frame holds what a check needs and nothing more: hashes, opaque IDs, counts, times (epoch
seconds or microseconds), amounts and codes, plus an opaque row key (the export's line number,
the outbox line, the opaque ID, the day). Raw identifiers never reach a frame: the extracts are
the hashed Parquet files of ``etl.pipeline.extract_sources``, staged rows are read from the
staging database, and outbound frames are flattened from the pending outbox JSONL, which the PHI
gate has already passed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import store
from etl.config import ClinicConfig
from etl.outbox import OUTBOX_FILES, SUMMARY_FILE, read_rows
from etl.payloads import google_member_key
from etl.quality_suites import EXTRACT_CHECKED, Thresholds
from etl.rules.stages import RunWindow

_DAY_US = 86_400 * 1_000_000
_QUARTER_US = 900 * 1_000_000
GOOGLE_CONVERSION_AGE_DAYS = 90  # SPEC rule 10: a conversion at most 90 days old at the run's end
_GOOGLE_COLUMNS = ("line", "order_id", "conversion_action", "conversion_date_time", "conversion_epoch",
                   "conversion_value", "currency_code", "click_id", "click_id_count", "identifier_count",
                   "has_email", "has_phone", "match_keys")  # fmt: skip
_META_COLUMNS = ("line", "event_id", "event_name", "event_time", "value", "currency", "fbc", "fbp",
                 "has_email", "has_phone", "has_external_id", "match_keys")  # fmt: skip
_MEMBER_COLUMNS = ("line", "operation", "identifier_count", "member_key", "country_code", "postal_code")
_AUDIENCE_COLUMNS = ("line", "operation", "batch_rows", "min_width", "max_width")


def _epoch_us(moment: datetime) -> int:
    return int(pd.Timestamp(moment).tz_convert("UTC").value // 1000)


def suite_parameters(config: ClinicConfig, window: RunWindow) -> dict[str, int]:
    """Values of the suites' ``$PARAMETER`` placeholders for this run (all relative to ``end``)."""
    end = window.end_ts
    meta_days = config.meta.event_age_limit_days if config.meta is not None else 62
    return {
        "ready_from_us": _epoch_us(window.start - timedelta(days=config.rules.late_arrival_days)),
        "ready_until_us": _epoch_us(window.end),
        "run_end_epoch": int(end.timestamp()),
        "google_min_epoch": int((end - pd.Timedelta(days=GOOGLE_CONVERSION_AGE_DAYS)).timestamp()),
        "meta_min_epoch": int((end - pd.Timedelta(days=meta_days)).timestamp()),
    }


def extract_frame(extracts: Path, kind: str) -> pd.DataFrame:
    """The checked columns of a hashed Parquet extract as ``extract_sources`` wrote it (after latest-wins).

    A checked column missing from the file is left out: its checks then fail as not evaluable.
    """
    path = extracts / f"{kind}.parquet"
    present = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in EXTRACT_CHECKED[kind] if c in present])


def schema_frame(extracts: Path, kind: str) -> pd.DataFrame:
    """A row-less frame with the extract's columns: what the schema suites look at."""
    names = pq.read_schema(extracts / f"{kind}.parquet").names
    return pd.DataFrame({n: pd.Series(dtype=object) for n in names})


def _full_days(config: ClinicConfig, window: RunWindow) -> list[pd.Timestamp]:
    """Clinic-local days lying wholly inside ``[start, end)``: a partial day would look like a drop."""
    tz = config.tz
    first = pd.Timestamp(window.start.astimezone(tz).date())
    last = pd.Timestamp(window.end.astimezone(tz).date())
    days = pd.date_range(first, last, freq="D")
    out = []
    for day in days:
        lo = day.tz_localize(tz, nonexistent="shift_forward", ambiguous=True)
        hi = (day + pd.Timedelta(days=1)).tz_localize(tz, nonexistent="shift_forward", ambiguous=True)
        if lo >= pd.Timestamp(window.start) and hi <= pd.Timestamp(window.end):
            out.append(day)
    return out


def volume_frame(
    engine: Engine, config: ClinicConfig, window: RunWindow, thresholds: Thresholds
) -> pd.DataFrame:
    """Staged appointments per clinic-local day of the run, against the trailing median of days before.

    Days before the first staged appointment count as zero, so a clinic's first weeks have a low
    median and are not judged (``volume_min_median``); ``ratio_to_median`` is null for them.
    """
    days = _full_days(config, window)
    columns = ["day", "appointments", "trailing_median", "ratio_to_median"]
    if not days:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c != "day" else object) for c in columns})
    trailing = thresholds.volume_trailing_days
    history_start = (days[0] - pd.Timedelta(days=trailing)).tz_localize(config.tz, ambiguous=True,
                                                                        nonexistent="shift_forward")  # fmt: skip
    table = store.appointments
    # counted per UTC quarter hour in SQL: every zone's offset is a multiple of 15 minutes
    bucket = (table.c.start_at // _QUARTER_US).label("bucket")
    query = (
        sa.select(bucket, sa.func.count())
        .where(
            table.c.clinic_id == config.clinic_id,
            table.c.start_at >= _epoch_us(history_start.to_pydatetime()),
            table.c.start_at < _epoch_us(window.end),
        )
        .group_by(bucket)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).fetchall()
    starts = np.array([int(r[0]) for r in rows], dtype=np.int64) * _QUARTER_US
    local = pd.to_datetime(starts, unit="us", utc=True).tz_convert(config.tz).tz_localize(None)
    local_days = pd.DatetimeIndex(local.to_numpy().astype("datetime64[D]"))
    per_day = pd.Series([int(r[1]) for r in rows], index=local_days, dtype="int64").groupby(level=0).sum()
    calendar = pd.date_range(days[0] - pd.Timedelta(days=trailing), days[-1], freq="D")
    counts = per_day.reindex(calendar, fill_value=0).astype("float64")
    median = counts.rolling(trailing, min_periods=trailing).median().shift(1)
    judged = median >= thresholds.volume_min_median
    ratio = (counts / median).where(judged)
    picked = pd.DatetimeIndex(days)
    return pd.DataFrame(
        {
            "day": [d.strftime("%Y-%m-%d") for d in picked],
            "appointments": counts.reindex(picked).to_numpy(),
            "trailing_median": median.reindex(picked).to_numpy(),
            "ratio_to_median": ratio.reindex(picked).to_numpy(),
        }
    )


def _frame(rows: list[tuple[Any, ...]], columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=list(columns))
    return frame.astype({c: object for c in columns if frame[c].dtype == np.dtype("O")})


class _Hashes:
    """Every hashed value of the outbox, long: destination, line, field, value; keyed by ``ref``."""

    def __init__(self) -> None:
        self.destination: list[str] = []
        self.line: list[int] = []
        self.field: list[str] = []
        self.value: list[str] = []

    def add(self, destination: str, line: int, field: str, values: Any) -> None:
        items = values if isinstance(values, list) else [values]
        # a non-text value keeps only its type's name: the regex fails it, nothing of it is kept
        kept = [v if isinstance(v, str) else repr(type(v)) for v in items if v is not None and v != ""]
        if kept:
            n = len(kept)
            self.value.extend(kept)
            self.line.extend([line] * n)
            self.field.extend([field] * n)
            self.destination.extend([destination] * n)

    def frame(self) -> pd.DataFrame:
        """``ref`` = destination number x 10^9 + outbox line: opaque, unique per row of a file."""
        destination = pd.Categorical(self.destination, categories=list(OUTBOX_FILES))
        ref = destination.codes.astype(np.int64) * 1_000_000_000 + np.asarray(self.line, dtype=np.int64)
        return pd.DataFrame({"ref": ref, "destination": destination, "field": pd.Categorical(self.field),
                             "value": pd.Series(self.value, dtype=object)})  # fmt: skip


def _google_rows(rows: Iterable[dict[str, Any]], hashes: _Hashes) -> pd.DataFrame:
    out = []
    for line, row in enumerate(rows, start=1):
        identifiers = row.get("user_identifiers") or []
        kinds = [k for item in identifiers if isinstance(item, dict) for k in item]
        clicks = [row[k] for k in ("gclid", "gbraid", "wbraid") if row.get(k)]
        for item in identifiers:
            for field, value in item.items() if isinstance(item, dict) else []:
                hashes.add("google_conversions", line, field, value)
        out.append((line, row.get("order_id"), row.get("conversion_action"), row.get("conversion_date_time"),
                    None, row.get("conversion_value"), row.get("currency_code"),
                    clicks[0] if clicks else None, len(clicks), len(identifiers),
                    "hashed_email" in kinds, "hashed_phone_number" in kinds, len(identifiers) + len(clicks)))  # fmt: skip
    frame = _frame(out, _GOOGLE_COLUMNS)
    times = pd.to_datetime(
        frame["conversion_date_time"], format="%Y-%m-%d %H:%M:%S%z", utc=True, errors="coerce"
    )
    epoch = (times.astype("int64") // 10**9).where(times.notna())
    frame["conversion_epoch"] = epoch.astype("Int64") if len(frame) else epoch.astype("float64")
    frame["conversion_value"] = pd.to_numeric(frame["conversion_value"], errors="coerce").astype("float64")
    return frame


def _meta_rows(rows: Iterable[dict[str, Any]], hashes: _Hashes) -> pd.DataFrame:
    out = []
    for line, row in enumerate(rows, start=1):
        user = row.get("user_data") or {}
        custom = row.get("custom_data") or {}
        for field, value in user.items():
            if field not in ("fbc", "fbp"):
                hashes.add("meta_events", line, field, value)
        keys = sum(bool(user.get(k)) for k in ("em", "ph", "fbc", "fbp", "external_id"))
        out.append((line, row.get("event_id"), row.get("event_name"), row.get("event_time"), custom.get("value"),
                    custom.get("currency"), user.get("fbc"), user.get("fbp"), bool(user.get("em")),
                    bool(user.get("ph")), bool(user.get("external_id")), keys))  # fmt: skip
    frame = _frame(out, _META_COLUMNS)
    frame["event_time"] = pd.to_numeric(frame["event_time"], errors="coerce").astype("float64")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    return frame


def _member_rows(rows: Iterable[dict[str, Any]], hashes: _Hashes) -> pd.DataFrame:
    out = []
    for line, row in enumerate(rows, start=1):
        identifiers = row.get("user_identifiers") or []
        address: dict[str, Any] = {}
        for item in identifiers:
            for field, value in item.items() if isinstance(item, dict) else []:
                if field == "address_info" and isinstance(value, dict):
                    address = value
                    for sub in ("hashed_first_name", "hashed_last_name"):
                        hashes.add("google_customer_match", line, sub, value.get(sub))
                else:
                    hashes.add("google_customer_match", line, field, value)
        key = google_member_key(row) if isinstance(identifiers, list) else None
        out.append((line, row.get("operation"), len(identifiers), key, address.get("country_code"),
                    address.get("postal_code")))  # fmt: skip
    return _frame(out, _MEMBER_COLUMNS)


def _audience_rows(rows: Iterable[dict[str, Any]], hashes: _Hashes) -> pd.DataFrame:
    out = []
    for line, row in enumerate(rows, start=1):
        data = row.get("data") or []
        widths = [len(r) if isinstance(r, list) else 0 for r in data]
        hashes.add(
            "meta_audience",
            line,
            "data",
            [cell for cells in data if isinstance(cells, list) for cell in cells],
        )
        out.append((line, row.get("operation"), len(data), min(widths, default=0), max(widths, default=0)))
    return _frame(out, _AUDIENCE_COLUMNS)


def outbound_frames(pending: Path) -> dict[str, pd.DataFrame]:
    """The pending outbox flattened: one frame per destination plus every hashed value, long."""
    hashes = _Hashes()
    frames = {
        "google_conversions": _google_rows(read_rows(pending, "google_conversions"), hashes),
        "meta_events": _meta_rows(read_rows(pending, "meta_events"), hashes),
        "google_customer_match": _member_rows(read_rows(pending, "google_customer_match"), hashes),
        "meta_audience": _audience_rows(read_rows(pending, "meta_audience"), hashes),
    }
    frames["hashes"] = hashes.frame()
    return frames


def conversions_frame(engine: Engine, config: ClinicConfig, run_id: str,
                      outbound: dict[str, pd.DataFrame]) -> pd.DataFrame:  # fmt: skip
    """This run's conversion candidates as the rules staged them (``conversions`` table).

    The table is read rather than the outbox because it holds every candidate with its stage,
    event and ready times and value straight from the rules, whatever the destinations did with
    it; the currency, which the table does not keep, comes from the pending rows by opaque ID.
    """
    table = store.conversions
    query = sa.select(table.c.opaque_id, table.c.stage, table.c.person_key, table.c.event_time,
                      table.c.ready_at, table.c.value, table.c.outcome).where(
        table.c.clinic_id == config.clinic_id, table.c.run_id == run_id)  # fmt: skip
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(query).fetchall(), columns=[c.name for c in query.selected_columns])
    offset = np.where(frame["stage"] == "purchase", config.rules.value_window_days * _DAY_US, 0)
    frame["event_time"] = frame["event_time"].astype("int64")
    frame["ready_at"] = frame["ready_at"].astype("int64")
    frame["expected_ready_at"] = frame["event_time"] + offset
    frame["value"] = frame["value"].astype("float64")
    currency = pd.concat(
        [
            outbound["google_conversions"].set_index("order_id")["currency_code"],
            outbound["meta_events"].set_index("event_id")["currency"],
        ]
    )
    currency = currency[~currency.index.duplicated()]
    frame["currency"] = frame["opaque_id"].map(currency).astype(object)
    return frame


def metrics_frame(engine: Engine, config: ClinicConfig, window: RunWindow, pending: Path) -> pd.DataFrame:
    """One row of run-level shares: attended visits in the window that no lead explains."""
    summary = json.loads((pending / SUMMARY_FILE).read_text(encoding="utf-8"))
    no_lead = int(summary.get("drops", {}).get("no_lead", 0))
    table = store.appointments
    lo = _epoch_us(window.start - timedelta(days=config.rules.late_arrival_days))
    query = sa.select(sa.func.count()).where(
        table.c.clinic_id == config.clinic_id, table.c.status == "attended", table.c.is_test.is_(False),
        table.c.start_at >= lo, table.c.start_at < _epoch_us(window.end),
    )  # fmt: skip
    with engine.connect() as conn:
        attended = int(conn.execute(query).scalar() or 0)
    share = no_lead / attended if attended else None
    return pd.DataFrame({"metric_row": [1], "attended_in_window": [attended], "no_lead": [no_lead],
                         "no_lead_share": pd.Series([share], dtype="float64")})  # fmt: skip


def conversion_frames(directory: Path) -> dict[str, pd.DataFrame]:
    """The two conversion files of an outbox (or pending plan), flattened; for the run report."""
    discard = _Hashes()
    return {
        "google_conversions": _google_rows(read_rows(directory, "google_conversions"), discard),
        "meta_events": _meta_rows(read_rows(directory, "meta_events"), discard),
    }
