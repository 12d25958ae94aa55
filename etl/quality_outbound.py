"""The pending outbox flattened into the frames the outbound suites run on (docs/quality.md).

One frame per destination (a row per outbox line, keyed by its line number) and every hashed
value of all four files, long. Built from the JSONL the PHI gate has already passed, so the
frames hold hashes, opaque IDs, counts, times, amounts and codes only. Split from
``etl.quality_frames``, which re-exports ``outbound_frames`` and ``conversion_frames``.

The large destinations (a quarter of a million Customer Match members, ten thousand audience
rows per line) are flattened a column at a time when their rows have the shape the gate lets
out; any other row is flattened row by row, which defines what the frames hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from etl.outbox import OUTBOX_FILES, collector_paused, encode_canonical_text, read_rows
from etl.payloads import google_member_key

_GOOGLE_COLUMNS = ("line", "order_id", "conversion_action", "conversion_date_time", "conversion_epoch",
                   "conversion_value", "currency_code", "click_id", "click_id_count", "identifier_count",
                   "has_email", "has_phone", "match_keys")  # fmt: skip
_META_COLUMNS = ("line", "event_id", "event_name", "event_time", "value", "currency", "fbc", "fbp",
                 "has_email", "has_phone", "has_external_id", "match_keys")  # fmt: skip
_MEMBER_COLUMNS = ("line", "operation", "identifier_count", "member_key", "country_code", "postal_code")
_AUDIENCE_COLUMNS = ("line", "operation", "batch_rows", "min_width", "max_width")
_ADDRESS_FIELDS = ("hashed_first_name", "hashed_last_name", "country_code", "postal_code")


def _frame(rows: list[tuple[Any, ...]], columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=list(columns))
    return frame.astype({c: object for c in columns if frame[c].dtype == np.dtype("O")})


_DESTINATION_CODE = {destination: code for code, destination in enumerate(OUTBOX_FILES)}


class _Hashes:
    """Every hashed value of the outbox, long: destination, line, field, value; keyed by ``ref``.

    Values come one row at a time (``add``) or a whole column at a time (``extend``); the frame
    holds the same values either way, in the order they came.
    """

    def __init__(self) -> None:
        # (destination code, outbox line, field, value) per value, in chunks of arrays and lists
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]] = []
        self._rows: tuple[list[int], list[int], list[str], list[str]] = ([], [], [], [])

    def add(self, destination: str, line: int, field: str, values: Any) -> None:
        items = values if isinstance(values, list) else [values]
        # a non-text value keeps only its type's name: the regex fails it, nothing of it is kept
        kept = [v if isinstance(v, str) else repr(type(v)) for v in items if v is not None and v != ""]
        if kept:
            n = len(kept)
            codes, lines, fields, out = self._rows
            codes.extend([_DESTINATION_CODE[destination]] * n)
            lines.extend([line] * n)
            fields.extend([field] * n)
            out.extend(kept)

    def extend(
        self, destination: str, lines: np.ndarray, fields: np.ndarray | str, values: list[str]
    ) -> None:
        """Many values of one destination: ``lines`` (and ``fields``, unless one name) aligned with them.

        The caller guarantees what ``add`` would otherwise make sure of: every value is text and
        none is empty.
        """
        n = len(values)
        names = np.full(n, fields, dtype=object) if isinstance(fields, str) else fields
        code = np.full(n, _DESTINATION_CODE[destination], dtype=np.int64)
        self._chunks.append((code, np.asarray(lines, dtype=np.int64), names, values))

    def frame(self) -> pd.DataFrame:
        """``ref`` = destination number x 10^9 + outbox line: opaque, unique per row of a file."""
        codes, lines, fields, values = self._rows
        chunks = [(np.asarray(codes, dtype=np.int64), np.asarray(lines, dtype=np.int64),
                   np.asarray(fields, dtype=object), values), *self._chunks]  # fmt: skip
        code = np.concatenate([c[0] for c in chunks])
        value = np.empty(len(code), dtype=object)
        value[:] = list(chain.from_iterable(c[3] for c in chunks))
        destination = pd.Categorical.from_codes(code, categories=pd.Index(list(OUTBOX_FILES)))  # type: ignore[arg-type]
        ref = code * 1_000_000_000 + np.concatenate([c[1] for c in chunks])
        field = pd.Categorical(np.concatenate([c[2] for c in chunks]))
        return pd.DataFrame({"ref": ref, "destination": destination, "field": field,
                             "value": pd.Series(value, dtype=object)})  # fmt: skip


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
    rows = list(rows)
    columns = _member_columns(rows, hashes)
    if columns is not None:
        return columns
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
        key = google_member_key(row) if isinstance(row.get("user_identifiers"), list) else None
        out.append((line, row.get("operation"), len(identifiers), key, address.get("country_code"),
                    address.get("postal_code")))  # fmt: skip
    return _frame(out, _MEMBER_COLUMNS)


def _types(values: Iterable[Any]) -> set[type]:
    return set(map(type, values))


def _member_columns(rows: list[Any], hashes: _Hashes) -> pd.DataFrame | None:
    """``_member_rows`` built a column at a time, for rows shaped as the PHI gate lets them out.

    A quarter of a million members with four or five values each made the row-by-row build the
    slowest part of the outbound checks. Any row of another shape (a member without identifiers,
    an identifier with two keys, a value that is not text) returns ``None``: the caller then
    builds row by row, so both give the same frame and hash values for any input.
    """
    if not rows or _types(rows) != {dict}:
        return None
    identifiers = [row.get("user_identifiers") for row in rows]
    operations = [row.get("operation") for row in rows]
    if _types(identifiers) != {list} or not _types(operations) <= {str}:
        return None
    items = list(chain.from_iterable(identifiers))
    if items and (_types(items) != {dict} or set(map(len, items)) != {1}):
        return None
    fields = np.fromiter(chain.from_iterable(items), dtype=object, count=len(items))
    values = np.fromiter(chain.from_iterable(map(dict.values, items)), dtype=object, count=len(items))
    kinds = np.fromiter(map(id, map(type, values)), dtype=np.int64, count=len(items))  # types, compared in C
    address = (kinds == id(dict)) & (fields == "address_info")
    if not (_types(fields) <= {str} and np.all(address | (kinds == id(str)))):
        return None  # a dict under a hash field: only the row-by-row build knows what to keep of it
    addresses = values[address].tolist()
    parts = {sub: [a.get(sub) for a in addresses] for sub in _ADDRESS_FIELDS}
    if not set(chain.from_iterable(addresses)) <= set(_ADDRESS_FIELDS) or not all(
        _types(part) <= {str, type(None)} for part in parts.values()
    ):
        return None
    # every identifier list is now text only (str keys; str or None values): no second type check
    keys = [hashlib.sha256(text).hexdigest() for text in encode_canonical_text(identifiers)]
    lines = np.repeat(np.arange(1, len(rows) + 1, dtype=np.int64), list(map(len, identifiers)))
    plain = ~address & (values != "")
    hashes.extend("google_customer_match", lines[plain], fields[plain], values[plain].tolist())
    address_lines = lines[address]
    for sub in ("hashed_first_name", "hashed_last_name"):
        kept = np.fromiter(map(bool, parts[sub]), dtype=bool, count=len(addresses))
        hashes.extend("google_customer_match", address_lines[kept], sub, [v for v in parts[sub] if v])
    frame = pd.DataFrame({"line": np.arange(1, len(rows) + 1, dtype=np.int64), "operation": operations,
                          "identifier_count": np.fromiter(map(len, identifiers), dtype=np.int64, count=len(rows)),
                          "member_key": keys})  # fmt: skip
    # a member's last address gives its country and postal code, as row by row
    last = np.append(address_lines[1:] != address_lines[:-1], True) if addresses else np.zeros(0, dtype=bool)
    for column in ("country_code", "postal_code"):
        cells = np.full(len(rows), None, dtype=object)
        cells[address_lines[last] - 1] = np.array(parts[column], dtype=object)[last]
        frame[column] = cells
    return frame


def _audience_rows(rows: Iterable[dict[str, Any]], hashes: _Hashes) -> pd.DataFrame:
    out = []
    for line, row in enumerate(rows, start=1):
        data = row.get("data") or []
        if type(data) is list and _types(data) <= {list}:
            # 10,000 rows of 8 cells per line: handled a line at a time when the cells are all text
            widths = list(map(len, data))
            cells = list(chain.from_iterable(data))
            if _types(cells) <= {str}:
                kept = list(filter(None, cells))  # text only: drops exactly the empty cells
                hashes.extend("meta_audience", np.full(len(kept), line, dtype=np.int64), "data", kept)
            else:
                hashes.add("meta_audience", line, "data", cells)
        else:
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
    with collector_paused():
        frames = {
            "google_conversions": _google_rows(read_rows(pending, "google_conversions"), hashes),
            "meta_events": _meta_rows(read_rows(pending, "meta_events"), hashes),
            "google_customer_match": _member_rows(read_rows(pending, "google_customer_match"), hashes),
            "meta_audience": _audience_rows(read_rows(pending, "meta_audience"), hashes),
        }
        frames["hashes"] = hashes.frame()
    return frames


def conversion_frames(directory: Path) -> dict[str, pd.DataFrame]:
    """The two conversion files of an outbox (or pending plan), flattened; for the run report."""
    discard = _Hashes()
    return {
        "google_conversions": _google_rows(read_rows(directory, "google_conversions"), discard),
        "meta_events": _meta_rows(read_rows(directory, "meta_events"), discard),
    }
