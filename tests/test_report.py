"""The run report (etl.report, issue #5): one self-contained page per run, counts only, and it
really renders: headless Chromium draws the charts (screenshot and DOM checked)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from etl import pipeline, store, tasks
from etl.cli import app
from etl.config import load_config
from etl.outbox import OUTBOX_FILES, read_rows
from etl.report import REPORT_FILE, paths_for_run_id, render_run_report
from etl.rules.stages import RunWindow
from tests.test_canary import assert_no_canary, write_clinic

CHART_IDS = ("chart-funnel", "chart-drops", "chart-per-day", "chart-values", "chart-coverage", "chart-quality",
             "chart-uploads")  # fmt: skip
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic clinic after one dry run of 2026-10-01 .. 2026-11-23 (report rendered by the run)."""
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("clinic")
    write_synthetic_clinic(out, appointments=3000, leads=1200, seed=11)
    result = CliRunner().invoke(app, ["run", "--config", str(out / "clinic.yaml"), "--start", "2026-10-01",
                                      "--end", "2026-11-23", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _spec(clinic: Path) -> tasks.RunSpec:
    config = load_config(clinic / "clinic.yaml")
    window = RunWindow(datetime(2026, 10, 1, tzinfo=config.tz), datetime(2026, 11, 23, tzinfo=config.tz))
    return tasks.RunSpec(config=config, window=window, label=pipeline.run_label(dry_run=True))


def _page(clinic: Path) -> str:
    return (_spec(clinic).paths.run_dir / REPORT_FILE).read_text(encoding="utf-8")


def _without_plotly_js(page: str) -> str:
    return re.sub(r'<script type="text/javascript">.*?</script>', "", page, count=1, flags=re.S)


def test_run_prints_the_report_path_and_writes_one_self_contained_page(clinic: Path) -> None:
    page = _page(clinic)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script src" not in page and "<link" not in page  # nothing to fetch: plotly.js is inline
    assert len(page) > 3_000_000 and "Plotly.newPlot" in page
    for chart in CHART_IDS:
        assert f'id="{chart}"' in page, chart
    assert 'id="quality-table"' in page and "daily_volume_vs_trailing_median" in page


def test_report_shows_counts_never_identifiers(clinic: Path) -> None:
    spec = _spec(clinic)
    page = _without_plotly_js(_page(clinic))
    assert not re.search(r"[0-9a-f]{64}", page), "a hash or opaque ID reached the page"
    opaque = {r.get("order_id") or r.get("event_id") for d in ("google_conversions", "meta_events")
              for r in read_rows(spec.paths.outbox, d)}  # fmt: skip
    assert opaque and not any(o in page for o in opaque)
    assert not re.search(r"(gclid|fbclid)\W*[:=]\W*\w{10,}", page)
    for rows in (list(read_rows(spec.paths.outbox, d)) for d in OUTBOX_FILES):
        for row in rows[:50]:
            for click in (row.get("gclid"), row.get("user_data", {}).get("fbc")):
                assert not click or click not in page


def test_report_command_re_renders_a_run(clinic: Path) -> None:
    spec = _spec(clinic)
    report = spec.paths.run_dir / REPORT_FILE
    report.unlink()
    result = CliRunner().invoke(
        app, ["report", "--run-id", spec.run_id, "--config", str(clinic / "clinic.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(report) and report.exists()
    bad = CliRunner().invoke(
        app, ["report", "--run-id", "../../etc", "--config", str(clinic / "clinic.yaml")]
    )
    assert bad.exit_code == 2 and "--run-id" in bad.stderr
    unknown = CliRunner().invoke(app, ["report", "--run-id", "nope", "--config", str(clinic / "clinic.yaml")])
    assert unknown.exit_code == 2 and "no run nope" in unknown.stderr
    assert not (clinic / "var" / "runs" / "nope").exists()


def test_a_stopped_run_gets_a_page_saying_where_it_stopped(clinic: Path) -> None:
    spec = _spec(clinic)
    paths = paths_for_run_id(spec.config, spec.run_id, spec.paths.outbox)
    with store.engine_for(spec.config.resolved_database_url()) as engine:
        path = render_run_report(spec.config, paths, engine, run_id=spec.run_id, stopped="validate_inputs")
    page = path.read_text(encoding="utf-8")
    assert 'id="stopped"' in page and "validate_inputs" in page
    assert 'id="chart-per-day"' not in page  # the published outbox of an earlier run is not shown
    with store.engine_for(spec.config.resolved_database_url()) as engine:
        render_run_report(spec.config, paths, engine, run_id=spec.run_id)  # leave the full page


def test_the_check_descriptions_carry_the_clinics_own_thresholds(clinic: Path) -> None:
    spec = _spec(clinic)
    config = spec.config.model_copy(
        update={"quality": spec.config.quality.model_copy(update={"max_unknown_status_share": 0.01})}
    )
    paths = paths_for_run_id(config, spec.run_id, spec.paths.outbox)
    with store.engine_for(config.resolved_database_url()) as engine:
        page = render_run_report(config, paths, engine, run_id=spec.run_id).read_text(encoding="utf-8")
        assert "more than 1% of statuses" in page and "more than 20% of statuses" not in page
        default = render_run_report(spec.config, paths, engine, run_id=spec.run_id).read_text(
            encoding="utf-8"
        )
    assert "more than 20% of statuses" in default


@pytest.mark.parametrize("mode", ["dry-run", "sandbox"])
def test_canary_report_holds_no_planted_value(mode: str, tmp_path: Path) -> None:
    config = write_clinic(tmp_path)
    args = ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30"]
    result = CliRunner().invoke(app, args + (["--dry-run"] if mode == "dry-run" else ["--target", "sandbox"]))
    assert result.exit_code == 0, result.output
    reports = list((tmp_path / "var").rglob(REPORT_FILE))
    assert len(reports) == 1
    page = reports[0].read_text(encoding="utf-8")
    assert_no_canary(page, "report.html")
    if mode == "sandbox":  # upload outcomes are there once uploads exist
        assert 'id="chart-uploads"' in page and '"accepted"' in page


# headless Chromium -----------------------------------------------------------------------------


def _png_rgb(path: Path) -> tuple[int, int, bytes]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into RGB bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, colour = 8, bytearray(), 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    prior, out = bytearray(stride), bytearray()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prior[x], prior[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + b) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out += line if bpp == 3 else bytes(v for i, v in enumerate(line) if i % 4 != 3)
        prior = line
    return width, height, bytes(out)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--window-size=1200,2000"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason=f"chromium is not installed (install: {INSTALL})")
def test_report_renders_in_headless_chromium(clinic: Path, tmp_path: Path) -> None:
    url = (_spec(clinic).paths.run_dir / REPORT_FILE).as_uri()
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", url, profile=tmp_path / "profile-1")
    width, height, rgb = _png_rgb(shot)
    assert (width, height) == (1200, 2000)
    pixels = [rgb[i : i + 3] for i in range(0, len(rgb), 3)]
    assert len(set(pixels)) > 200, "the screenshot is blank"

    def near(colour: str) -> int:
        target = bytes.fromhex(colour)
        return sum(1 for p in pixels if all(abs(p[i] - target[i]) <= 6 for i in range(3)))

    # bars drawn in the charts' own colours: Google blue, consultation blue, purchase orange
    assert near("4285f4") > 500 and near("4c78a8") > 500 and near("f58518") > 500
    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile-2").stdout
    assert dom.count('class="main-svg"') >= 2 * len(CHART_IDS)
    for chart in CHART_IDS:
        assert re.search(rf'id="{chart}"[^>]*class="[^"]*js-plotly-plot', dom) or re.search(
            rf'class="[^"]*js-plotly-plot[^"]*"[^>]*id="{chart}"', dom
        ), f"{chart} was not drawn"


def test_upload_outcomes_count_each_conversion_once() -> None:
    from etl import report_charts

    # 10 planned: 5 accepted, 1 refused by our own checks, 2 found final at upload, 2 left
    # planned by a quota stop; 2 more were left out while planning (already sent earlier)
    counts = {"planned": 10, "sent": 5, "accepted": 5, "rejected": 1, "deferred": 0,
              "already_sent": 4, "already_sent_at_upload": 2}  # fmt: skip
    fig = report_charts.upload_outcomes({"destinations": {"google_conversions": counts}})
    bars = {trace.name: trace.x[0] for trace in fig.data}
    assert bars == {"accepted": 5, "rejected": 1, "deferred": 0, "already_sent": 4,
                    "not attempted (dry run or planned)": 2}  # fmt: skip
    assert sum(bars.values()) == counts["planned"] + 2


def test_the_list_table_says_why_a_list_was_not_synced() -> None:
    from etl.report import _audience_table

    html = _audience_table({"destinations": {
        "google_customer_match": {"members": 5, "adds": 5, "skipped_newer_sync": 1},
        "meta_audience": {"members": 0, "skipped_no_list": 1}}})  # fmt: skip
    google, meta = html.split("<td>google_customer_match</td>")[1], html.split("<td>meta_audience</td>")[1]
    assert "a later run already synced it" in google.split("</tr>")[0]
    assert "no list ID is set" in meta.split("</tr>")[0]


def test_the_report_says_what_google_made_of_earlier_requests() -> None:
    from etl.report import _audience_table

    html = _audience_table({"destinations": {
        "google_conversions": {"request_statuses": {"failed": 1, "success": 4}},
        "google_customer_match": {"members": 5, "adds": 5, "resync_due": 1,
                                  "request_statuses": {"partial_success": 1}},
        "meta_audience": {"members": 5}}})  # fmt: skip
    assert (
        "replaced: Google failed a request of it in processing"
        in html.split("<td>google_customer_match</td>")[1]
    )
    read = html.split("Earlier requests read back")[1]
    rows = [r for r in read.split("</table>")[0].split("<tr>") if r.startswith("<td>")]
    assert [r.replace("</td>", "").split("<td")[1:] for r in rows] == [
        [">google_conversions", ">failed", ' class="num">1</tr>'],
        [">google_conversions", ">success", ' class="num">4</tr>'],
        [">google_customer_match", ">partial_success", ' class="num">1</tr>'],
    ]
    assert "Earlier requests read back" not in _audience_table(
        {"destinations": {"meta_audience": {"members": 1}}}
    )


def test_a_rerun_that_plans_nothing_new_shows_what_was_already_sent(tmp_path: Path) -> None:
    # a rerun of an interval its first run sent: the funnel went kept 150 -> planned 0 and the
    # page said "no outbound conversions", as if the rules had dropped everything
    from etl import report_charts
    from etl.report import build_html

    counts = {"planned": 0, "sent": 0, "accepted": 0, "rejected": 0, "deferred": 0,
              "already_sent": 135, "already_sent_at_upload": 0}  # fmt: skip
    summary = {"start": "2026-10-01T00:00:00-07:00", "end": "2026-11-23T00:00:00-08:00", "dry_run": False,
               "target": "sandbox", "stages": {"consultation": 100, "purchase": 50}, "drops": {},
               "destinations": {"google_conversions": counts, "meta_events": {**counts, "already_sent": 121}}}  # fmt: skip
    funnel = {
        trace.name: dict(zip(trace.y, trace.x, strict=True))
        for trace in report_charts.conversion_funnel(summary).data
    }
    assert funnel["Google Ads"]["already sent (earlier runs)"] == 135 and funnel["Meta"]["planned (new)"] == 0
    config = load_config(write_clinic(tmp_path))
    page = build_html(config, "a-run", summary, pd.DataFrame(), [])
    assert (
        "<b>135</b><span>Google already sent</span>" in page
        and "<b>121</b><span>Meta already sent</span>" in page
    )
    assert "256 were left out as already sent" in page
