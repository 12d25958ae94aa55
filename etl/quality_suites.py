"""The data-quality suites, as Great Expectations 1.x expectation objects: the one source of truth.

``build_suites`` makes every suite from ``great_expectations.expectations`` classes; the JSON files
under ``expectations/`` are generated from it by ``write_suites`` (``python -m
etl.quality_suites``) and a test keeps them equal, so the reviewed JSON is exactly what runs. The
contract is issue #5 and ``docs/quality.md``: what each suite checks, on which frame, and which
checks stop the run (severity ``critical``) or are only reported (``warning``).

Every suite runs on a frame that holds hashes, opaque IDs, counts, times and amounts only
(``etl.quality_frames``), with an opaque row key (the export's line number, the outbox line, the
opaque ID or the day) as GX's ``unexpected_index_column_names``. Values that depend on the run
(its window, the platforms' age limits) are GX suite parameters (``{"$PARAMETER": name}``) filled
by ``etl.quality_frames.suite_parameters``. GX is imported inside ``build_suites`` only: its import
costs seconds, and nothing in ``etl`` may pay that at module import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etl import identifiers
from etl.config import Quality
from etl.gate import ISO_4217
from etl.identifiers import GOOGLE_POSTAL_CODE

EXPECTATIONS_DIR = Path(__file__).resolve().parents[1] / "expectations"
CRITICAL, WARNING = "critical", "warning"
ROW_KEY = "row_key"  # the name GX sees for each frame's opaque key (its index)

HEX64 = r"^[0-9a-f]{64}\Z"
# the PHI gate's click-ID shapes (etl.identifiers)
CLICK_ID = rf"^(?:{identifiers.CLICK_ID.pattern})\Z"
FBC = rf"^(?:{identifiers.FBC.pattern})\Z"
FBP = rf"^(?:{identifiers.FBP.pattern})\Z"
GOOGLE_TIME = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}\Z"
COUNTRY = r"^[A-Z]{2}\Z"
POSTAL = rf"^(?:{GOOGLE_POSTAL_CODE.pattern})\Z"  # the PHI gate's postal code (etl.identifiers)
STATUSES = ("attended", "cancelled", "late_cancel", "no_show", "rescheduled", "scheduled", "unknown")
CURRENCIES = sorted(ISO_4217)
HASHES = ("em_g", "em_m", "ph_g", "ph_m", "fn_g", "ln_g", "fn_m", "ln_m",
          "ct_m", "st_m", "zp_m", "country_m", "postal_code", "country_code")  # fmt: skip
_CONSENT = ("consent_marketing", "consent_at", "consent_revoked_at")
EXTRACT_COLUMNS = {
    "appointments": ("appointment_id", "patient_id", "status", "status_known", "start_at", "updated_at",
                     "revenue", "currency", "location_id", *_CONSENT, "source_file", "source_line",
                     "is_test", *HASHES),
    "leads": ("lead_id", "created_at", "gclid", "gbraid", "wbraid", "fbclid", "fbc", "fbp", *_CONSENT,
              "source_file", "source_line", "is_test", *HASHES),
}  # fmt: skip
META_AUDIENCE_WIDTH = 8  # etl.payloads.META_AUDIENCE_SCHEMA
META_AUDIENCE_BATCH = 10_000  # rows per Meta audience request (etl.payloads)
GOOGLE_MAX_IDENTIFIERS = 5  # user_identifiers per ClickConversion
CUSTOMER_MATCH_MAX_IDENTIFIERS = 20  # user_identifiers per Customer Match member


@dataclass(frozen=True)
class Thresholds:
    """Where a share or ratio turns into a finding: a clinic's ``quality:`` section
    (``etl.config.Quality``, which holds the defaults and their meaning)."""

    max_unusable_email_share: float
    max_unusable_phone_share: float
    max_unknown_status_share: float
    max_no_lead_share: float
    volume_factor: float
    volume_min_median: float
    volume_trailing_days: int
    max_abs_revenue: float


def thresholds_for(quality: Quality) -> Thresholds:
    return Thresholds(**quality.model_dump())


DEFAULT_THRESHOLDS = thresholds_for(Quality())  # what the committed ``expectations/*.json`` hold


@dataclass(frozen=True)
class Suite:
    """One suite: its GX expectation objects, the frame it runs on and that frame's row key."""

    name: str
    frame: str
    key: str  # the frame's opaque row-key column, handed to GX as ``ROW_KEY`` (absent: row number)
    expectations: list[Any]


def _param(name: str) -> dict[str, str]:
    return {"$PARAMETER": name}


def build_suites(thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict[str, Suite]:
    """Every suite, keyed by name, in the order the run executes them.

    Each expectation's ``meta["check"]`` is its stable name (what ``quality_results`` stores and
    the report shows); ``description`` says what a failure means.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    kept = Column("outcome") == "kept"

    def check(cls: Any, name: str, why: str, severity: str = CRITICAL, **kwargs: Any) -> Any:
        return cls(meta={"check": name}, description=why, severity=severity, **kwargs)

    def not_null(column: str, why: str) -> Any:
        return check(gxe.ExpectColumnValuesToNotBeNull, f"{column}_not_null", why, column=column)

    def unique(column: str, why: str) -> Any:
        return check(gxe.ExpectColumnValuesToBeUnique, f"{column}_unique", why, column=column)

    def regex(column: str, pattern: str, name: str, why: str) -> Any:
        return check(gxe.ExpectColumnValuesToMatchRegex, name, why, column=column, regex=pattern)

    def between(column: str, name: str, why: str, severity: str = CRITICAL, **kwargs: Any) -> Any:
        return check(gxe.ExpectColumnValuesToBeBetween, name, why, severity, column=column, **kwargs)

    def columns(kind: str) -> Any:
        return check(gxe.ExpectTableColumnsToMatchSet, "columns_as_contracted",
                     "the extract has exactly the contracted columns: a missing one breaks the rules, "
                     "an extra one could be a raw identifier written to disk",
                     column_set=list(EXTRACT_COLUMNS[kind]), exact_match=True)  # fmt: skip

    def share_present(column: str, limit: float, what: str) -> Any:
        return check(gxe.ExpectColumnValuesToNotBeNull, f"{column}_usable_share",
                     f"more than {limit:.0%} of rows have no usable {what} (blank or invalid): "
                     "match rates will fall", WARNING, column=column, mostly=round(1 - limit, 6))  # fmt: skip

    def currency(column: str, why: str) -> Any:
        return check(gxe.ExpectColumnValuesToBeInSet, f"{column}_iso_4217", why,
                     column=column, value_set=CURRENCIES)  # fmt: skip

    t = thresholds
    appointments = [
        not_null("appointment_id", "an appointment without its ID cannot be deduplicated or linked"),
        unique("appointment_id", "latest-wins left two rows for one appointment"),
        not_null("start_at", "the visit time did not parse: the visit cannot be placed in a window"),
        not_null("status", "an appointment without a status cannot be classified"),
        check(gxe.ExpectColumnValuesToBeInSet, "status_in_vocabulary",
              "status is outside the canonical vocabulary (extract contract broken)",
              column="status", value_set=list(STATUSES)),
        check(gxe.ExpectColumnValuesToBeInSet, "status_known_share",
              f"more than {t.max_unknown_status_share:.0%} of statuses are outside the profile's "
              "vocabulary: a shifted column or a changed status list", column="status_known",
              value_set=[True], mostly=round(1 - t.max_unknown_status_share, 6)),
        check(gxe.ExpectColumnValuesToBeInSet, "unknown_statuses_present",
              "some statuses are outside the profile's vocabulary (treated as not attended)",
              WARNING, column="status_known", value_set=[True]),
        check(gxe.ExpectColumnValuesToBeInTypeList, "revenue_numeric", "revenue is not numeric",
              column="revenue", type_list=["float64", "float32", "int64"]),
        not_null("revenue", "revenue is not a number (NaN)"),
        between("revenue", "revenue_plausible",
                f"revenue beyond +/-{t.max_abs_revenue:,.0f}: an ID, phone or ZIP in the revenue column",
                min_value=-t.max_abs_revenue, max_value=t.max_abs_revenue),
        currency("currency", "a currency that is not an ISO 4217 code (a shifted column?)"),
        not_null("is_test", "the test-record flag is missing"),
        share_present("em_g", t.max_unusable_email_share, "email"),
        share_present("ph_g", t.max_unusable_phone_share, "phone"),
    ]  # fmt: skip
    leads = [
        not_null("lead_id", "a lead without its ID cannot be deduplicated"),
        unique("lead_id", "latest-wins left two rows for one lead"),
        not_null("created_at", "the lead time did not parse: journeys cannot start"),
        not_null("is_test", "the test-record flag is missing"),
        share_present("em_g", t.max_unusable_email_share, "email"),
        share_present("ph_g", t.max_unusable_phone_share, "phone"),
    ]
    volume = [
        between("ratio_to_median", "daily_volume_vs_trailing_median",
                f"a day's appointment count is more than {t.volume_factor:g}x off the trailing "
                f"{t.volume_trailing_days}-day median: a truncated or duplicated export", WARNING,
                min_value=round(1 / t.volume_factor, 6), max_value=t.volume_factor),
    ]  # fmt: skip
    conversions = [
        not_null("opaque_id", "a conversion without an opaque ID cannot be sent exactly once"),
        unique("opaque_id", "two conversions share an opaque ID"),
        regex("opaque_id", HEX64, "opaque_id_hex64", "an opaque ID that is not an HMAC-SHA256"),
        check(gxe.ExpectColumnValuesToBeInSet, "stage_known", "a stage other than consultation/purchase",
              column="stage", value_set=["consultation", "purchase"]),
        between("ready_at", "ready_in_run_window",
                "a conversion ready outside [start - late_arrival_days, end) belongs to another run "
                "(unless an earlier run left its upload unfinished: carried over)",
                min_value=_param("ready_from_us"), max_value=_param("ready_until_us"), strict_max=True,
                row_condition=Column("interval") == "own"),
        check(gxe.ExpectColumnPairValuesToBeEqual, "ready_follows_stage_rule",
              "ready time is not event time (+ value window for purchases): event time outside the "
              "window its readiness rule allows", column_A="ready_at", column_B="expected_ready_at"),
        between("value", "purchase_value_positive", "a kept purchase with a value <= 0",
                min_value=0, strict_min=True,
                row_condition=(Column("stage") == "purchase") & kept),
        check(gxe.ExpectCompoundColumnsToBeUnique, "one_per_journey_and_stage",
              "one person has two kept conversions of one stage at one event time",
              column_list=["person_key", "stage", "event_time"], row_condition=kept),
        currency("currency", "a conversion currency that is not an ISO 4217 code"),
    ]  # fmt: skip
    google = [
        not_null("order_id", "a Google conversion without order_id cannot be de-duplicated"),
        regex("order_id", HEX64, "order_id_opaque", "order_id is not an opaque HMAC"),
        unique("order_id", "order_id repeats within the Google file: a double send"),
        regex("conversion_date_time", GOOGLE_TIME, "conversion_date_time_format",
              "conversion_date_time is not yyyy-mm-dd hh:mm:ss+hh:mm"),
        between("conversion_epoch", "conversion_time_within_age_limit",
                "conversion time is after the run's end or more than 90 days before it",
                min_value=_param("google_min_epoch"), max_value=_param("run_end_epoch")),
        currency("currency_code", "currency_code is not an ISO 4217 code"),
        between("conversion_value", "conversion_value_not_negative", "a negative conversion value",
                min_value=0),
        regex("click_id", CLICK_ID, "click_id_charset", "a gclid/gbraid/wbraid not shaped like a click ID"),
        between("click_id_count", "one_click_id", "more than one of gclid/gbraid/wbraid", max_value=1),
        between("identifier_count", "user_identifiers_batch", "more than 5 user identifiers",
                max_value=GOOGLE_MAX_IDENTIFIERS),
        between("match_keys", "has_match_key", "a conversion with neither identifiers nor a click ID",
                min_value=1),
    ]  # fmt: skip
    meta = [
        not_null("event_id", "a Meta event without event_id cannot be de-duplicated"),
        regex("event_id", HEX64, "event_id_opaque", "event_id is not an opaque HMAC"),
        unique("event_id", "event_id repeats within the Meta file: a double send"),
        between("event_time", "event_time_within_age_limit",
                "event_time is after the run's end or older than Meta's limit for the action source",
                min_value=_param("meta_min_epoch"), max_value=_param("run_end_epoch")),
        currency("currency", "custom_data.currency is not an ISO 4217 code"),
        between("value", "value_not_negative", "a negative event value", min_value=0),
        regex("fbc", FBC, "fbc_format", "fbc is not fb.<n>.<ms>.<click id>"),
        regex("fbp", FBP, "fbp_format", "fbp is not fb.<n>.<ms>.<random>"),
        between("match_keys", "has_match_key", "an event with no em, ph, fbc, fbp or external_id",
                min_value=1),
    ]  # fmt: skip
    customer_match = [
        check(gxe.ExpectColumnValuesToBeInSet, "operation_known", "an operation other than create/remove",
              column="operation", value_set=["create", "remove"]),
        between("identifier_count", "identifiers_per_member", "a member with 0 or more than 20 identifiers",
                min_value=1, max_value=CUSTOMER_MATCH_MAX_IDENTIFIERS),
        unique("member_key", "one member appears twice in the list delta"),
        regex("country_code", COUNTRY, "country_code_format", "country_code is not ISO 3166 alpha-2"),
        regex("postal_code", POSTAL, "postal_code_format", "postal_code is not a postal code"),
    ]  # fmt: skip
    meta_audience = [
        check(gxe.ExpectColumnValuesToBeInSet, "operation_known", "an operation other than add/remove",
              column="operation", value_set=["add", "remove"]),
        between("batch_rows", "batch_size", "an audience request with 0 or more than 10,000 rows",
                min_value=1, max_value=META_AUDIENCE_BATCH),
        between("min_width", "row_width_min", "a data row narrower than the 8-key schema",
                min_value=META_AUDIENCE_WIDTH),
        between("max_width", "row_width_max", "a data row wider than the 8-key schema",
                max_value=META_AUDIENCE_WIDTH),
    ]  # fmt: skip
    hashes = [regex("value", HEX64, "hash_hex64", "a hashed field that is not 64 lowercase hex")]
    metrics = [
        between("no_lead_share", "attended_without_lead_share",
                f"more than {t.max_no_lead_share:.0%} of attended visits in the window have no lead: "
                "leads and visits stopped linking", WARNING, max_value=t.max_no_lead_share),
    ]  # fmt: skip
    suites = [
        Suite("appointments_schema", "appointments_schema", "row", [columns("appointments")]),
        Suite("appointments_extract", "appointments", "source_line", appointments),
        Suite("leads_schema", "leads_schema", "row", [columns("leads")]),
        Suite("leads_extract", "leads", "source_line", leads),
        Suite("appointment_volume", "volume", "day", volume),
        Suite("conversions_staged", "conversions", "opaque_id", conversions),
        Suite("google_conversions_outbound", "google_conversions", "line", google),
        Suite("meta_events_outbound", "meta_events", "line", meta),
        Suite("google_customer_match_outbound", "google_customer_match", "line", customer_match),
        Suite("meta_audience_outbound", "meta_audience", "line", meta_audience),
        Suite("outbound_hashes", "hashes", "ref", hashes),
        Suite("run_metrics", "metrics", "metric_row", metrics),
    ]
    return {s.name: s for s in suites}


INPUT_SUITES = (
    "appointments_schema",
    "appointments_extract",
    "leads_schema",
    "leads_extract",
    "appointment_volume",
)
# the extract suites read only the columns their checks use (and the schema suites only names)
EXTRACT_CHECKED = {
    "appointments": ("source_line", "appointment_id", "start_at", "status", "status_known", "revenue", "currency",
                     "is_test", "em_g", "ph_g"),
    "leads": ("source_line", "lead_id", "created_at", "is_test", "em_g", "ph_g"),
}  # fmt: skip
OUTBOUND_SUITES = (
    "conversions_staged", "google_conversions_outbound", "meta_events_outbound",
    "google_customer_match_outbound", "meta_audience_outbound", "outbound_hashes", "run_metrics",
)  # fmt: skip


def suite_json(suite: Suite) -> dict[str, Any]:
    """The suite as GX's own JSON (``gx.ExpectationSuite(**it)`` loads it), without random IDs."""
    return {
        "name": suite.name,
        "meta": {"frame": suite.frame, "row_key": suite.key},
        "expectations": [e.configuration.to_json_dict() for e in suite.expectations],
    }


def render_suite(suite: Suite) -> str:
    return json.dumps(suite_json(suite), indent=2, sort_keys=True) + "\n"


def write_suites(
    directory: Path = EXPECTATIONS_DIR, thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> list[Path]:
    """Regenerate ``expectations/<suite>.json`` from ``build_suites``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for suite in build_suites(thresholds).values():
        path = directory / f"{suite.name}.json"
        path.write_text(render_suite(suite), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_suites():
        print(written)
