"""How a raw cell becomes text for the identifier normalizers of ``etl.identifiers``.

Why: every normalizer (and the country and phone lookups beside them) starts from the same
reading of a cell, as the ``etl.identifiers`` docstring states: text as is; whole numbers up to
15 digits as their digits (a ZIP or phone column a CSV reader typed as a number); anything else
(``None``, ``NaN``, ``pd.NA``, booleans, fractions) unusable. The contract is SPEC rule 9
(``shared/SPEC.md``) and ``shared/reference/ad-platforms.md`` sections A3 and B2.
"""

from __future__ import annotations

import numbers
import re
import unicodedata
from typing import Final

_NOT_ASCII_LETTER = re.compile(r"[^a-z]")
_MAX_NUMBER: Final = 10**15  # a number cell longer than any E.164 number is not an identifier


def as_text(value: object) -> str | None:
    """The text of a cell: a string as is, a whole number below 10**15 as its digits, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        whole = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        whole = int(float(value))
    else:
        return None
    return str(whole) if abs(whole) < _MAX_NUMBER else None


def has_letter(text: str) -> bool:
    """Whether ``text`` holds at least one letter (in any script)."""
    return any(char.isalpha() for char in text)


def letters_only(value: object) -> str | None:
    """Lowercase, keep letters and their combining marks only, NFC-composed."""
    text = as_text(value)
    if text is None:
        return None
    if text.isascii():
        letters = _NOT_ASCII_LETTER.sub("", text.lower())
        return letters or None
    lowered = unicodedata.normalize("NFC", text).lower()
    kept = "".join(c for c in lowered if unicodedata.category(c)[0] in "LM")
    letters = unicodedata.normalize("NFC", kept)
    return letters if has_letter(letters) else None
