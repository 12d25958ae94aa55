"""Extract: CSV exports and SQL queries -> the canonical appointment and lead frames.

The output is the "Canonical frames" contract of ``docs/architecture.md``; the input rules
(status vocabulary, timestamps, booleans, revenue, latest wins) are SPEC section 3. Vendor
differences are data: ``etl/profiles/<name>.yaml`` maps a vendor's headers and statuses onto the
canonical fields (the format is described in ``generic.yaml``). PHI-only columns (service, notes,
treatment_interest, landing_page_url, source) are not canonical fields, so they are never read.
Cell parsing lives in ``etl.cells``, reading in ``etl.csvread`` and ``etl.sqlread``. Every bad
cell of a file is collected as a RowProblem (file, physical line, column, reason) and raised once
as an InputError; no message carries a value.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from etl import cells
from etl.config import ClinicConfig, SourceConfig
from etl.csvread import CsvExport
from etl.errors import ConfigError, InputError, RowProblem
from etl.sqlread import QueryResult

Kind = Literal["appointments", "leads"]
Status = Literal["attended", "cancelled", "late_cancel", "no_show", "rescheduled", "scheduled"]

_TEXT, _TIME, _MONEY, _FLAG, _STATUS = "text", "time", "money", "flag", "status"
_PEOPLE = {f: _TEXT for f in ("first_name", "last_name", "email", "phone", "zip")}
_CONSENT = {"consent_marketing": _FLAG, "consent_at": _TIME, "consent_revoked_at": _TIME}
log = logging.getLogger(__name__)

# canonical field -> how its cells are parsed, in output column order
FIELDS: dict[Kind, dict[str, str]] = {
    "appointments": {
        "appointment_id": _TEXT,
        "patient_id": _TEXT,
        **_PEOPLE,
        **{f: _TEXT for f in ("city", "state", "country")},
        "status": _STATUS,
        "start_at": _TIME,
        "updated_at": _TIME,
        "revenue": _MONEY,
        "currency": _TEXT,
        "location_id": _TEXT,
        **_CONSENT,
    },
    "leads": {
        "lead_id": _TEXT,
        "created_at": _TIME,
        **_PEOPLE,
        **{f: _TEXT for f in ("gclid", "gbraid", "wbraid", "fbclid", "fbc", "fbp")},
        **_CONSENT,
    },
}
MIN_REQUIRED: dict[Kind, tuple[str, ...]] = {
    "appointments": ("appointment_id", "status", "start_at"),
    "leads": ("lead_id", "created_at"),
}
_KEY: dict[Kind, str] = {"appointments": "appointment_id", "leads": "lead_id"}


def columns_of(kind: Kind) -> list[str]:
    """The exact output columns of ``read_appointments`` / ``read_leads``, in order."""
    names = list(FIELDS[kind])
    if "status" in names:
        names.insert(names.index("status") + 1, "status_known")
    return [*names, "source_file", "source_line"]


def _normalize(label: str) -> str:
    return label.strip().lower()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Frozen):
    column: str = Field(min_length=1, description="The export's header (case and spaces ignored).")
    utc: bool = Field(False, description="Offset-less timestamps in this column are UTC.")


def _as_specs(value: object) -> object:
    items = value if isinstance(value, list) else [value]
    return [{"column": item} if isinstance(item, str) else item for item in items]


class ProfileSection(_Frozen):
    required: list[str]
    # fields whose column an export of this layout has (SPEC section 3: every generic column but
    # the optional ones); one missing is named in a warning, its cells read as blank
    expected: list[str] = Field(default_factory=list)
    columns: dict[str, Annotated[list[ColumnSpec], BeforeValidator(_as_specs), Field(min_length=1)]]
    statuses: dict[Status, list[str]] = Field(default_factory=dict)

    def status_map(self) -> dict[str, str]:
        """Vendor status (normalized) -> canonical status."""
        return {_normalize(raw): canon for canon, raws in self.statuses.items() for raw in raws}


class Profile(_Frozen):
    """A vendor profile file (see ``etl/profiles/generic.yaml`` for the format)."""

    appointments: ProfileSection | None = None
    leads: ProfileSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        for kind in ("appointments", "leads"):
            section: ProfileSection | None = getattr(self, kind)
            if section is None:
                continue
            if stray := sorted(set(section.columns) - set(FIELDS[kind])):
                raise ValueError(f"{kind}.columns: not canonical {kind} fields: {stray}")
            if lacking := sorted(set(MIN_REQUIRED[kind]) - set(section.required)):
                raise ValueError(f"{kind}.required must include {lacking}")
            if unmapped := sorted(set(section.required + section.expected) - set(section.columns)):
                raise ValueError(f"{kind}.required/expected names fields without a column: {unmapped}")
            headers = [_normalize(s.column) for specs in section.columns.values() for s in specs]
            if len(headers) != len(set(headers)):
                raise ValueError(f"{kind}.columns: a header is mapped twice")
            raws = [_normalize(r) for rs in section.statuses.values() for r in rs]
            if len(raws) != len(set(raws)):
                raise ValueError(f"{kind}.statuses: a vendor status is mapped twice")
            if ("status" in section.columns) != bool(section.statuses):
                raise ValueError(f"{kind}: 'statuses' goes with a mapped 'status' column, only")
        return self


@functools.cache
def load_profile(name: str) -> Profile:
    """Load and validate the packaged profile ``etl/profiles/<name>.yaml``.

    Raises:
        ConfigError: unknown profile, or a profile file that breaks the format.
    """
    folder = importlib.resources.files("etl").joinpath("profiles")
    resource = folder.joinpath(f"{name}.yaml")
    if not resource.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.is_file())
        raise ConfigError(f"unknown profile '{name}' (known: {', '.join(known)})")
    try:
        return Profile.model_validate(yaml.safe_load(resource.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"profile '{name}' is invalid: {exc}") from None


def _section(name: str, kind: Kind) -> ProfileSection:
    section: ProfileSection | None = getattr(load_profile(name), kind)
    if section is None:
        raise ConfigError(f"profile '{name}' has no {kind} mapping; use a profile that has one")
    return section


@dataclass(frozen=True)
class _Column:
    field: str
    index: int
    header: str
    utc: bool


def _header_names(section: ProfileSection) -> frozenset[str]:
    """Every header the profile maps, normalized: the only header text an error may show."""
    return frozenset(_normalize(spec.column) for specs in section.columns.values() for spec in specs)


def _match_columns(
    section: ProfileSection, header: list[str], name: str, line: int | None = None
) -> list[_Column]:
    """Map the profile's fields to header positions; ``line`` is the header's line in a CSV
    file (None for a query's result), so a header problem says where to look."""
    positions: dict[str, list[int]] = {}
    for i, label in enumerate(header):
        positions.setdefault(_normalize(label), []).append(i)
    found: list[_Column] = []
    problems: list[RowProblem] = []
    absent: list[str] = []
    for field, specs in section.columns.items():
        for spec in specs:
            hits = positions.get(_normalize(spec.column), [])
            if len(hits) > 1:
                problems.append(RowProblem(name, line, spec.column, "duplicate column header"))
            elif hits:
                found.append(_Column(field, hits[0], header[hits[0]], spec.utc))
            if hits:
                break
        else:
            if field in section.required:
                others = " or ".join(f"'{s.column}'" for s in specs[1:])
                reason = "missing required column" + (f" (nor {others})" if others else "")
                problems.append(RowProblem(name, line, specs[0].column, reason))
            elif field in section.expected:
                absent.append(specs[0].column)
    if problems:
        raise InputError(problems)
    if absent:
        # not an error (a hand-made export without city or state still converts), but never
        # silent: without "revenue" no purchase has a value, without "email" nobody links by it
        log.warning(
            "%s: no column %s; read as blank in every row (add the column%s if the source has it)",
            name, ", ".join(f"'{c}'" for c in absent), "s" if len(absent) > 1 else "",
        )  # fmt: skip
    return found


def _max_lengths(kind: str) -> dict[str, int]:
    """The widths of the staged text columns a field lands in (``etl.store``): checked here,
    with a line number, instead of failing the load (PostgreSQL) or being kept whole (SQLite)."""
    import sqlalchemy as sa

    from etl import store

    table = {"appointments": store.appointments, "leads": store.leads}[kind]
    # record and click IDs as exported; currency and status are checked by value elsewhere
    skip = {"clinic_id", "currency", "status", *store.HASH_COLUMNS}
    return {c.name: int(c.type.length) for c in table.columns
            if isinstance(c.type, sa.String) and c.type.length and c.name not in skip}  # fmt: skip


_MAX_LENGTH = {kind: _max_lengths(kind) for kind in ("appointments", "leads")}


def _build_frame(
    kind: Kind,
    section: ProfileSection,
    name: str,
    columns: list[_Column],
    arrays: list[pa.Array],
    lines: np.ndarray,
    clinic_tz: tzinfo,
) -> pd.DataFrame:
    values = {c.field: pc.utf8_trim_whitespace(a) for c, a in zip(columns, arrays, strict=True)}
    blank = {field: cells.as_bool(pc.equal(v, "")) for field, v in values.items()}
    if blank:
        keep = ~np.logical_and.reduce(list(blank.values()))
        if not keep.all():  # rows blank in every column read (Excel's ",,,," lines)
            mask = pa.array(keep)
            values = {field: v.filter(mask) for field, v in values.items()}
            blank = {field: b[keep] for field, b in blank.items()}
            lines = lines[keep]
    n = len(lines)
    by_field = {c.field: c for c in columns}
    problems: list[tuple[int, int, RowProblem]] = []

    def report(order: int, column: _Column, bad: np.ndarray, reason: str) -> None:
        for line in lines[bad].tolist():
            problems.append((line, order, RowProblem(name, line, column.header, reason)))

    out: dict[str, Any] = {}
    for order, (field, how) in enumerate(FIELDS[kind].items()):
        column = by_field.get(field)
        if column is None:
            out[field] = cells.absent(how, n)
            continue
        cells_in, is_blank = values[field], blank[field]
        if field == "currency":  # "usd" from a hand-kept sheet is USD; not a code stays refused later
            cells_in = pc.utf8_upper(cells_in)
        if field in section.required:
            report(order, column, is_blank, "missing value")
        if how == _TEXT:
            out[field] = cells.text(cells_in)
            # PostgreSQL text cannot hold one and refuses the whole load without a line
            report(
                order, column, cells.as_bool(pc.match_substring(cells_in, "\x00")), "contains a NUL character"
            )
            if limit := _MAX_LENGTH[kind].get(field):  # wider than its staging column
                too_long = cells.as_bool(pc.greater(pc.utf8_length(cells_in), limit))
                report(order, column, too_long, f"longer than {limit} characters")
        elif how == _TIME:
            tz = None if column.utc else clinic_tz
            out[field], bad = cells.timestamps(cells_in, tz)
            report(order, column, bad, "not an ISO 8601 timestamp (years 1900-2199)")
        elif how == _MONEY:
            out[field], bad = cells.money(cells_in)
            report(order, column, bad, "not a decimal amount")
        elif how == _FLAG:
            out[field], bad = cells.flag(cells_in)
            report(order, column, bad, "not a boolean (true/false, yes/no, y/n, 1/0)")
        else:
            out[field], out["status_known"] = cells.status(cells_in, section.status_map())
    if problems:
        problems.sort(key=lambda item: item[:2])
        raise InputError([problem for _, _, problem in problems])
    recency = None
    if kind == "appointments":  # NaT is the smallest int64: a row without updated_at is oldest
        recency = out["updated_at"].to_numpy(dtype="datetime64[ns]").view(np.int64)
    keep = _latest_rows(values[_KEY[kind]], recency)
    if keep is not None:  # drop the superseded rows before the frame is built (one copy)
        rows = np.flatnonzero(keep)
        out = {field: _take(column, rows) for field, column in out.items()}
        lines = lines[rows]
    out["source_file"] = cells.text(pa.array([name] * len(lines), type=pa.string()))
    out["source_line"] = np.asarray(lines, dtype=np.int64)
    return pd.DataFrame({c: out[c] for c in columns_of(kind)}, index=pd.RangeIndex(len(lines)))


def _take(column: Any, rows: np.ndarray) -> Any:
    """The ``rows`` of a column (a Series or a numpy array), as an array."""
    return column.array.take(rows) if isinstance(column, pd.Series) else column[rows]


def _latest_rows(key: pa.Array, recency: np.ndarray | None) -> np.ndarray | None:
    """Mask of the row that wins for each key within one export; None when keys are unique.

    The highest ``recency`` wins (appointments: ``updated_at``); ties, and exports without a
    recency (leads), go to the later row.
    """
    if isinstance(key, pa.ChunkedArray):
        key = key.combine_chunks()
    encoded = key.dictionary_encode()
    n = len(key)
    if len(encoded.dictionary) == n:
        return None
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    # only the rows of a repeated key compete; every other row is kept as it is
    repeated = np.flatnonzero(np.bincount(codes, minlength=len(encoded.dictionary))[codes] > 1)
    codes = codes[repeated]
    recency = np.zeros(len(repeated), dtype=np.int64) if recency is None else recency[repeated]
    order = np.lexsort((repeated, recency, codes))
    ranked = codes[order]
    last = np.append(ranked[1:] != ranked[:-1], True)
    keep = np.ones(n, dtype=bool)
    keep[repeated] = False
    keep[repeated[order[last]]] = True
    return keep


def _read(
    kind: Kind,
    source: SourceConfig,
    config: ClinicConfig,
    start: datetime | None,
    end: datetime | None,
) -> pd.DataFrame:
    section = _section(source.profile, kind)
    if source.path is not None:
        export = CsvExport(config.resolve(source.path), source.encoding, _header_names(section))
        name = export.name
        columns = _match_columns(section, export.header, name, export.header_line)
        amounts = [c.index for c in columns if FIELDS[kind][c.field] == _MONEY]
        arrays, lines = export.read([c.index for c in columns], amounts)
    else:
        assert source.query is not None
        result = QueryResult.run(
            config.resolve_url(source.source_url()),
            config.resolve(source.query),
            clinic_id=config.clinic_id,
            start=start,
            end=end,
            timezone=config.timezone,
        )
        name = result.name
        columns = _match_columns(section, result.header, name)
        arrays, lines = result.read([c.index for c in columns])
    return _build_frame(kind, section, name, columns, arrays, lines, config.tz)


def check_csv_header(kind: Kind, source: SourceConfig, config: ClinicConfig) -> int:
    """Open a CSV export and match its header as a run would, without reading the rows (doctor).

    Returns:
        how many of the profile's fields the header maps.

    Raises:
        InputError: missing, empty or undecodable file, a required column missing, a mapped
            header repeated.
    """
    assert source.path is not None
    section = _section(source.profile, kind)
    export = CsvExport(config.resolve(source.path), source.encoding, _header_names(section))
    return len(_match_columns(section, export.header, export.name, export.header_line))


def read_appointments(
    source: SourceConfig,
    config: ClinicConfig,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Read one appointment export (CSV file or SQL query) as the canonical frame.

    Args:
        source: the export and its profile; a CSV path resolves against ``config.base_dir``.
        config: the clinic; its ``timezone`` gives offset-less timestamps their meaning and its
            ``clinic_id`` is bound as ``:clinic_id`` in a SQL query.
        start: bound as ``:start`` when the query uses it (timezone-aware); ignored for CSV,
            which is read whole.
        end: bound as ``:end`` likewise.

    Returns:
        The columns of ``columns_of("appointments")`` with the dtypes of docs/architecture.md,
        one row per ``appointment_id`` (within the export the newest ``updated_at`` wins, then
        the later row), in source order.

    Raises:
        InputError: the file is missing, empty or undecodable, lacks a required column, has a
            duplicated mapped header, ragged rows, or bad cells; every problem of the file is
            listed by file, line and column, without values.
        ConfigError: unknown profile, or a query binding a parameter that was not given.
        ValueError: ``start`` or ``end`` is naive (the window must be an unambiguous instant).
    """
    return _read("appointments", source, config, start, end)


def read_leads(
    source: SourceConfig,
    config: ClinicConfig,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Read one lead export (CSV file or SQL query) as the canonical frame.

    Same arguments and errors as ``read_appointments``; within the export the later row of a
    repeated ``lead_id`` wins. Returns the columns of ``columns_of("leads")``.
    """
    return _read("leads", source, config, start, end)
