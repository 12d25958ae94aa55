"""Rule 1 (test records) and the status rule's helpers; run on raw rows before hashing.

Test-record detection needs the raw email domain and names, so it runs at extract time and
leaves only a boolean ``is_test`` behind for staging (the raw values never reach the database).
"""

from __future__ import annotations

import re

import pandas as pd

from etl.config import Exclude


def flag_test_records(frame: pd.DataFrame, exclude: Exclude) -> pd.Series:
    """True where the email domain is excluded or a first/last name matches a test pattern.

    Both checks are case-insensitive and ignore surrounding whitespace (SPEC rule 1).
    """
    flags = pd.Series(False, index=frame.index)
    if "email" in frame:
        domains = {d.strip().lower() for d in exclude.email_domains}
        domain = frame["email"].astype("string").str.strip().str.lower().str.rsplit("@", n=1).str[-1]
        flags |= domain.isin(domains).fillna(False).astype(bool)
    if exclude.name_patterns:
        pattern = "|".join(f"(?:{p})" for p in exclude.name_patterns)
        for col in ("first_name", "last_name"):
            if col in frame:
                names = frame[col].astype("string").str.strip()
                hit = names.str.contains(pattern, flags=re.IGNORECASE, regex=True)
                flags |= hit.fillna(False).astype(bool)
    return flags
