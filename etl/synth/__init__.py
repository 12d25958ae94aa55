"""Synthetic clinic exports for the demo, the tests and the benchmarks.

``write_synthetic_clinic`` writes one clinic folder: ``exports/appointments.csv`` and
``exports/leads.csv`` in the generic profile (the exact column names of SPEC section 3) and a
``clinic.yaml`` with exactly the keys of the issue #2 example. The people are fake (fixed lists
of common names, numbered addresses at common mail domains, generated phone numbers), but the
files are shaped like real CRM and PMS exports and carry every edge case of SPEC sections 3 and 4
at scale; ``write_synthetic_clinic`` lists them.

Same arguments, byte-identical files: one ``numpy.random.default_rng(seed)``, no clock reads,
every time anchored on ``end``. Columns are built with vectorized numpy and pyarrow compute (no
per-row Python) and written by a small RFC 4180 writer with minimal quoting, so the benchmark size
(a million appointments) takes seconds, not minutes.

The work is split by stage: ``vocab`` (the fixed tables), ``people`` (who), ``events`` (when),
``facts`` (what happened at each visit, consent), ``columns`` (rendered as exported text) on top
of ``text`` and ``clock`` (vectorized string and time building), and ``csvwrite``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import yaml

# ``X as X``: private names re-exported because tests/test_synth.py imports them from here
from etl.synth.clock import _Clock as _Clock
from etl.synth.clock import _epoch as _epoch
from etl.synth.columns import _appointment_columns, _lead_columns
from etl.synth.csvwrite import _write_csv
from etl.synth.events import _plan
from etl.synth.facts import _appointment_facts, _consent
from etl.synth.people import _make_people, _sizes
from etl.synth.vocab import _DAY, _SPAN_DAYS, APPOINTMENT_COLUMNS, LEAD_COLUMNS, TIMEZONE
from etl.synth.vocab import _FIRST as _FIRST
from etl.synth.vocab import _TEST_FIRST as _TEST_FIRST

__all__ = ["APPOINTMENT_COLUMNS", "LEAD_COLUMNS", "TIMEZONE", "SynthResult", "write_synthetic_clinic"]

_CLINIC_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class SynthResult:
    """Where the synthetic clinic was written and how big it is."""

    config_path: Path
    appointments_path: Path
    leads_path: Path
    appointment_rows: int
    lead_rows: int
    appointment_ids: int  # distinct ids; the rest of the rows are re-exports
    lead_ids: int
    people: int


_MARK = "# synthetic clinic written by `medspa-conversions synth`: fake people; synth may overwrite it\n"
_CLINIC_YAML = """\
clinic_id: @CLINIC_ID@
timezone: America/Los_Angeles
currency: USD
default_region: US
sources:
  appointments: {path: exports/appointments.csv, profile: generic}
  leads: {path: exports/leads.csv, profile: generic}
rules:
  attribution_window_days: 90
  value_window_days: 30
  existing_patient_lookback_days: 365
  late_arrival_days: 7
  suppression_lookback_days: 365
  suppression_requires_consent: true
  consultation_value: null
exclude:
  email_domains: [example.com, test.com]
  name_patterns: ["^test$", "^do not use$"]
google_ads:
  customer_id: "1234567890"
  conversion_actions:
    consultation: customers/1234567890/conversionActions/111
    purchase: customers/1234567890/conversionActions/222
  suppression_user_list: customers/1234567890/userLists/333
  enhanced_conversions_for_leads: true
  click_window_days: 90
meta:
  pixel_id: "123456789012345"
  suppression_audience_id: "23850000000000000"
  event_names: {consultation: ConsultationAttended, purchase: Purchase}
  action_source: physical_store
  max_event_age_days: 62
"""


def _refuse_a_real_clinic(out_dir: Path) -> None:
    """A folder holding a clinic synth did not write is a user's clinic: its YAML and exports
    would be replaced by fake ones."""
    config = out_dir / "clinic.yaml"
    ours = config.is_file() and (
        config.read_text(encoding="utf-8", errors="replace").startswith(_MARK)
        # written before the mark existed: the template itself, unedited
        or re.sub(r"^clinic_id: .*\n", "", config.read_text(encoding="utf-8", errors="replace"))
        == _CLINIC_YAML.split("\n", 1)[1]
    )
    exports = [out_dir / "exports" / name for name in ("appointments.csv", "leads.csv")]
    if not ours and (config.exists() or any(p.exists() for p in exports)):
        raise FileExistsError(
            f"{out_dir} holds a clinic that synth did not write (clinic.yaml or exports/); "
            "choose a new folder for the synthetic one"
        )


def write_synthetic_clinic(
    out_dir: Path,
    *,
    appointments: int,
    leads: int,
    seed: int,
    end: date = date(2026, 11, 23),
    clinic_id: str = "sunrise-medspa",
) -> SynthResult:
    """Write ``exports/appointments.csv``, ``exports/leads.csv`` and ``clinic.yaml`` of a fake clinic.

    About ``leads * 0.9`` people have leads, the rest of the leads are their duplicate form fills
    and later leads (inside and after the 90-day window); walk-in patients without a lead fill the
    appointments up to about 2.8 visits per patient. Events span the 456 days before ``end``
    (local midnight), plus bookings up to 60 days after it. Edge cases, all at scale:

    - people: half of the lead people book after their lead (some after the window, some on the
      clock-change days at 01:30, in the gap or the repeated hour); 7% attended 30-330 days
      before their first lead (existing patients); 3% filled the form 0-5 days after a visit;
      ``patient_id`` is shared by a patient's visits, 2% of patients have a second chart;
    - identifiers: Gmail dot and plus variants between lead and PMS, case and space noise, 6% of
      lead people give another address (linked by phone only), 5% another PMS phone (email only),
      phones as ``(415) 555-0123``, ``415.555.0123``, ``+1 415 555 0123``, ``4155550123`` ...,
      some invalid or blank; unusable addresses (``x@gmail``, ``n/a``); ZIP+4, ``California``/``USA``
      spellings;
    - test records (example.com, test.com, ``Test``, ``Do Not Use``) in both files;
    - statuses: every spelling of the generic vocabulary in mixed case plus unknown ones; late
      cancels and no-shows with a fee; refunds as separate negative rows and netted into a later
      visit; revenue as ``450.00``, ``$1,200.00``, ``450`` or blank; 1% of appointment rows are
      re-exports (booked -> completed, completed -> cancelled, ordered so that only
      ``updated_at`` tells which is newer); 0.5% of lead rows are re-exports;
    - consent: granted, missing, denied, revoked (in the PMS, some also in the CRM), granted after
      the visit; flags as yes/no/Y/N/1/0/true/false in mixed case or blank;
    - times: mostly naive local, some with an offset or in UTC (``Z``); the clock-change rows are
      always naive;
    - click IDs: gclid on half the leads, gbraid/wbraid on some of the others, fbclid on ~30% (70%
      of them with ``fbc`` = ``fb.1.<ms>.<fbclid>``), ``fbp``; duplicate fills repeat them;
    - PHI-looking text in ``service``, ``treatment_interest``, ``notes`` (with commas, quotes and
      line breaks) and ``landing_page_url``.

    Args:
        out_dir: created if missing; the three files are overwritten.
        appointments: appointment rows to write (re-exports included), >= 0.
        leads: lead rows to write (re-exports included), >= 0.
        seed: the only source of randomness: same arguments, byte-identical files.
        end: the anchor of all times, the day after the last lead (the run's ``end``).
        clinic_id: written into ``clinic.yaml`` and the landing-page URLs.

    Returns:
        The paths written and the counts.

    Raises:
        ValueError: for negative counts or a clinic ID ``etl.config`` would refuse.
        FileExistsError: ``out_dir`` holds a clinic (YAML or exports) synth did not write; a
            synthetic clinic written earlier is overwritten.
    """
    if appointments < 0 or leads < 0:
        raise ValueError("appointments and leads must not be negative")
    if not _CLINIC_ID.fullmatch(clinic_id):
        raise ValueError("clinic_id must be lowercase letters, digits, '-' or '_' (max 63)")
    _refuse_a_real_clinic(out_dir)
    rng = np.random.default_rng(seed)
    end_s = _epoch(end)
    span = end_s - _SPAN_DAYS * _DAY
    clock = _Clock(ZoneInfo(TIMEZONE), span - 400 * _DAY, end_s + 400 * _DAY)
    sizes = _sizes(appointments, leads)
    people = _make_people(rng, sizes.lead_people + sizes.walkin, sizes.lead_people)
    plan = _plan(rng, sizes, end_s, clock.odd_days(span, end_s))
    appts = _appointment_facts(rng, plan, sizes, end_s)
    consent = _consent(rng, people, plan, appts, end_s)
    exports = out_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    appointments_path, leads_path = exports / "appointments.csv", exports / "leads.csv"
    _write_csv(appointments_path, _appointment_columns(rng, people, appts, consent, clock))
    _write_csv(leads_path, _lead_columns(rng, people, plan, consent, sizes, clinic_id, clock))
    plain = yaml.safe_load(clinic_id) == clinic_id
    config_path = out_dir / "clinic.yaml"
    config_path.write_text(
        _MARK + _CLINIC_YAML.replace("@CLINIC_ID@", clinic_id if plain else json.dumps(clinic_id)),
        encoding="utf-8",
    )
    return SynthResult(
        config_path=config_path,
        appointments_path=appointments_path,
        leads_path=leads_path,
        appointment_rows=appointments,
        lead_rows=leads,
        appointment_ids=appts.base_rows,
        lead_ids=leads - sizes.lead_reexports,
        people=len(people.consent),
    )
