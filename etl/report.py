"""The run report: one self-contained HTML page per run at ``<run_dir>/report.html`` (issue #5).

Built from what the run already recorded: ``summary.json`` (counts per rule, drop reason and
destination), the outbox's conversion files (dates, stages, values and which identifier kinds
each row carries) and ``quality_results`` (names and counts). It shows counts, shares, amounts
and dates only: no identifier, hash or opaque ID is written into the page (SPEC section 2 holds
for reports too). Charts are plotly figures with plotly.js inlined once, so the file opens with
no network; a run stopped by a data-quality gate gets a page too, saying where it stopped.
"""

from __future__ import annotations

import html
import json
from datetime import UTC
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import store, switches
from etl.config import ClinicConfig
from etl.outbox import SUMMARY_FILE
from etl.pipeline import REPORT_FILE, RunPaths, paths_for
from etl.quality import CheckResult, read_results
from etl.quality_suites import (
    DEFAULT_THRESHOLDS,
    EXPECTATIONS_DIR,
    build_suites,
    suite_json,
    thresholds_for,
)
from etl.rules.stages import RunWindow

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1f2933}
header{background:#1f2933;color:#fff;padding:20px 32px}header h1{margin:0 0 6px;font-size:22px}
header p{margin:2px 0;color:#cbd2d9;font-size:14px}main{padding:16px 32px 40px;max-width:1400px}
section{background:#fff;border-radius:8px;padding:16px 20px;margin:16px 0;box-shadow:0 1px 2px #0001}
h2{font-size:18px;margin:4px 0 12px}.tiles{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.tile{background:#323f4b;border-radius:6px;padding:10px 14px;min-width:130px}
.tile b{display:block;font-size:22px;color:#fff}.tile span{font-size:12px;color:#cbd2d9}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:5px 8px;
border-bottom:1px solid #e4e7eb}th{background:#f5f7fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#2f7d32}.warn{color:#a36b00;font-weight:600}.fail{color:#c62828;font-weight:600}
.banner{background:#fdecea;border-left:4px solid #c62828;padding:10px 14px;margin:12px 0;border-radius:4px}
.note{color:#616e7c;font-size:13px}
"""


def report_path(
    config: ClinicConfig, window: RunWindow, outbox: Path | None = None, label: str | None = None
) -> Path:
    """Where a run's report is written (beside its outbox folder, in the run's folder)."""
    return paths_for(config, window, outbox, label).run_dir / REPORT_FILE


def paths_for_run_id(config: ClinicConfig, run_id: str, outbox: Path | None = None) -> RunPaths:
    run_dir = config.base_dir / "var" / "runs" / run_id
    return RunPaths(run_dir=run_dir, outbox=outbox or run_dir / "outbox")


def load_summary(paths: RunPaths, engine: Engine, run_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """The published summary.json, else the last one recorded in the database (with the UTC
    time it was recorded: the page says the folder had none), else None."""
    published = paths.outbox / SUMMARY_FILE
    if published.exists():
        loaded: dict[str, Any] = json.loads(published.read_text(encoding="utf-8"))
        return loaded, None
    table = store.run_summaries
    query = (
        sa.select(table.c.summary, table.c.recorded_at)
        .where(table.c.run_id == run_id)
        .order_by(table.c.recorded_at.desc())
    )
    with engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    if row is None:
        return None, None
    at = row.recorded_at  # SQLite: naive UTC; PostgreSQL: aware, in the session's time zone
    if at is not None:
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return json.loads(row.summary), (at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else None)


def conversions_table(config: ClinicConfig, directory: Path | None) -> pd.DataFrame:
    """One row per outbound conversion: destination, stage, clinic-local day, value, identifier kinds."""
    columns = ["destination", "stage", "day", "value", "has_email", "has_phone", "has_click"]
    if directory is None or not directory.exists():
        return pd.DataFrame(columns=columns)
    from etl.quality_frames import conversion_frames

    flat = conversion_frames(directory)
    parts = []
    google, meta = flat["google_conversions"], flat["meta_events"]
    if len(google) and config.google_ads is not None:
        stage_of = {v: k for k, v in config.google_ads.conversion_actions.model_dump().items()}
        parts.append(pd.DataFrame({
            "destination": "Google Ads", "stage": google["conversion_action"].map(stage_of),
            "day": google["conversion_date_time"].str.slice(0, 10), "value": google["conversion_value"],
            "has_email": google["has_email"], "has_phone": google["has_phone"],
            "has_click": google["click_id"].notna(),
        }))  # fmt: skip
    if len(meta) and config.meta is not None:
        stage_of = {v: k for k, v in config.meta.event_names.model_dump().items()}
        local = pd.to_datetime(meta["event_time"], unit="s", utc=True).dt.tz_convert(config.tz)
        parts.append(pd.DataFrame({
            "destination": "Meta", "stage": meta["event_name"].map(stage_of), "day": local.dt.strftime("%Y-%m-%d"),
            "value": meta["value"], "has_email": meta["has_email"], "has_phone": meta["has_phone"],
            "has_click": meta["fbc"].notna(),
        }))  # fmt: skip
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def _descriptions(config: ClinicConfig) -> dict[tuple[str, str], str]:
    """What each check means, with this clinic's thresholds in the text.

    The committed suites hold the default thresholds and are read without importing Great
    Expectations; a clinic with its own ``quality`` settings gets its suites built (which does),
    so the report never says "more than 20%" of a check that ran at 1%.
    """
    suites: list[dict[str, Any]] = []
    if thresholds_for(config.quality) != DEFAULT_THRESHOLDS:
        suites = [suite_json(s) for s in build_suites(thresholds_for(config.quality)).values()]
    elif EXPECTATIONS_DIR.is_dir():  # absent in an installed package: no text
        suites = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(EXPECTATIONS_DIR.glob("*.json"))]
    out: dict[tuple[str, str], str] = {}
    for suite in suites:
        for e in suite.get("expectations", []):
            out[(suite["name"], e.get("meta", {}).get("check", ""))] = e.get("description") or ""
    return out


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figure(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    return str(pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                           config={"displaylogo": False, "responsive": True}))  # fmt: skip


def _quality_table(results: list[CheckResult], config: ClinicConfig) -> str:
    if not results:
        return '<p class="note">No data-quality results were recorded for this run.</p>'
    about = _descriptions(config)
    suites = list(dict.fromkeys(r.suite for r in results))
    rank = {"critical": 0, "warning": 1}
    ordered = sorted(
        results, key=lambda r: (suites.index(r.suite), 2 if r.success else rank.get(r.severity, 1))
    )
    rows = []
    for r in ordered:
        css, word = (
            ("pass", "passed")
            if r.success
            else (("fail", "FAILED") if r.severity == "critical" else ("warn", "warning"))
        )
        failing = "" if r.unexpected_count is None else f"{r.unexpected_count:,}"
        total = "" if r.element_count is None else f"{r.element_count:,}"
        rows.append(f"<tr><td>{_e(r.suite)}</td><td>{_e(r.check)}</td><td>{_e(r.severity)}</td>"
                    f'<td class="{css}">{word}</td><td class="num">{failing}</td><td class="num">{total}</td>'
                    f"<td>{_e(about.get((r.suite, r.check), ''))}</td></tr>")  # fmt: skip
    head = ("<tr><th>suite</th><th>check</th><th>severity</th><th>result</th><th>failing rows</th>"
            "<th>rows</th><th>what a failure means</th></tr>")  # fmt: skip
    return f'<table id="quality-table">{head}{"".join(rows)}</table>'


def _audience_table(summary: dict[str, Any]) -> str:
    rows = []
    for dest in ("google_customer_match", "meta_audience"):
        counts = summary.get("destinations", {}).get(dest)
        if counts:
            cells = "".join(f'<td class="num">{int(counts.get(k, 0)):,}</td>'
                            for k in ("members", "adds", "removes", "sent_adds", "sent_removes", "rejected"))  # fmt: skip
            note = ("not synced: suppression is on but no list ID is set" if counts.get("skipped_no_list")
                    else "left alone: a later run already synced it" if counts.get("skipped_newer_sync")
                    else "replaced: Google failed a request of it in processing" if counts.get("resync_due")
                    else "")  # fmt: skip
            rows.append(f"<tr><td>{_e(dest)}</td>{cells}<td>{_e(note)}</td></tr>")
    codes = []
    for dest in ("google_conversions", "meta_events"):
        for code, n in (summary.get("destinations", {}).get(dest, {}).get("rejected_codes") or {}).items():
            codes.append(f'<tr><td>{_e(dest)}</td><td>{_e(code)}</td><td class="num">{int(n):,}</td></tr>')
    out = ("<h3>Suppression lists</h3><table><tr><th>list</th><th>members</th><th>adds</th><th>removes</th>"
           f"<th>sent adds</th><th>sent removes</th><th>rejected</th><th>note</th></tr>{''.join(rows)}</table>")  # fmt: skip
    if codes:
        out += f"<h3>Rejections by platform code</h3><table><tr><th>destination</th><th>code</th><th>rows</th></tr>{''.join(codes)}</table>"
    checked = [
        f'<tr><td>{_e(dest)}</td><td>{_e(status)}</td><td class="num">{int(n):,}</td></tr>'
        for dest, counts in summary.get("destinations", {}).items()
        for status, n in (counts.get("request_statuses") or {}).items()
    ]
    if checked:  # Data Manager processes a request after answering it (etl.confirm)
        out += ("<h3>Earlier requests read back</h3><p class='note'>What Google made of earlier Data Manager "
                "requests: a failed request's conversions are now recorded rejected; a failed list "
                "request makes the next plan replace the list.</p><table><tr><th>destination</th>"
                f"<th>status</th><th>requests</th></tr>{''.join(checked)}</table>")  # fmt: skip
    return out


def _tiles(summary: dict[str, Any] | None, results: list[CheckResult]) -> str:
    tiles: list[tuple[str, str]] = []
    if summary:
        for stage, n in summary.get("stages", {}).items():
            tiles.append((f"{int(n):,}", f"{stage} conversions"))
        for dest, label in (("google_conversions", "Google"), ("meta_events", "Meta")):
            if (counts := summary.get("destinations", {}).get(dest)) is not None:
                tiles.append((f"{int(counts.get('planned', 0)):,}", f"{label} planned"))
                if int(counts.get("already_sent", 0)):
                    tiles.append((f"{int(counts['already_sent']):,}", f"{label} already sent"))
    critical = sum(1 for r in results if r.severity == "critical" and not r.success)
    warnings = sum(1 for r in results if r.severity == "warning" and not r.success)
    tiles.append((f"{critical}", "critical checks failed"))
    tiles.append((f"{warnings}", "warnings"))
    return (
        '<div class="tiles">'
        + "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in tiles)
        + "</div>"
    )


def build_html(config: ClinicConfig, run_id: str, summary: dict[str, Any] | None, conversions: pd.DataFrame,
               results: list[CheckResult], *, stopped: str | None = None,
               window: RunWindow | None = None, send_stops: list[switches.Stop] | None = None,
               recorded_at: str | None = None) -> str:  # fmt: skip
    """The page as a string: header, then funnel, per-day, values, coverage, quality, uploads.
    ``send_stops``: the kill switch's stops standing when the page is rendered, one banner each;
    ``recorded_at``: the summary is the database's record of an earlier attempt, not a file."""
    from plotly.offline import get_plotlyjs

    from etl import report_charts as charts

    if summary:
        span = f"{summary['start']} to {summary['end']}"
    else:
        span = (
            f"{window.start.isoformat()} to {window.end.isoformat()}" if window else "(no summary recorded)"
        )
    mode = ("dry run" if summary.get("dry_run") else f"sent to {summary.get('target')}") if summary else ""
    sections = []
    if stopped:
        sections.append(f'<div class="banner" id="stopped">The run stopped at <b>{_e(stopped)}</b>: a critical '
                        "data-quality check failed, so nothing was written to the outbox or sent.</div>")  # fmt: skip
    if recorded_at:
        sections.append(f'<div class="banner" id="recorded">The run\'s folder holds no published outbox (its '
                        "latest attempt stopped before publishing, or the run wrote its outbox elsewhere: "
                        "<code>report --outbox</code> renders from that folder): the counts "
                        f"below are the last summary recorded in the database, at {_e(recorded_at)}.</div>")  # fmt: skip
    for halt in send_stops or []:
        sections.append(f'<div class="banner" id="send-stop-{_e(halt.platform)}">Sending to <b>{_e(halt.platform)}</b> '
                        f"is {_e(halt.describe())} (kill switch, as of this report): its uploads and list sync "
                        "send nothing, and its rows not sent stay planned until <code>medspa-conversions "
                        "resume-sending</code>.</div>")  # fmt: skip
    if summary:
        sections.append("<section><h2>Where rows went</h2><div class='grid'>"
                        f"{_figure(charts.conversion_funnel(summary), 'chart-funnel')}"
                        f"{_figure(charts.drop_reasons(summary), 'chart-drops')}</div></section>")  # fmt: skip
    if len(conversions):
        sections.append(
            f"<section><h2>Conversions per day</h2>{_figure(charts.conversions_per_day(conversions), 'chart-per-day')}</section>"
        )
        sections.append("<section><h2>Values and match keys</h2><div class='grid'>"
                        f"{_figure(charts.value_distribution(conversions), 'chart-values')}"
                        f"{_figure(charts.identifier_coverage(conversions), 'chart-coverage')}</div></section>")  # fmt: skip
    else:
        earlier = sum(int(c.get("already_sent", 0)) for d, c in (summary or {}).get("destinations", {}).items()
                      if d in ("google_conversions", "meta_events"))  # fmt: skip
        note = "No outbound conversions for this run." + (
            f" {earlier:,} were left out as already sent (by earlier runs of these conversions, or"
            " an earlier attempt of this one): see the funnel and the upload outcomes."
            if earlier
            else ""
        )
        sections.append(f'<section><h2>Conversions</h2><p class="note">{note}</p></section>')
    overview = _figure(charts.quality_overview(results), "chart-quality") if results else ""
    sections.append(f"<section><h2>Data quality</h2>{overview}{_quality_table(results, config)}</section>")
    if summary:
        sections.append(f"<section><h2>Upload outcomes</h2>{_figure(charts.upload_outcomes(summary), 'chart-uploads')}"
                        f"{_audience_table(summary)}</section>")  # fmt: skip
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Run report {_e(run_id)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><h1>Offline conversions run report</h1><p>run {_e(run_id)}</p>"
        f"<p>clinic {_e(config.clinic_id)} · window {_e(span)} · {_e(mode)}</p>{_tiles(summary, results)}</header>"
        f"<main>{''.join(sections)}<p class='note'>Counts, shares, amounts and dates only: this page holds no "
        "identifier, hash or record ID. Sources: summary.json, the outbox, quality_results.</p></main></body></html>"
    )


def render_run_report(
    config: ClinicConfig,
    paths: RunPaths,
    engine: Engine,
    *,
    run_id: str,
    summary: dict[str, Any] | None = None,
    conversions_dir: Path | None = None,
    stopped: str | None = None,
    window: RunWindow | None = None,
) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) and return its path.

    Args:
        summary: the run's summary; default: the published one, else the last recorded.
        conversions_dir: where the conversion files are read; default the published outbox.
        stopped: the step a data-quality gate stopped the run at, shown as a banner.
        window: the run's interval, for the header when there is no summary.
    """
    if summary is None and stopped is None and paths.stopped.exists():
        # re-rendering a run whose latest attempt a gate stopped: say so again
        stopped = paths.stopped.read_text(encoding="utf-8").strip() or None
    recorded_at = None
    if summary is None and stopped is None:
        summary, recorded_at = load_summary(paths, engine, run_id)
    source = conversions_dir if conversions_dir is not None else (None if stopped else paths.outbox)
    with engine.connect() as conn:  # a database copied before the switch existed has no stops
        stops = switches.stopped(conn, config.clinic_id) if sa.inspect(conn).has_table("send_stops") else {}
    page = build_html(config, run_id, summary, conversions_table(config, source), read_results(engine, run_id),
                      stopped=stopped, window=window, send_stops=list(stops.values()), recorded_at=recorded_at)  # fmt: skip
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    target = paths.run_dir / REPORT_FILE
    tmp = target.with_name(REPORT_FILE + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
