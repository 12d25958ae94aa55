"""The outbox codec (etl.outbox): msgspec where it gives the standard library's exact bytes and
objects, the standard library everywhere else; member keys (etl.payloads) unchanged by it."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from etl import payloads
from etl.outbox import (
    OUTBOX_FILES,
    decode_line,
    encode_canonical,
    encode_canonical_all,
    read_rows,
    write_outbox,
)


def _reference(value: Any) -> bytes:
    """What the outbox wrote before msgspec: the definition of the canonical form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _floats() -> list[float]:
    rng = random.Random(7)
    values = [0.0, -0.0, 1.0, 0.1, 450.0, 1250.5, 99999.99, 1e-4, 9.999999999999999e-05, 1e-5, 1.5e-5,
              1e-7, 5e-324, 1e15, 9999999999999998.0, 1e16, 1.2345678901234567e16, 1e22, 1.7976931348623157e308,
              math.nan, math.inf, -math.inf]  # fmt: skip
    values += [rng.uniform(-1e6, 1e6) for _ in range(2000)]
    values += [round(rng.uniform(0, 100_000), 2) for _ in range(2000)]
    values += [rng.random() * 10 ** rng.uniform(-10, 20) for _ in range(2000)]
    values += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(2000)]
    return values


TEXTS = ["", "plain", "é中😀", '\x00\x1f\t\n\r"\\/', "\u2028\u2029\x7f", "<>&'", "a" * 64, "Ümlaut-ß"]
VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30),
    {"b": 1, "a": [1, 2.5, None], "é": {"z": "x", "A": 0}}, {"": "", "aa": 1, "a": 2, "ä": 3, "Z": 4},
    [[], {}, [[]], (1, "t")], {1: "int key"}, {"k": (1, 2)}, *TEXTS,
    {"user_identifiers": [{"hashed_email": "0" * 64}, {"address_info": {"country_code": "US"}}]},
]  # fmt: skip


@pytest.mark.parametrize("value", [*VALUES, *_floats()[:40]], ids=repr)
def test_canonical_bytes_are_json_dumps_bytes(value: Any) -> None:
    assert encode_canonical(value) == _reference(value)


def test_canonical_bytes_for_many_floats_and_rows() -> None:
    floats = _floats()
    rows = [{"value": f, "currency": "USD", "data": [f, {"x": f}]} for f in floats]
    assert encode_canonical_all(floats) == [_reference(f) for f in floats]
    assert encode_canonical_all(rows) == [_reference(r) for r in rows]
    # one odd value among many sends only the whole batch the slow way, with the same bytes
    assert encode_canonical_all([*VALUES, 1e16]) == [_reference(v) for v in [*VALUES, 1e16]]


@pytest.mark.parametrize(
    "value",
    [{1, 2}, {"a": Decimal("1.5")}, {"k": {"t"}}, {"b": 1, 2: "x"}, "\ud800", {"\ud800": 1}, b"bytes"],
    ids=repr,
)
def test_what_json_dumps_refuses_is_refused_the_same_way(value: Any) -> None:
    with pytest.raises(Exception) as expected:
        _reference(value)
    with pytest.raises(type(expected.value)):
        encode_canonical(value)


LINES = ['{"a":1,"a":2}', "[1e400]", "[-1e400]", '["\\ud800"]', "[NaN]", "[Infinity]", "[-0.0]", "[1E5]",
         "[0.1e-400]", '"\\u0000"', ' {"a": 1} \n', "[18446744073709551616]", "[-9223372036854775809]",
         "[12345678901234567890123]", "[1.0000000000000002]", '["\\ud83d\\ude00"]', '{"é":"中"}']  # fmt: skip


@pytest.mark.parametrize("line", LINES)
def test_decoded_rows_are_json_loads_rows(line: str) -> None:
    got, expected = decode_line(line), json.loads(line)
    assert repr(got) == repr(expected) and type(got) is type(expected)


@pytest.mark.parametrize("line", ["{", '{"a":}', "[1,]", ""])
def test_malformed_lines_fail_as_before(line: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        decode_line(line)


def test_floats_read_back_exactly() -> None:
    finite = [f for f in _floats() if math.isfinite(f)]
    for f in finite:
        text = repr(f)
        assert decode_line(text) == json.loads(text)


def test_outbox_files_are_the_reference_bytes_and_read_back(tmp_path: Path) -> None:
    rows = {
        "google_conversions": [
            {"order_id": "a" * 64, "conversion_value": v, "currency_code": "USD"}
            for v in (450.0, 0.1, 1e16, 1e-5, 12.34)
        ],
        "meta_events": [
            {"user_data": {"em": ["b" * 64]}, "event_time": 1_790_000_000, "note": t} for t in TEXTS
        ],
        "google_customer_match": [],
        "meta_audience": [{"operation": "add", "data": [["c" * 64, ""] * 4] * 3}],
    }
    summary = {"b": 1, "a": "é"}
    outbox = write_outbox(tmp_path / "outbox", rows, summary)
    digests = {}
    for destination, name in OUTBOX_FILES.items():
        expected = b"".join(_reference(r) + b"\n" for r in rows[destination])
        assert (outbox / name).read_bytes() == expected, destination
        assert list(read_rows(outbox, destination)) == rows[destination]
        digests[name] = hashlib.sha256(expected).hexdigest()
    written = (outbox / "summary.json").read_text(encoding="utf-8")
    # the summary names the exact bytes beside it
    assert written == json.dumps({**summary, "outbox_sha256": digests}, sort_keys=True, indent=2) + "\n"


def test_reading_restores_the_collector_state(tmp_path: Path) -> None:
    outbox = write_outbox(tmp_path / "outbox", {"meta_events": [{"a": 1}] * 3}, {})
    assert gc.isenabled()
    assert len(list(read_rows(outbox, "meta_events"))) == 3
    assert gc.isenabled()
    gc.disable()
    try:
        list(read_rows(outbox, "meta_events"))
        assert not gc.isenabled()  # a caller's own pause is left alone
    finally:
        gc.enable()


def test_member_keys_are_the_hash_of_the_reference_json() -> None:
    h = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(8)]
    members = pd.DataFrame({
        "em_g": [[h[0]], [], [h[1], h[2]]], "ph_g": [[h[3]], [], []],
        "fn_g": [h[4], None, h[4]], "ln_g": [h[5], None, h[5]], "country_code": ["US", None, "US"],
        "postal_code": ["94110", None, "10001"],
        "em_m": [h[0], None, "é"], "ph_m": [None, None, h[3]], "fn_m": [h[4], None, None], "ln_m": [None] * 3,
        "zp_m": [None] * 3, "ct_m": [None] * 3, "st_m": [None] * 3, "country_m": [h[6], None, None],
    })  # fmt: skip
    google = payloads.google_member_rows(members)
    assert len(google) == 2
    for key, row in google.items():
        assert key == hashlib.sha256(_reference(row["user_identifiers"])).hexdigest()
        assert key == payloads.google_member_key(row)
    meta = payloads.meta_member_rows(members)
    assert len(meta) == 2
    for key, data in meta.items():
        assert key == hashlib.sha256(_reference(data)).hexdigest() == payloads.meta_member_key(data)
    assert payloads.canonical_json(["é", 1.5, None]) == _reference(["é", 1.5, None]).decode("utf-8")


def test_meta_member_rows_keep_text_and_blank_everything_else() -> None:
    """Built a column at a time; the row-by-row definition is kept here as the reference."""
    cols = ("em_m", "ph_m", "fn_m", "ln_m", "zp_m", "ct_m", "st_m", "country_m")
    cells = ["a" * 64, "", None, math.nan, pd.NA, "é", "b" * 64]
    rng = random.Random(3)
    members = pd.DataFrame({c: [rng.choice(cells) for _ in range(400)] for c in cols})
    members["fn_m"] = members["fn_m"].astype("category")
    members["zp_m"] = members["zp_m"].astype("string")
    expected: dict[str, list[str]] = {}
    for rec in members.itertuples(index=False):
        data = [v if isinstance(v, str) else "" for v in (getattr(rec, c) for c in cols)]
        if data[0] or data[1]:
            expected[hashlib.sha256(_reference(data)).hexdigest()] = data
    got = payloads.meta_member_rows(members)
    assert got == expected and list(got) == list(expected) and 0 < len(got) < 400
