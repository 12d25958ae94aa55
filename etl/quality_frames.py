"""The frames the quality suites run on, and the run's suite parameters (issue #5, docs/quality.md).

Each frame holds what a check needs and nothing more: hashes, opaque IDs, counts, times (epoch
seconds or microseconds), amounts and codes, plus an opaque row key (the export's line number,
the outbox line, the opaque ID, the day). Raw identifiers never reach a frame: the extracts are
the hashed Parquet files of ``etl.pipeline.extract_sources``, staged rows are read from the
staging database, and outbound frames are flattened from the pending outbox JSONL, which the PHI
gate has already passed (``etl.quality_outbound``, re-exported here).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import store
from etl.config import ClinicConfig
from etl.outbox import SUMMARY_FILE
from etl.quality_outbound import conversion_frames, outbound_frames
from etl.quality_suites import EXTRACT_CHECKED, Thresholds
from etl.rules.stages import RunWindow

if TYPE_CHECKING:
    from etl.pipeline import RunPaths

__all__ = ["conversion_frames", "outbound_frames"]  # flattened in etl.quality_outbound; known from here

_DAY_US = 86_400 * 1_000_000
_QUARTER_US = 900 * 1_000_000
_SAME_WEEKDAYS = 4  # weeks a weekday must have been empty to count as a day the clinic keeps closed
GOOGLE_CONVERSION_AGE_DAYS = 90  # SPEC rule 10: a conversion at most 90 days old at the run's end


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
    """Clinic-local days that ended within ``(start, end]``: each complete day judged once.

    A whole day only (a partial day would look like a drop), and judged by the run in which it
    ended: a nightly run for 03:00 -> 03:00 holds no whole day, and judges the day that ended at
    midnight inside it; a run from midnight to midnight judges exactly its own days.
    """
    tz = config.tz
    first = pd.Timestamp(window.start.astimezone(tz).date()) - pd.Timedelta(days=1)
    last = pd.Timestamp(window.end.astimezone(tz).date())
    days = pd.date_range(first, last, freq="D")
    out = []
    for day in days:
        hi = (day + pd.Timedelta(days=1)).tz_localize(tz, nonexistent="shift_forward", ambiguous=True)
        if pd.Timestamp(window.start) < hi <= pd.Timestamp(window.end):
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
    # the closed-weekday check below looks four weeks back, whatever the trailing window
    lookback = max(trailing, _SAME_WEEKDAYS * 7)
    history_start = (days[0] - pd.Timedelta(days=lookback)).tz_localize(config.tz, ambiguous=True,
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
    calendar = pd.date_range(days[0] - pd.Timedelta(days=lookback), days[-1], freq="D")
    counts = per_day.reindex(calendar, fill_value=0).astype("float64")
    median = counts.rolling(trailing, min_periods=trailing).median().shift(1)
    # a weekday the clinic keeps closed (the same weekday's median over the four weeks before is
    # under one appointment) is not a drop: its zeros are the clinic's week, not a lost export
    same_weekday = pd.concat([counts.shift(7 * w) for w in range(1, _SAME_WEEKDAYS + 1)], axis=1).median(
        axis=1, skipna=False
    )
    closed = same_weekday < 1
    judged = (median >= thresholds.volume_min_median) & ~closed
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


def conversions_frame(config: ClinicConfig, window: RunWindow, paths: RunPaths,
                      outbound: dict[str, pd.DataFrame]) -> pd.DataFrame:  # fmt: skip
    """This attempt's conversion candidates as the rules made them (``RunPaths.conversions``).

    Read rather than the outbox because it holds every candidate with its stage, event and ready
    times and value straight from the rules, whatever the destinations did with it; from the
    run's own folder rather than the ``conversions`` table, which holds the latest run of the
    clinic only. ``interval`` is "carried" for a candidate ready before this run's interval that
    the rules carried over from an unfinished upload, "own" otherwise: the run-window check
    judges the own rows. The currency comes from the pending rows by opaque ID.

    Raises:
        FileNotFoundError: the plan of this attempt was not built (the gate then fails closed).
    """
    frame = pd.read_parquet(paths.conversions)
    offset = np.where(frame["stage"] == "purchase", config.rules.value_window_days * _DAY_US, 0)
    frame["event_time"] = frame["event_time"].astype("int64")
    frame["ready_at"] = frame["ready_at"].astype("int64")
    frame["expected_ready_at"] = frame["event_time"] + offset
    frame["value"] = frame["value"].astype("float64")
    early = frame["ready_at"] < suite_parameters(config, window)["ready_from_us"]
    frame["interval"] = np.where(early & frame["carried"].astype(bool), "carried", "own")
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
