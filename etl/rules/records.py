"""Rule 1 (test records) and the status rule's helpers; run on raw rows before hashing.

Test-record detection needs the raw email domain and names, so it runs at extract time and
leaves only a boolean ``is_test`` behind for staging (the raw values never reach the database).
Emails and names repeat across a person's rows (and a clinic has few distinct first names), so
each check runs once per distinct value and is mapped back to the rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from etl.config import Exclude


def flag_test_records(frame: pd.DataFrame, exclude: Exclude) -> pd.Series:
    """True where the email domain is excluded or a first/last name matches a test pattern.

    Both checks are case-insensitive and ignore surrounding whitespace (SPEC rule 1).
    """
    flags = np.zeros(len(frame), dtype=bool)
    if "email" in frame:
        domains = {d.strip().lower() for d in exclude.email_domains}
        flags |= _each_distinct(frame["email"], lambda v: v.strip().lower().rsplit("@", 1)[-1] in domains)
    if exclude.name_patterns:
        pattern = re.compile("|".join(f"(?:{p})" for p in exclude.name_patterns), re.IGNORECASE)
        for col in ("first_name", "last_name"):
            if col in frame:
                flags |= _each_distinct(frame[col], lambda v: pattern.search(v.strip()) is not None)
    return pd.Series(flags, index=frame.index)


def _each_distinct(column: pd.Series, test: Callable[[str], bool]) -> np.ndarray:
    """``test`` of each row's value as a pandas string (missing: False), once per distinct value."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    # the text pandas' ``astype("string")`` gives each value (what the checks were defined on)
    texts = pd.Series(uniques).astype("string")
    hits = np.array([isinstance(text, str) and test(text) for text in texts] + [False], dtype=bool)
    return hits[codes]  # a missing cell (code -1) takes the trailing False
