"""Rule 1 (test records): ``flag_test_records`` on raw extract rows, per distinct value."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.config import Exclude
from etl.rules.records import flag_test_records

EXCLUDE = Exclude(email_domains=[" Example.COM ", "test.com"], name_patterns=["^test$", "^do not use$"])


def _row_by_row(frame: pd.DataFrame, exclude: Exclude) -> list[bool]:
    """SPEC rule 1 stated one row at a time (the reference the per-value version must match)."""
    domains = {d.strip().lower() for d in exclude.email_domains}
    pattern = re.compile("|".join(f"(?:{p})" for p in exclude.name_patterns), re.IGNORECASE)
    flags = []
    for _, row in frame.iterrows():
        email, first, last = (row.get(c) for c in ("email", "first_name", "last_name"))
        hit = isinstance(email, str) and email.strip().lower().rsplit("@", 1)[-1] in domains
        for name in (first, last):
            hit |= isinstance(name, str) and pattern.search(name.strip()) is not None
        flags.append(hit)
    return flags


ROWS = pd.DataFrame(
    {
        "email": ["a@Example.com ", " x@test.com\x1c", None, "a@b@test.com", "TEST.COM", "", "@example.com"],
        "first_name": ["Ann", " test ", "TEST\n", None, "Do Not Use", "Testy", "Bo"],
        "last_name": ["Lee", "Lee", None, "Doe", "Doe", "Doe", "test"],
    }
)


@pytest.mark.parametrize("dtype", [object, "string[python]", "string[pyarrow]"])
def test_flags_match_the_rule_for_every_string_dtype(dtype: object) -> None:
    frame = ROWS.astype(dtype).set_axis([10, 11, 12, 13, 14, 15, 16])
    flags = flag_test_records(frame, EXCLUDE)
    assert flags.index.tolist() == frame.index.tolist()
    assert flags.dtype == bool
    assert flags.tolist() == [True, True, True, True, True, False, True]
    assert flags.tolist() == _row_by_row(ROWS, EXCLUDE)


def test_flags_without_identifier_columns_or_rows() -> None:
    assert flag_test_records(pd.DataFrame({"lead_id": ["l1"]}), EXCLUDE).tolist() == [False]
    assert flag_test_records(ROWS.iloc[:0], EXCLUDE).tolist() == []
    no_patterns = Exclude(email_domains=["test.com"], name_patterns=[])
    assert flag_test_records(ROWS, no_patterns).tolist() == [False, True, False, True, True, False, False]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.text(alphabet="aT@.eXmp lco\t\x1ctesé", max_size=14)),
            st.one_of(st.none(), st.text(alphabet="tesT DoNU\n\x1cé", max_size=10)),
        ),
        max_size=12,
    )
)
def test_flags_per_distinct_value_match_row_by_row(rows: list[tuple[str | None, str | None]]) -> None:
    frame = pd.DataFrame(rows * 3, columns=["email", "first_name"], dtype="string[pyarrow]")
    assert flag_test_records(frame, EXCLUDE).tolist() == _row_by_row(frame.astype(object), EXCLUDE)
